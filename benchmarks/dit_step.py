"""LoRA forward+backward of the DiT: mochi_jax (jit) vs diffusers + PEFT (PyTorch), same config,
same machine, same run; plus compile time of the scanned model at depth 4 vs 48.

    python benchmarks/dit_step.py [--repeats 5] [--frames 3] [--height 16] [--width 24] [--out FILE]
    python benchmarks/dit_step.py --smoke --out /tmp/dit_step.json   # one repeat at tiny shapes (the test)

Prints a table and writes benchmarks/results/dit_step.json (--out; --smoke: a temporary folder unless
--out is given). Both sides run in float32 on whatever device they find (CPU here); the LoRA is the
reference fine-tuner's (rank 16 on the visual and text qkv and output projections).
"""

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# from any directory: the checkout's package and its reference harnesses (tests/harness/dit_ref.py)
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "harness")]
from dit_ref import make_reference, random_inputs, write_both_layouts  # noqa: E402

from mochi_jax import checkpoints as convert  # noqa: E402
from mochi_jax.models import lora as lora_lib  # noqa: E402
from mochi_jax.models.dit import DiTConfig, MochiDiT  # noqa: E402
from mochi_jax.checkpoints import load_dit  # noqa: E402

BENCH = dict(depth=4, num_heads=4, head_dim=32, text_width=64, t5_dim=64, time_embed_dim=64)
SMOKE = dict(repeats=1, frames=1, height=8, width=8, text_len=8, torch_threads=1)  # --smoke: the smallest step


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times)


def bench_step(repeats, frames, h, w, text_len, tmp, torch_threads=0):
    import torch
    from peft import LoraConfig

    if torch_threads:
        torch.set_num_threads(torch_threads)

    cfg = DiTConfig(**BENCH, param_dtype="float32", compute_dtype="float32", remat="none")
    model = make_reference(cfg, seed=0)
    diff_dir, _ = write_both_layouts(model, tmp)
    path, _ = convert.convert_dit(diff_dir, tmp / "ours", dtype="float32", progress=False)
    c, params = load_dit(path, compute_dtype="float32", remat="none")
    inp = random_inputs(cfg, batch=1, frames=frames, h=h, w=w, text_len=text_len, valid=(text_len // 2,))
    targets = lora_lib.targets_from_config(lora_lib.REFERENCE_TARGETS)
    lora = jax.jit(MochiDiT(c, targets).init)(jax.random.PRNGKey(0), *inp)["lora"]  # one compile, not one per op
    target = np.random.default_rng(0).standard_normal(inp[0].shape).astype(np.float32)

    @jax.jit
    def jax_step(lo):
        def loss(lo):
            return jnp.mean((MochiDiT(c, targets).apply({"params": params, "lora": lo}, *inp) - target) ** 2)
        return jax.value_and_grad(loss)(lo)

    t0 = time.perf_counter()
    jax.block_until_ready(jax_step(lora))
    compile_s = time.perf_counter() - t0
    ours = timed(lambda: jax.block_until_ready(jax_step(lora)), repeats)

    model.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=r".*attn1\.(to_q|to_k|to_v|to_out\.0|"
                                 r"add_q_proj|add_k_proj|add_v_proj|to_add_out)$"))
    tin = [torch.from_numpy(x) for x in inp]
    tt = torch.from_numpy(target)

    def torch_step():
        model.zero_grad(set_to_none=True)
        out = model(hidden_states=tin[0], encoder_hidden_states=tin[1], encoder_attention_mask=tin[2],
                    timestep=tin[3], return_dict=False)[0]
        loss = torch.mean((out - tt) ** 2)
        loss.backward()
        return loss

    torch_step()  # warm-up
    ref = timed(torch_step, repeats)
    n_visual = frames * (h // 2) * (w // 2)
    return dict(config=BENCH, tokens=dict(visual=n_visual, text=text_len), jax_compile_s=compile_s,
                jax_median_s=ours[0], jax_min_s=ours[1], torch_median_s=ref[0], torch_min_s=ref[1],
                speedup=ref[0] / ours[0], torch_threads=torch.get_num_threads())


def compile_time(depth):
    cfg = DiTConfig(depth=depth, num_heads=2, head_dim=16, text_width=32, t5_dim=32, time_embed_dim=32,
                    param_dtype="float32", compute_dtype="float32", remat="full")
    inp = random_inputs(cfg, batch=1)
    targets = lora_lib.targets_from_config(lora_lib.REFERENCE_TARGETS)
    v = jax.eval_shape(lambda: MochiDiT(cfg, targets).init(jax.random.PRNGKey(0), *inp))

    def step(params, lo):
        return jax.grad(lambda lo: jnp.mean(MochiDiT(cfg, targets).apply({"params": params, "lora": lo}, *inp)))(lo)

    t = time.perf_counter()
    jax.jit(step).lower(v["params"], v["lora"]).compile()
    return time.perf_counter() - t


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--frames", type=int, default=3)
    ap.add_argument("--height", type=int, default=16)
    ap.add_argument("--width", type=int, default=24)
    ap.add_argument("--text-len", type=int, default=32)
    ap.add_argument("--torch-threads", type=int, default=0, help="torch's CPU threads (0: its default, all cores)")
    ap.add_argument("--out", help="the JSON file (default benchmarks/results/dit_step.json)")
    ap.add_argument("--smoke", action="store_true", help=f"the smallest run, {SMOKE}, to check that it runs")
    args = ap.parse_args(argv)
    if args.smoke:  # the smoke sizes as defaults: flags given explicitly still win
        ap.set_defaults(**SMOKE)
        args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        step = bench_step(args.repeats, args.frames, args.height, args.width, args.text_len, Path(tmp),
                          args.torch_threads)
    comp = {d: compile_time(d) for d in (4, 48)}
    res = dict(device=str(jax.devices()[0]), machine=platform.processor() or platform.machine(), step=step,
               compile_s={str(k): v for k, v in comp.items()}, compile_ratio_48_over_4=comp[48] / comp[4])
    print(f"LoRA fwd+bwd, {step['tokens']['visual']} visual + {step['tokens']['text']} text tokens, "
          f"config {BENCH}")
    print(f"  {'':24s} {'median s':>10s} {'min s':>10s}")
    print(f"  {'mochi_jax (jit)':24s} {step['jax_median_s']:10.4f} {step['jax_min_s']:10.4f}")
    print(f"  {'diffusers + peft':24s} {step['torch_median_s']:10.4f} {step['torch_min_s']:10.4f}")
    print(f"  speed-up (torch / jax, median): {step['speedup']:.2f}x   (jax first call incl. compile "
          f"{step['jax_compile_s']:.2f} s)")
    print(f"compile time of the LoRA grad step: depth 4 {comp[4]:.2f} s, depth 48 {comp[48]:.2f} s "
          f"(ratio {res['compile_ratio_48_over_4']:.2f})")
    out = Path(args.out) if args.out else (Path(tempfile.gettempdir()) / "dit_step_smoke.json" if args.smoke
                                           else ROOT / "benchmarks" / "results" / "dit_step.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
