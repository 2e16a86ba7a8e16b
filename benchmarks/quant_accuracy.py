"""Accuracy cost of a quantized frozen base (model.param_dtype int8 / float8_e4m3fn) against bf16, on
small random DiTs on the CPU:

    python benchmarks/quant_accuracy.py          # -> benchmarks/results/quant_accuracy.json (--out FILE)
    python benchmarks/quant_accuracy.py --show   # print the table of the saved results (--out FILE)
    python benchmarks/quant_accuracy.py --smoke --out /tmp/quant_accuracy.json   # tiny config, 2 steps (the test)

Per config and format:
  output     relative L2 error of the DiT's velocity against the float32 model (bf16 compute for every
             base, as in training; bf16's own error is the yardstick), over a batch of random inputs
  training   a rank-8 LoRA trained for --steps AdamW steps (lr 1e-2) on 2 fixed clips with each base:
             the fixed-noise loss before and after, against bf16's
  transfer   the LoRA trained on the quantized base applied to the bf16 base: its fixed-noise loss there,
             and how far its change of the bf16 model's output is from the bf16-trained LoRA's change
             (relative L2 of the two deltas, and of the two outputs); the yardstick is a second LoRA
             trained on the bf16 base from another initial seed
Random weights have no outlier channels; a real checkpoint's error can be larger (per-output-channel
scales follow each column's largest weight).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a CPU benchmark: no accelerator plugin is started

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from mochi_jax.lib import training  # noqa: E402
from mochi_jax.models import lora as lora_lib  # noqa: E402
from mochi_jax.models import quant  # noqa: E402
from mochi_jax.models.dit import DiTConfig, MochiDiT  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "quant_accuracy.json"
CONFIGS = {
    "tiny (depth 4, width 64)": dict(depth=4, num_heads=4, head_dim=16, text_width=32, t5_dim=32, time_embed_dim=32),
    "small (depth 8, width 512)": dict(depth=8, num_heads=8, head_dim=64, text_width=256, t5_dim=512,
                                       time_embed_dim=256),
}
FORMATS = ("bfloat16", "int8", "float8_e4m3fn")
# the yardstick of the transfer numbers: a second LoRA on the bf16 base from another initial seed
# (how far two LoRAs trained on the same base and data already differ)
RUNS = (("bfloat16", "bfloat16", 1), ("int8", "int8", 1), ("float8_e4m3fn", "float8_e4m3fn", 1),
        ("bfloat16, LoRA seed 2", "bfloat16", 2))
# --smoke: the tiny config alone, 2 steps, without float8 (the same code as int8, another compile of each program)
SMOKE_CONFIG, SMOKE_STEPS, SMOKE_RUNS = "tiny (depth 4, width 64)", 2, ("bfloat16", "int8", "bfloat16, LoRA seed 2")
TARGETS = {"attn": dict(pattern=r"attn/(qkv|proj)_[xy]$", rank=8, alpha=8.0),
           "mlp": dict(pattern=r"mlp_x/w2$", rank=8, alpha=8.0)}


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def inputs(cfg, seed, b=2, t=2, h=8, w=12, L=16):
    rng = np.random.default_rng(seed)
    mask = np.zeros((b, L), bool)
    for i in range(b):
        mask[i, :4 + 5 * i] = True
    return (rng.standard_normal((b, cfg.in_channels, t, h, w)).astype(np.float32),
            rng.standard_normal((b, L, cfg.t5_dim)).astype(np.float32), mask,
            rng.uniform(0, 1000, (b,)).astype(np.float32))


def clip(cfg, seed, t=2, h=8, w=12, L=16):
    rng = np.random.default_rng(seed)
    mask = np.zeros((1, L), bool)
    mask[0, :6] = True
    return {"mean": rng.standard_normal((1, 12, t, h, w)).astype(np.float32),
            "logvar": np.full((1, 12, t, h, w), -8.0, np.float32),
            "t5_feats": rng.standard_normal((1, L, cfg.t5_dim)).astype(np.float32), "t5_mask": mask}


@functools.partial(jax.jit, static_argnums=1)  # one compile per format, not one per leaf and op
def base_params(params32, fmt):
    if fmt == "bfloat16":
        return jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params32)
    return quant.quantize_params(params32, fmt)


def run_config(name, arch, steps, runs=RUNS):
    cfg = DiTConfig(**arch, param_dtype="bfloat16", compute_dtype="bfloat16", remat="none")
    f32 = dataclasses.replace(cfg, param_dtype="float32", compute_dtype="float32")
    inp = inputs(cfg, 0)
    params32 = jax.jit(MochiDiT(f32).init)(jax.random.PRNGKey(0), *inp)["params"]
    ref = np.asarray(jax.jit(MochiDiT(f32).apply)({"params": params32}, *inp))
    targets = lora_lib.targets_from_config(TARGETS)
    opt = training.make_optimizer(ml_collections.ConfigDict(dict(
        lr=1e-2, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, warmup_steps=0, schedule="constant", decay_steps=1,
        grad_clip=0.0, grad_accum=1)))
    clips = [clip(cfg, 10 + i) for i in range(2)]
    out, loras, outs = {}, {}, {}
    stacked = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *[clips[i % 2] for i in range(8)])

    def fixed_loss(model):
        @jax.jit
        def f(lora, params):  # 8 fixed (clip, noise) draws, one traced DiT call mapped over them
            def one(args):
                c, k = args
                return training.flow_loss(model, params, lora, c, training.draw_noise(k, c))
            return jnp.mean(jax.lax.map(one, (stacked, jax.random.split(jax.random.PRNGKey(7), 8))))
        return f

    programs = {}  # per base format, compiled once: (model, base params, output, fixed-noise loss, train step)

    def of(fmt):
        if fmt not in programs:
            qcfg = dataclasses.replace(cfg, param_dtype=fmt)
            model, params = MochiDiT(qcfg, targets), base_params(params32, fmt)
            programs[fmt] = (model, params, np.asarray(jax.jit(MochiDiT(qcfg).apply)({"params": params}, *inp)),
                             fixed_loss(model), training.make_train_step(model, opt, "normalized", 0.0))
        return programs[fmt]

    bf16_model, bf16_params, _, bf16_loss, _ = of("bfloat16")
    bf16_apply = jax.jit(bf16_model.apply)
    for label, fmt, seed in runs:
        t0 = time.time()
        model, params, pred, loss, step = of(fmt)
        lora = training.init_lora(model, jax.random.PRNGKey(seed))
        state = {"step": jnp.zeros((), jnp.int32), "lora": lora, "opt": opt.init(lora), "rng": jax.random.PRNGKey(2)}
        start = float(loss(state["lora"], params))
        curve = []
        for i in range(steps):
            state, m = step(state, params, clips[i % 2])
            curve.append(float(m["loss"]))
        loras[label] = state["lora"]
        outs[label] = np.asarray(bf16_apply({"params": bf16_params, "lora": state["lora"]}, *inp))
        out[label] = {"output_rel_l2_vs_fp32": rel_l2(pred, ref),
                      "loss_start": start, "loss_end": float(loss(state["lora"], params)),
                      "train_loss_last10": float(np.mean(curve[-10:])),
                      "on_bf16_base_loss_end": float(bf16_loss(state["lora"], bf16_params)),
                      "seconds": round(time.time() - t0, 1)}
        out[label]["_pred"] = pred
    no_lora = np.asarray(bf16_apply(
        {"params": bf16_params, "lora": jax.tree_util.tree_map(jnp.zeros_like, loras["bfloat16"])}, *inp))
    preds = {label: out[label].pop("_pred") for label, _, _ in runs}
    for label, _, _ in runs:
        r = out[label]
        r["output_rel_l2_vs_bf16"] = rel_l2(preds[label], preds["bfloat16"])
        r["transfer_output_rel_l2"] = rel_l2(outs[label], outs["bfloat16"])
        r["transfer_delta_rel_l2"] = rel_l2(outs[label] - no_lora, outs["bfloat16"] - no_lora)
    return {"config": arch, "steps": steps, "formats": out}


def show(data):
    print(f"\n{'config':28} {'base':22} {'out err':>8} {'vs bf16':>8} {'loss start':>10} {'loss end':>9} "
          f"{'on bf16':>8} {'delta err':>9}")
    for name, r in data["configs"].items():
        for fmt, v in r["formats"].items():
            print(f"{name:28} {fmt:22} {v['output_rel_l2_vs_fp32']:8.4f} {v['output_rel_l2_vs_bf16']:8.4f} "
                  f"{v['loss_start']:10.4f} {v['loss_end']:9.4f} {v['on_bf16_base_loss_end']:8.4f} "
                  f"{v['transfer_delta_rel_l2']:9.4f}")
    print("out err: DiT output vs the float32 model; vs bf16: vs the bf16 base; loss: fixed-noise flow loss before / "
          "after LoRA training on this base; on bf16: that LoRA on the bf16 base; delta err: its change of the bf16 "
          "model's output vs the bf16-trained LoRA's change (relative L2); 'LoRA seed 2': a second LoRA on the bf16 "
          "base from another initial seed, the yardstick of how much two LoRAs differ anyway")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--show", action="store_true", help="print the saved results")
    p.add_argument("--out", type=Path, help=f"the JSON file (default {RESULTS.relative_to(ROOT)})")
    p.add_argument("--smoke", action="store_true",
                   help=f"the smallest run ({SMOKE_CONFIG} alone, {SMOKE_STEPS} steps, bases {SMOKE_RUNS}), to "
                        "check that it runs")
    args = p.parse_args()
    out = args.out or (Path(tempfile.gettempdir()) / "quant_accuracy_smoke.json" if args.smoke else RESULTS)
    if args.show:
        show(json.loads(out.read_text()))
        return
    configs = {SMOKE_CONFIG: CONFIGS[SMOKE_CONFIG]} if args.smoke else CONFIGS
    runs = [r for r in RUNS if r[0] in SMOKE_RUNS] if args.smoke else RUNS
    if args.smoke:
        args.steps = SMOKE_STEPS
    data = {"setup": f"random weights, bf16 compute, rank-8 LoRA on attn qkv/proj and mlp_x.w2, {args.steps} AdamW "
                     "steps at lr 1e-2 on 2 fixed clips (latents 2x8x12, 16 text tokens)", "configs": {}}
    for name, arch in configs.items():
        data["configs"][name] = run_config(name, arch, args.steps, runs)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=1) + "\n")
    show(data)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
