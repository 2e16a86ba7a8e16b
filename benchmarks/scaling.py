"""Scaling of the sharded LoRA train step: weak scaling on simulated devices, and per-device memory of
the full 10B model on device meshes, estimated analytically and checked against XLA.

    python benchmarks/scaling.py [--steps 30] [--per-device-batch 2] [--no-xla-check] [--out FILE]
    python benchmarks/scaling.py --smoke --out /tmp/scaling.json   # 1 step on 1 and 2 devices, one XLA check (the test)

1. Weak scaling: examples/s of the sharded train step (tiny DiT, float32, full remat) on 1, 2, 4, 8 simulated
   CPU devices at a fixed per-device batch, split over 'data' (weights replicated) or 'fsdp' (sharded). The
   simulated devices share the same physical cores, so this measures the SPMD program's overhead (collectives,
   resharding, padding), NOT hardware scaling: with fixed cores ideal examples/s is flat in n (ratio to 1
   device = 1, efficiency = ex/s(n) / (n ex/s(1)) = 1/n). Real numbers need GPUs/TPUs.
2. Memory: no allocation. Shapes from jax.eval_shape, per-device shards from sharding.param_shardings on
   an AbstractMesh. Per device (b samples per device, N visual tokens, n = ceil(N / sequence), L = 256 text
   tokens, w = 3072 / tw = 1536 widths, cb = bytes of the compute dtype, depth 48):
     weights     bf16 shard of the frozen base + one whole block (gathered by FSDP / sliced from the scan)
     LoRA        fp32 shard x 4: factors, gradient, Adam mu and nu (rank 16 on qkv_x/y, proj_x/y)
     residuals   b * depth * 4 * (n w + L tw)  (full remat: only each block's fp32 inputs x, y are kept)
     rope        4 * n * w                    (cos, sin of [N, heads, head_dim / 2], fp32)
     block       b * (18 cb + 28) * (n w + L tw): the tensors one block's backward keeps after its recompute
                 (x_in, q/k/v before and after norm+RoPE, attention out, projection out, MLP in, w1 out,
                 silu(a) g, w2 out: 18 elements per token and width in cb, plus fp32 norms and gradients)
     scores      attention='xla' only: b * (12 + cb) * (heads / sequence) * (N + L)^2 (fp32 logits, probs and
                 their gradient, probs in cb); 'cudnn' (flash, GPU) keeps O(N) instead. Ulysses attention
                 holds all N tokens of heads / sequence heads: the same bytes as n tokens of all heads.
     inputs      b * (8 latent-sized fp32 buffers + T5 features twice)
   Assumes XLA reuses buffers perfectly, all-gathers one block at a time and keeps nothing else; 'fits' means
   total <= 90% of the device (H100 80 GB, TPU v5p 95 GB) to leave room for fragmentation and runtime.
   Checked against compiled.memory_analysis() of the 'small' preset in float32 (XLA:CPU turns bf16
   matmuls into fp32 ones with fp32 weight copies, so a bf16 CPU compile says little about a GPU).
Prints tables and writes benchmarks/results/scaling.json (--out; --smoke: a temporary folder unless --out is given).
"""

import os

# 8 simulated CPU devices (before jax is imported), besides any XLA flags already set
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
os.environ["JAX_PLATFORMS"] = "cpu"

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's package, from any directory
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from mochi_jax.configs import dit as dit_presets  # noqa: E402
from mochi_jax.lib import training  # noqa: E402
from mochi_jax.models import sharding  # noqa: E402
from mochi_jax.demo import random_like  # noqa: E402
from mochi_jax.models import lora as lora_lib  # noqa: E402
from mochi_jax.models.dit import DiTConfig, MochiDiT, abstract_variables, logical_axes  # noqa: E402

GB, MB = 1e9, 1e6
TINY = dict(depth=2, num_heads=4, head_dim=16, text_width=32, t5_dim=32, time_embed_dim=32)
OPTIM = ml_collections.ConfigDict(dict(lr=1e-4, weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8, warmup_steps=0,
                                       schedule="constant", decay_steps=10, grad_clip=0.0, grad_accum=1))
TARGETS = lora_lib.targets_from_config(lora_lib.REFERENCE_TARGETS)  # rank 16, alpha 16
FRAMES, TEXT_LEN, LATENT_HW = (37, 85, 163), 256, (60, 106)  # 480x848 pixels
DEVICES = {"H100": 80.0, "v5p": 95.0}  # GB per device; 'fits' = total <= 90% of it
# genmo's fine-tuner on one H100, GB (genmoai/mochi, demos/fine_tuner/README.md)
REFERENCE = {37: 50, 61: 64, 79: 78, 85: 80}
MESHES = {"1": {}, "fsdp2": dict(fsdp=2), "fsdp4": dict(fsdp=4), "fsdp8": dict(fsdp=8), "seq2": dict(sequence=2),
          "fsdp2 seq2": dict(fsdp=2, sequence=2), "fsdp4 seq2": dict(fsdp=4, sequence=2),
          "fsdp2 seq4": dict(fsdp=2, sequence=4), "seq8": dict(sequence=8), "fsdp8 seq8": dict(fsdp=8, sequence=8),
          "fsdp2 seq12": dict(fsdp=2, sequence=12)}
