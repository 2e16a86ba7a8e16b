"""What a sweep costs: K LoRAs trained together on one base (configs/lora.py `sweep`) against K
separate runs, K = 1, 2, 4.

    python benchmarks/sweep_cost.py            # measured on this machine at a small size, and the
                                               # full-size memory from the ahead-of-time H100 compile
    python benchmarks/sweep_cost.py --no-full  # the small size only
    python benchmarks/sweep_cost.py --smoke --out /tmp/sweep_cost.json   # a 2-block DiT, K = 1, 2, no full size (the test)

Small size (run here, float32, random weights): a 4-block DiT (width 256) on 4x16x16 latents (256
tokens), one clip per step; the variants differ in rank (4 / 8) and learning rate. Per K: the sweep's
median s/step over `--steps` steps after its compile, s per variant-step, and the compiled memory
(arguments: base + state + batch; temporaries); against it K separate runs (each its own step:
K times the steps, and K bases in memory when they run side by side).
Full size (10 B base, bf16, rank-16 default targets, 37 frames 480x848, batch 1, remat full, cuDNN
attention): the compiled memory of the sweep step for one H100 from `mochi_jax.aot.fit` (the
`python -m mochi_jax.aot` check), needs the CUDA plugin (skipped, with the reason, without it).
Writes benchmarks/results/sweep_cost.json (--out; --smoke: a temporary folder unless --out is given) and
prints the tables.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from mochi_jax.aot import targets  # noqa: E402

targets.compile_only_environment()  # before jax is imported (here and in the compiles' child processes)
from aot_tables import in_child  # noqa: E402  (each full-size compile in a fresh process)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from mochi_jax.checkpoints import runs  # noqa: E402
from mochi_jax.configs import lora as lora_config  # noqa: E402
from mochi_jax.lib import sweep as sweep_lib  # noqa: E402
from mochi_jax.lib import training  # noqa: E402
from mochi_jax.models import lora as lora_lib  # noqa: E402
from mochi_jax.models.dit import DiTConfig, MochiDiT, dummy_inputs  # noqa: E402

GIB = 1024 ** 3
SMALL = DiTConfig(depth=4, num_heads=4, head_dim=64, text_width=128, t5_dim=128, param_dtype="float32",
                  compute_dtype="float32", remat="none")
VARIANTS = [("r4_lr1e-3", 4, 1e-3), ("r8_lr1e-3", 8, 1e-3), ("r4_lr3e-4", 4, 3e-4), ("r8_lr3e-4", 8, 3e-4)]
KS = (1, 2, 4)
# --smoke: the smallest run (a 2-block DiT of width 64, K = 1, 2, one timed step, no full size), to check that it runs
SMOKE = dict(cfg=DiTConfig(depth=2, num_heads=2, head_dim=32, text_width=64, t5_dim=64, time_embed_dim=64,
                           param_dtype="float32", compute_dtype="float32", remat="none"), ks=(1, 2))
SMOKE_STEPS = 1


def config(k: int):
    cfg = lora_config.get_config()
    cfg.optim.update(dict(warmup_steps=0, schedule="constant"))
    cfg.sweep.variants = {name: {"lora": {t: {"rank": r, "alpha": float(r)} for t in ("qkv", "out")},
                                 "optim": {"lr": lr}} for name, r, lr in VARIANTS[:k]}
    return cfg


def batch(i: int, t5_dim: int = SMALL.t5_dim):
    r = np.random.default_rng(i)
    return {"mean": r.standard_normal((1, 12, 4, 16, 16)).astype(np.float32),
            "logvar": r.uniform(-4, -1, (1, 12, 4, 16, 16)).astype(np.float32),
            "t5_feats": r.standard_normal((1, 16, t5_dim)).astype(np.float32),
            "t5_mask": (np.arange(16) < 9)[None]}


def memory(jitted, *args) -> dict:
    m = jitted.lower(*args).compile().memory_analysis()
    return {"argument_bytes": int(m.argument_size_in_bytes), "temp_bytes": int(m.temp_size_in_bytes)}


def small(steps: int, cfg: DiTConfig = SMALL, ks: tuple = KS) -> dict:
    """Every program compiled first, then timed in rounds (one step of each per round, medians), so
    a busy machine slows all of them alike."""
    params = jax.jit(MochiDiT(cfg).init)(jax.random.PRNGKey(0), *dummy_inputs(cfg))["params"]
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    programs = {}  # name -> [step, state, memory, first step s]
    for name, r, lr in VARIANTS[:max(ks)]:  # each variant alone
        vcfg = dict(runs.sweep_variants(config(max(ks))))[name]
        model = MochiDiT(cfg, lora_lib.targets_from_config(vcfg.lora.to_dict()))
        opt = training.make_optimizer(vcfg.optim)
        programs[name] = [training.make_train_step(model, opt, "normalized", 0.0),
                          training.init_state(model, opt, 0, one)]
    sweeps = {}
    for k in ks:
        sw = sweep_lib.from_config(config(k), cfg)
        model, opts = sweep_lib.model_of(sw, cfg), sweep_lib.optimizers(sw)
        sweeps[k] = sw
        programs[f"sweep{k}"] = [sweep_lib.make_step(sw, model, opts, "normalized", 0.0),
                                 sweep_lib.init_state(sw, cfg, opts, 0, one)]
    for p in programs.values():
        p.append(memory(p[0], p[1], params, batch(0, cfg.t5_dim)))
        t0 = time.perf_counter()
        p[1], out = p[0](p[1], params, batch(0, cfg.t5_dim))
        jax.block_until_ready(out)
        p.append(time.perf_counter() - t0)
    times = {name: [] for name in programs}
    for i in range(steps):
        for name, p in programs.items():
            t0 = time.perf_counter()
            p[1], out = p[0](p[1], params, batch(i + 1, cfg.t5_dim))
            jax.block_until_ready(out)
            times[name].append(time.perf_counter() - t0)
    res = {name: {"s_per_step": statistics.median(times[name]), "first_step_s": p[3], **p[2]}
           for name, p in programs.items()}
    out = {"base_bytes": sum(int(x.nbytes) for x in jax.tree_util.tree_leaves(params)),
           "alone": {n: res[n] for n, _, _ in VARIANTS[:max(ks)]}, "sweeps": {}}
    for k, sw in sweeps.items():
        c, separate = res[f"sweep{k}"], [res[n] for n in sw.names]
        sep_s = sum(x["s_per_step"] for x in separate)
        out["sweeps"][k] = {
            "variants": list(sw.names), **c, "s_per_variant_step": c["s_per_step"] / k,
            "separate_s_per_variant_step": sep_s / k, "speedup": sep_s / c["s_per_step"],
            # K separate runs side by side hold K bases, K states and K sets of temporaries
            "separate_side_by_side_bytes": sum(x["argument_bytes"] + x["temp_bytes"] for x in separate),
            "sweep_bytes": c["argument_bytes"] + c["temp_bytes"]}
    return out


def full() -> dict:
    if not targets.have_compiler("cuda"):
        return {"skipped": "the CUDA plugin (pip install 'jax[cuda12]') is not installed: no ahead-of-time GPU compile"}
    cells = {}
    for k, over in ((1, {}), (2, {"sweep.lr": "1e-4,3e-5"}), (4, {"sweep.rank": "8,16", "sweep.lr": "1e-4,3e-5"})):
        t0 = time.time()
        r = in_child({"aot.target": "h100", "model.attention": "cudnn", "model.remat": "full", "aot.num_frames": 37,
                      **over})
        cells[k] = {key: r.get(key) for key in ("argument_bytes", "temp_bytes", "output_bytes", "alias_bytes",
                                                "total_bytes", "limit_bytes", "fits", "compile_s", "inputs", "error")}
        cells[k]["overrides"] = over
        print(f"  full size, K={k}: {r.get('total_bytes', 0) / GIB:.2f} GiB ({time.time() - t0:.0f} s)", flush=True)
    return cells


def show(res: dict):
    s = res["small"]
    print(f"\nsmall size on {res['device']}: base {s['base_bytes'] / 2**20:.1f} MiB, median of {res['steps']} steps")
    print(f"{'K':>2} {'sweep s/step':>13} {'per variant':>12} {'separate':>10} {'speed-up':>9} "
          f"{'sweep MiB':>10} {'K runs MiB':>11}")
    for k, c in s["sweeps"].items():
        print(f"{k:>2} {c['s_per_step']:>13.4f} {c['s_per_variant_step']:>12.4f} {c['separate_s_per_variant_step']:>10.4f} "
              f"{c['speedup']:>8.2f}x {c['sweep_bytes'] / 2**20:>10.1f} {c['separate_side_by_side_bytes'] / 2**20:>11.1f}")
    f = res.get("full", {})
    if "skipped" in f:
        print(f"full size: skipped: {f['skipped']}")
    elif f:
        print("full size, one H100 (ahead-of-time compile), 37 frames 480x848, remat full, cuDNN:")
        for k, c in f.items():
            if c.get("error"):
                print(f"  K={k}: {c['error']}")
                continue
            inp = c["inputs"]
            print(f"  K={k}: {c['total_bytes'] / GIB:.2f} GiB total = weights {inp['frozen weights'] / GIB:.2f} + "
                  f"train state {inp['train state (donated)'] / GIB:.2f} + batch {inp['batch'] / GIB:.3f} + "
                  f"temporaries {c['temp_bytes'] / GIB:.2f} (+ outputs not aliased)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--no-full", action="store_true", help="skip the full-size ahead-of-time compiles")
    ap.add_argument("--out", help="the JSON file (default benchmarks/results/sweep_cost.json)")
    ap.add_argument("--smoke", action="store_true",
                    help="the smallest run (a 2-block DiT of width 64, K = 1, 2, one timed step; no full-size compile), "
                         "to check that it runs")
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.no_full = SMOKE_STEPS, True
    out = Path(args.out) if args.out else (Path(tempfile.gettempdir()) / "sweep_cost_smoke.json" if args.smoke
                                           else ROOT / "benchmarks" / "results" / "sweep_cost.json")
    res = {"device": str(jax.devices()[0].device_kind), "steps": args.steps,
           "small": small(args.steps, **(SMOKE if args.smoke else {}))}
    if not args.no_full:
        res["full"] = full()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    show(res)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
