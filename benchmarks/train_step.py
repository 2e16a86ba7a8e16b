"""LoRA train step, mochi_jax (jit) vs diffusers + PEFT: steps/s, examples/s, host memory -> results/train_step.json.

    python benchmarks/train_step.py [--batch 2] [--steps 20] [--frames 13] [--height 96] [--width 160] [--out FILE]
    python benchmarks/train_step.py --smoke --out /tmp/train_step.json   # 1 step of batch 1 at tiny shapes (the test)

A step: n, eps, sigma ~ U(0, 1); z = mean + exp(logvar / 2) n, normalised; MSE of the DiT at (1 - sigma) z +
sigma eps, t = 1000 (1 - sigma), against z - eps; backward; AdamW (lr 1e-4, wd 0.01) on the LoRA only: rank 16,
alpha 16 on both streams' qkv and output projections (ours: the reference's fused qkv; PEFT: to_q/k/v, to_out.0,
add_q/k/v_proj, to_add_out). float32, CPU, no remat; both first steps use the same noise. Timed: each step to
completion after 2 warm-ups; steps/s = 1 / median. Every part runs in a fresh process (torch once per thread
count). RSS: after imports, after the model (+ LoRA, optimizer), at the first step (ours: compiled), the peak
sampled every ms over the steps, its rise, the lifetime peak (getrusage); ours also memory_analysis().
Writes benchmarks/results/train_step.json (--out; --smoke: a temporary folder unless --out is given).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# from any directory: the checkout's package and its reference harnesses (tests/harness/dit_ref.py)
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "harness")]
BENCH = dict(depth=4, num_heads=4, head_dim=32, text_width=64, t5_dim=64, time_embed_dim=64)
# --smoke: the smallest run (one timed step after the warm-ups, one torch thread count), to check that it runs
SMOKE = dict(batch=1, steps=1, frames=1, height=16, width=16, text_len=16, torch_threads="1")
WARMUP, MIB = 2, 2 ** 20
MEM = {"imports": "rss_after_imports", "model": "rss_after_model", "1st step": "rss_first_step",
       "step peak": "rss_peak_steps", "rise": "rss_step_rise", "lifetime": "rss_peak_lifetime"}
PEFT_TARGETS = r".*attn1\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)$"


def rss():
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_steps(step, n, losses, **rss_before):
    """Warm-up, then n timed steps while a thread samples the RSS every ms; the process ends after it."""
    first, peak, done = rss(), [0], threading.Event()

    def sample():
        while not done.wait(0.001):
            peak[0] = max(peak[0], rss())

    sampler, times = threading.Thread(target=sample), []
    sampler.start()
    for _ in range(WARMUP + n):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    done.set()
    sampler.join()
    return dict(times_s=times[WARMUP:], rss_first_step=first, rss_peak_steps=max(first, peak[0], rss()),
                rss_peak_lifetime=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, first_loss=losses[0],
                **rss_before)


def side_jax(d, n):
    import jax
    from ml_collections import ConfigDict

    from mochi_jax.lib import training
    from mochi_jax.models import dit, lora
    from mochi_jax.checkpoints import load_dit

    after_imports = rss()
    cfg, params = load_dit(d / "ours", compute_dtype="float32", remat="none")
    batch = {k: v for k, v in np.load(d / "batch.npz").items() if k in ("mean", "logvar", "t5_feats", "t5_mask")}
    model = dit.MochiDiT(cfg, lora.targets_from_config(lora.REFERENCE_TARGETS))
    opt = training.make_optimizer(ConfigDict(dict(lr=1e-4, weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8, warmup_steps=0,
                                               schedule="constant", decay_steps=1, grad_clip=0.0, grad_accum=1)))
    state = {"s": training.init_state(model, opt, 0, jax.tree_util.tree_leaves(params)[0].sharding)}
    after_model, t = rss(), time.perf_counter()
    compiled = training.make_train_step(model, opt, "normalized", 0.0).lower(state["s"], params, batch).compile()
    compile_s, m, losses = time.perf_counter() - t, compiled.memory_analysis(), []

    def step():
        state["s"], out = jax.block_until_ready(compiled(state["s"], params, batch))
        losses.append(float(out["loss"]))

    xla = {k: getattr(m, f"{k}_size_in_bytes") for k in ("temp", "argument", "output", "alias")}
    xla["temp_argument_output"] = xla["temp"] + xla["argument"] + xla["output"]
    return dict(run_steps(step, n, losses, rss_after_imports=after_imports, rss_after_model=after_model),
                lora_params=lora.count(state["s"]["lora"]), compile_s=compile_s, xla_bytes=xla,
                version=f"jax {jax.__version__}")


def side_torch(d, n, threads):
    import torch
    from diffusers import MochiTransformer3DModel
    from peft import LoraConfig

    after_imports = rss()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = MochiTransformer3DModel.from_pretrained(d / "transformer")
    model.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=PEFT_TARGETS))
    lora = [p for p in model.parameters() if p.requires_grad]  # add_adapter froze the rest
    opt = torch.optim.AdamW(lora, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    b = {k: torch.from_numpy(v) for k, v in np.load(d / "batch.npz").items()}
    mean_, std_ = b["latents_mean"].view(1, -1, 1, 1, 1), b["latents_std"].view(1, -1, 1, 1, 1)
    losses, after_model, first, shape = [], rss(), [(b["n0"], b["eps0"], b["sigma0"])], b["mean"].shape

    def step():
        noise, eps, sigma = first.pop() if first else (torch.randn(shape), torch.randn(shape), torch.rand(shape[0]))
        z = (b["mean"] + torch.exp(0.5 * b["logvar"]) * noise - mean_) / std_
        s = sigma.view(-1, 1, 1, 1, 1)
        pred = model(hidden_states=(1 - s) * z + s * eps, encoder_hidden_states=b["t5_feats"],
                     encoder_attention_mask=b["t5_mask"], timestep=1000.0 * (1.0 - sigma), return_dict=False)[0]
        loss = torch.mean((pred.float() - (z - eps)) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())

    return dict(run_steps(step, n, losses, rss_after_imports=after_imports, rss_after_model=after_model),
                lora_params=sum(p.numel() for p in lora), threads=threads, version=f"torch {torch.__version__}")


def prepare(d, a):
    """The shared inputs: a diffusers checkpoint, its conversion, one batch and the latent stats."""
    import jax
    from dit_ref import make_reference, random_inputs

    from mochi_jax.lib import sampling, training
    from mochi_jax.checkpoints import convert_dit
    from mochi_jax.models import dit, vae

    cfg = dit.DiTConfig(**BENCH)
    make_reference(cfg, seed=0).save_pretrained(d / "transformer", safe_serialization=True)
    convert_dit(d / "transformer", d / "ours", dtype="float32", progress=False)
    shape = (a.batch, *sampling.latent_shape(a.frames, a.height, a.width))
    mean, feats, mask, _ = random_inputs(cfg, a.batch, *shape[2:], a.text_len, [12 + 8 * i for i in range(a.batch)])
    batch = dict(mean=mean, logvar=np.random.default_rng(1).uniform(-4.0, -1.0, shape).astype(np.float32),
                 t5_feats=feats, t5_mask=mask)
    # ours' first draw: init_state(seed 0) keeps rng = fold_in(key, 2), the step folds in step 0
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(0), 2), 0)
    noise = {f"{k}0": np.asarray(v) for k, v in training.draw_noise(key, batch).items() if k in ("n", "eps", "sigma")}
    np.savez(d / "batch.npz", **batch, **noise, latents_mean=vae.LATENTS_MEAN, latents_std=vae.LATENTS_STD)
    return shape


def main(argv=None):
    ap = argparse.ArgumentParser()
    for flag, default in (("batch", 2), ("steps", 20), ("frames", 13), ("height", 96), ("width", 160),
                          ("text-len", 32), ("threads", 1)):
        ap.add_argument(f"--{flag}", type=int, default=default)
    ap.add_argument("--torch-threads", default=f"1,{os.cpu_count()}", help="comma-separated; one run each")
    ap.add_argument("--side", choices=("prepare", "jax", "torch"), help="internal: run one part in this process")
    ap.add_argument("--dir", type=Path, help="internal: the prepared inputs")
    ap.add_argument("--out", help="the JSON file (default benchmarks/results/train_step.json)")
    ap.add_argument("--smoke", action="store_true", help=f"the smallest run, {SMOKE}, to check that it runs")
    args = ap.parse_args(argv)
    if args.smoke:  # the smoke sizes as defaults: flags given explicitly still win
        ap.set_defaults(**SMOKE)
        args = ap.parse_args(argv)
    if args.side:
        res = {"prepare": lambda: prepare(args.dir, args), "jax": lambda: side_jax(args.dir, args.steps),
               "torch": lambda: side_torch(args.dir, args.steps, args.threads)}[args.side]()
        return print("RESULT " + json.dumps(res))

    def run(*extra):  # every part in a fresh process: a child's getrusage peak includes its parent's RSS
        cmd = [sys.executable, __file__, *(sys.argv[1:] if argv is None else argv), "--dir", tmp, *extra]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode:
            sys.exit(f"{' '.join(extra)} failed (exit {p.returncode}):\n{p.stderr[-4000:]}")
        return json.loads(p.stdout.split("RESULT ")[1])

    with tempfile.TemporaryDirectory() as tmp:
        shape = run("--side", "prepare")
        sides = {"mochi_jax (jit)": run("--side", "jax")}
        for k in dict.fromkeys(args.torch_threads.split(",")):
            sides[f"diffusers + peft, {k} thread(s)"] = run("--side", "torch", "--threads", k)
    for r in sides.values():
        med = float(np.median(r["times_s"]))
        r.update(median_s=med, min_s=min(r["times_s"]), steps_per_s=1 / med, examples_per_s=args.batch / med,
                 rss_step_rise=r["rss_peak_steps"] - r["rss_first_step"])
    best = max(list(sides)[1:], key=lambda k: sides[k]["steps_per_s"])  # the faster torch run
    ours, b = sides["mochi_jax (jit)"], sides[best]
    print(f"LoRA train step, batch {args.batch} x {list(shape[1:])}: {shape[2] * shape[3] * shape[4] // 4} + "
          f"{args.text_len} tokens, {args.steps} steps, {BENCH}, load average {os.getloadavg()[0]:.1f}")
    print(f"  {'':30s} {'steps/s':>7s} {'ex/s':>6s} {'median s':>8s} {'min s':>6s} {'LoRA params':>11s} | RSS MiB:"
          + " ".join(f"{c:>9s}" for c in MEM))
    for name, r in sides.items():
        print(f"  {name:30s} {r['steps_per_s']:7.2f} {r['examples_per_s']:6.2f} {r['median_s']:8.4f} {r['min_s']:6.3f} "
              f"{r['lora_params']:11,d} |         " + " ".join(f"{r[k] / MIB:9.0f}" for k in MEM.values()))
    x = {k: f"{v / MIB:.1f}" for k, v in ours["xla_bytes"].items()}
    print(f"  ours, compiled step memory_analysis MiB: temp {x['temp']} + argument {x['argument']} + output "
          f"{x['output']} = {x['temp_argument_output']} (aliased: {x['alias']}); compile {ours['compile_s']:.2f} s")
    ratios = dict(steps_per_s=ours["steps_per_s"] / b["steps_per_s"],
                  rss_peak_lifetime=b["rss_peak_lifetime"] / ours["rss_peak_lifetime"],
                  first_loss_rel_diff=abs(ours["first_loss"] - b["first_loss"]) / abs(b["first_loss"]))
    print(f"  vs the faster torch run ({best}): speed-up {ratios['steps_per_s']:.2f}x; torch / ours lifetime peak RSS "
          f"{ratios['rss_peak_lifetime']:.2f}x; first-step loss (same noise): ours {ours['first_loss']:.6f}, "
          f"torch {b['first_loss']:.6f}")
    out = Path(args.out) if args.out else (Path(tempfile.gettempdir()) / "train_step_smoke.json" if args.smoke
                                           else ROOT / "benchmarks" / "results" / "train_step.json")
    res = dict(config=BENCH, batch=args.batch, latent_shape=list(shape[1:]), text_len=args.text_len,
               warmup_steps=WARMUP, timed_steps=args.steps, sides=sides, torch_best=best, ratios=ratios,
               cpus=os.cpu_count(), load_average=os.getloadavg())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