XLA_CHECK_MESHES = {"1": {}, "fsdp2 seq2": dict(fsdp=2, sequence=2)}
# --smoke: the smallest run (1 timed step on 1 and 2 devices, the XLA check on one device), to check that it runs
SMOKE = dict(steps=1, per_device_batch=1, devices=(2,), xla_meshes=("1",))


def batch(b, t, h, w, L, t5_dim, seed=0):
    rng = np.random.default_rng(seed)
    return {"mean": rng.standard_normal((b, 12, t, h, w)).astype(np.float32),
            "logvar": rng.uniform(-3, -1, (b, 12, t, h, w)).astype(np.float32),
            "t5_feats": rng.standard_normal((b, L, t5_dim)).astype(np.float32), "t5_mask": np.ones((b, L), bool)}


# ----------------------------------------------------------------------------- 1. weak scaling

def weak_scaling(per_device, steps, t=2, h=8, w=16, L=8, devices=(2, 4, 8)):
    cfg = DiTConfig(**TINY, param_dtype="float32", compute_dtype="float32", remat="full")
    host = random_like(abstract_variables(cfg)["params"], jax.random.PRNGKey(0))
    model, opt = MochiDiT(cfg, TARGETS), training.make_optimizer(OPTIM)
    rows = {}
    for mode, n in [("data", 1)] + [(m, k) for m in ("data", "fsdp") for k in devices]:
        mesh = sharding.make_mesh({mode: n}, devices=jax.devices()[:n])
        sh = training.train_shardings(model, opt, mesh)
        state, params = training.init_state(model, opt, 0, sh["state"]), jax.device_put(host, sh["params"])
        data = {k: jax.device_put(v, sh["batch"][k]) for k, v in batch(n * per_device, t, h, w, L, cfg.t5_dim).items()}
        step, times = training.make_train_step(model, opt, "normalized", 0.0, mesh, sh), []
        for _ in range(2 + steps):  # the first call compiles, the second warms up
            t0 = time.perf_counter()
            state, out = jax.block_until_ready(step(state, params, data))
            times.append(time.perf_counter() - t0)
        med = statistics.median(times[2:])
        rows[(mode, n)] = dict(devices=n, global_batch=n * per_device, compile_s=times[0], median_step_s=med,
                               examples_per_s=n * per_device / med)
    base = rows[("data", 1)]["examples_per_s"]  # fsdp=1 is the same program as data=1
    for (mode, n), r in rows.items():
        r.update(ratio_to_1=r["examples_per_s"] / base, efficiency=r["examples_per_s"] / (n * base))
    return dict(config=TINY, dtype="float32", remat="full", per_device_batch=per_device, latent=[12, t, h, w],
                visual_tokens_per_sample=t * h * w // 4, text_len=L, timed_steps=steps,
                rows={f"{m}{n}": r for (m, n), r in rows.items()})


# ----------------------------------------------------------------------------- 2. memory

def shard_bytes(tree, names, mesh):
    shardings = sharding.param_shardings(names, tree, mesh)
    return sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
               for s, x in zip(jax.tree_util.tree_leaves(shardings), jax.tree_util.tree_leaves(tree)))


def estimate(cfg, trees, sizes, t, h, w, per_device=1, text_len=TEXT_LEN):
    """Per-device bytes of the train step by component (see the module docstring); latents [12, t, h, w]."""
    params, lora = trees["params"], trees["lora"]
    names = logical_axes(cfg, TARGETS)
    mesh = jax.sharding.AbstractMesh(tuple(sizes.get(a, 1) for a in sharding.AXES), sharding.AXES)
    s, cb, b, L = sizes.get("sequence", 1), jnp.dtype(cfg.compute_dtype).itemsize, per_device, text_len
    N = t * (h // cfg.patch_size) * (w // cfg.patch_size)
    n = -(-N // s)
    width, tw = cfg.width, cfg.text_width
    block = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params["blocks"])) // (cfg.depth - 1)
    elems = n * width + L * tw  # elements of one block input (both streams) on this device
    out = {"weights": shard_bytes(params, names["params"], mesh) + block,
           "lora_adam": 4 * shard_bytes(lora, names["lora"], mesh),
           "residuals": b * cfg.depth * 4 * elems, "rope": 4 * n * width, "block": b * (18 * cb + 28) * elems,
           "inputs": b * 4 * (8 * 12 * t * h * w + 2 * L * cfg.t5_dim)}
    scores = b * (12 + cb) * (cfg.num_heads // s) * (N + L) ** 2
    out["total_flash"] = sum(out.values())
    out["scores_xla"], out["total_xla"] = scores, out["total_flash"] + scores
    return dict(out, visual_tokens=N, tokens_per_device=n)


def memory_tables():
    cfg = DiTConfig.from_dict(dit_presets.get_config("mochi"))
    trees = abstract_variables(cfg, TARGETS)
    rows = {}
    for name, sizes in MESHES.items():
        for f in FRAMES:
            e = estimate(cfg, trees, sizes, (f - 1) // 6 + 1, *LATENT_HW)
            fits = {f"fits_{d}_{a}": e[f"total_{a}"] <= 0.9 * cap * GB for d, cap in DEVICES.items()
                    for a in ("flash", "xla")}
            rows[f"{name}/{f}"] = dict(e, mesh=sizes, frames=f, devices=math.prod(sizes.values()),
                                       global_batch=sizes.get("fsdp", 1) * sizes.get("data", 1), **fits)
    formula = __doc__[__doc__.index("2. Memory"):__doc__.index("   Checked against")]
    return dict(model="mochi (10B), bf16 weights and compute, remat full, LoRA rank 16", formula=formula,
                per_device_batch=1, latent_hw=LATENT_HW, text_len=TEXT_LEN, capacity_gb=DEVICES, fit_fraction=0.9,
                reference_one_h100_gb=REFERENCE, rows=rows)


def xla_check(t=4, h=16, w=32, L=64, meshes=tuple(XLA_CHECK_MESHES)):
    """memory_analysis() of the compiled step ('small' preset, float32) at depth 4 and 8 vs the estimate."""
    out = {}
    for name in meshes:
        sizes = XLA_CHECK_MESHES[name]
        nd, gb = math.prod(sizes.values()), sizes.get("fsdp", 1)
        res = {}
        for depth in (4, 8):
            cfg = DiTConfig.from_dict({**dit_presets.get_config("small"), "depth": depth, "param_dtype": "float32",
                                       "compute_dtype": "float32"})
            model, opt, trees = MochiDiT(cfg, TARGETS), training.make_optimizer(OPTIM), abstract_variables(
                cfg, TARGETS)
            mesh = sharding.make_mesh(sizes, devices=jax.devices()[:nd])
            sh = training.train_shardings(model, opt, mesh)
            one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            state = jax.eval_shape(lambda: training.init_state(model, opt, 0, one))
            data = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch(gb, t, h, w, L, cfg.t5_dim).items()}
            with sharding.activate(mesh):
                m = training.make_train_step(model, opt, "normalized", 0.0, mesh, sh).jitted.lower(
                    state, trees["params"], data).compile().memory_analysis()
            xla = m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            est = estimate(cfg, trees, sizes, t, h, w, text_len=L)
            res[depth] = dict(xla_total=xla, xla_temp=m.temp_size_in_bytes, xla_argument=m.argument_size_in_bytes,
                              estimate_total=est["total_xla"], estimate=est, ratio=xla / est["total_xla"])
        temp = {d: res[d]["estimate"]["residuals"] + res[d]["estimate"]["lora_adam"] / 4 for d in (4, 8)}
        res.update(per_block_xla=(res[8]["xla_total"] - res[4]["xla_total"]) / 4,
                   per_block_estimate=(res[8]["estimate_total"] - res[4]["estimate_total"]) / 4,
                   per_block_temp_xla=(res[8]["xla_temp"] - res[4]["xla_temp"]) / 4,
                   per_block_temp_estimate=(temp[8] - temp[4]) / 4)  # saved residuals + LoRA gradient
        out[name] = res
    return dict(preset="small", dtype="float32", latent=[12, t, h, w], text_len=L, attention="xla", meshes=out)


# ----------------------------------------------------------------------------- report

def report(ws, mem, check):
    print(f"1. Weak scaling, {ws['per_device_batch']} sample(s) per device ({ws['visual_tokens_per_sample']} visual "
          f"tokens), tiny DiT {TINY}, float32, remat full, {ws['timed_steps']} timed steps (median)")
    print(f"   SIMULATED CPU devices sharing the same {os.cpu_count()} physical cores: this measures SPMD overhead "
          "(collectives, resharding,\n   padding), not hardware scaling. No overhead: ratio to 1 device ~ 1 and "
          "efficiency ~ 1/n (above 1 where one\n   device leaves a core idle). Real scaling numbers need GPUs/TPUs.")
    print(f"   {'mesh':8s} {'devices':>7s} {'batch':>5s} {'compile s':>9s} {'step s':>7s} {'ex/s':>7s} "
          f"{'ratio to 1':>10s} {'efficiency':>10s}")
    for k, r in ws["rows"].items():
        print(f"   {k:8s} {r['devices']:7d} {r['global_batch']:5d} {r['compile_s']:9.2f} {r['median_step_s']:7.4f} "
              f"{r['examples_per_s']:7.2f} {r['ratio_to_1']:10.2f} {r['efficiency']:10.2f}")
    rows = mem["rows"]
    print("\n2. Per-device memory of the LoRA train step, full Mochi (10B), 480x848, 1 sample per device, GB "
          "(analytical; H = fits 90% of an 80 GB H100, V = of a 95 GB TPU v5p)")
    print("   flash: attention='cudnn' (GPU); xla: attention='xla' (TPU today: no flash kernel in the repo)")
    toks = {f: rows[f"1/{f}"]["visual_tokens"] for f in FRAMES}
    head = "".join(f" {f'{f} f ({toks[f]} tok) flash / xla':>32s}" for f in FRAMES)
    print(f"   {'mesh':11s} {'dev':>3s} {'batch':>5s}{head}")
    for name in MESHES:
        cells = []
        for f in FRAMES:
            r = rows[f"{name}/{f}"]
            for a in ("flash", "xla"):
                mark = ("H" if r[f"fits_H100_{a}"] else "-") + ("V" if r[f"fits_v5p_{a}"] else "-")
                cells.append(f"{r[f'total_{a}'] / GB:7.1f} {mark}")
        r = rows[f"{name}/{FRAMES[0]}"]
        print(f"   {name:11s} {r['devices']:3d} {r['global_batch']:5d}" + "".join(
            f"     {cells[2 * i]} / {cells[2 * i + 1]}" for i in range(len(FRAMES))))
    comps = ("weights", "lora_adam", "residuals", "rope", "block", "inputs", "total_flash", "scores_xla")
    print(f"\n   components on one device, GB: {'frames':>6s} " + " ".join(f"{c:>11s}" for c in comps)
          + "  reference fine-tuner (PyTorch, one H100)")
    for f in FRAMES:
        r = rows[f"1/{f}"]
        print(f"   {'':30s} {f:6d} " + " ".join(f"{r[c] / GB:11.2f}" for c in comps)
              + f"  {REFERENCE.get(f, 'n/a')}")
    if check:
        print(f"\n   XLA check: compiled memory_analysis (argument + temp + output - alias) vs the estimate, "
              f"'small' preset in float32, latent {check['latent']}, {check['text_len']} text tokens, attention xla")
        for name, res in check["meshes"].items():
            for d in (4, 8):
                print(f"   mesh {name:10s} depth {d}: XLA {res[d]['xla_total'] / MB:7.1f} MB, estimate "
                      f"{res[d]['estimate_total'] / MB:7.1f} MB (XLA / estimate {res[d]['ratio']:.2f})")
            print(f"   mesh {name:10s} per block: XLA {res['per_block_xla'] / MB:6.2f} MB, estimate "
                  f"{res['per_block_estimate'] / MB:6.2f} MB; of it temp (saved residuals + LoRA gradient): "
                  f"XLA {res['per_block_temp_xla'] / MB:5.2f} MB, estimate "
                  f"{res['per_block_temp_estimate'] / MB:5.2f} MB")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--per-device-batch", type=int, default=2)
    ap.add_argument("--no-xla-check", action="store_true")
    ap.add_argument("--out", help="the JSON file (default benchmarks/results/scaling.json)")
    ap.add_argument("--smoke", action="store_true", help=f"the smallest run, {SMOKE}, to check that it runs")
    args = ap.parse_args(argv)
    if args.smoke:  # the smoke sizes as defaults: flags given explicitly still win
        ap.set_defaults(**{k: SMOKE[k] for k in ("steps", "per_device_batch")})
        args = ap.parse_args(argv)
    ws = weak_scaling(args.per_device_batch, args.steps, **({"devices": SMOKE["devices"]} if args.smoke else {}))
    mem = memory_tables()
    check = None if args.no_xla_check else xla_check(**({"meshes": SMOKE["xla_meshes"]} if args.smoke else {}))
    report(ws, mem, check)
    out = Path(args.out) if args.out else (Path(tempfile.gettempdir()) / "scaling_smoke.json" if args.smoke
                                           else ROOT / "benchmarks" / "results" / "scaling.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(cpus=os.cpu_count(), jax=jax.__version__, weak_scaling=ws, memory=mem,
                                   xla_check=check), indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
