#!/usr/bin/env python
"""Mochi VAE benchmark: speed against diffusers, and peak memory of tiled vs untiled decoding.

    python benchmarks/vae.py [--repeats 5] [--out benchmarks/results/vae.json]
    python benchmarks/vae.py --smoke --out /tmp/vae.json   # tiny models and clips, one repeat (the test)

1. Speed: encode and decode of one small random model (same weights in both frameworks, fp32,
   on whatever device JAX and torch use; torch runs on CPU here) -> seconds per call (median of
   --repeats after a warm-up; JAX compile time reported separately) and the ratio torch / JAX.
2. Memory: the released architecture (459.7 M parameters, fp32, never allocated: parameters
   are abstract) compiled for 480 x 848 clips of growing length; peak bytes from XLA's
   compiled memory analysis (arguments + outputs + temporaries - aliased), tiled vs untiled,
   for decode and encode.
Prints a table and writes JSON (--out; --smoke: a temporary folder unless --out is given). --smoke runs
both parts at the smallest setting, to check that they run: the speed part at SMOKE_SPEED, the memory part
with a small random VAE (not the released one) tiled into 32-pixel tiles, one short clip.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# from any directory: the checkout's package and its reference harnesses (tests/harness/vae_ref.py)
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "harness")]

from mochi_jax.models import vae as V  # noqa: E402

SPEED_CONFIG = dict(encoder_channels=(64, 64, 128, 128), decoder_channels=(64, 128, 128, 128),
                    layers_per_block=(1, 1, 1, 1, 1))
SPEED_CLIP = (1, 13, 64, 96)  # B, frames, H, W
MEMORY_FRAMES = (7, 19, 43, 85, 163)
MEMORY_SIZE = (480, 848)
# --smoke: the speed part at a tiny config and clip, the memory part with the same tiny architecture
SMOKE_ARCH = dict(encoder_channels=(32, 32, 64, 64), decoder_channels=(32, 64, 64, 64), layers_per_block=(1,) * 5)
SMOKE_SPEED = dict(config=SMOKE_ARCH, clip=(1, 7, 32, 48), torch_threads=1)
SMOKE_MEMORY = dict(frames_list=(7,), size=(48, 64), arch=dict(SMOKE_ARCH, tile_size=(32, 32), tile_overlap=(16, 16)))


def _median_time(fn, repeats):
    fn()  # warm-up (and compile)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def speed(repeats: int, config: dict = SPEED_CONFIG, clip: tuple = SPEED_CLIP, torch_threads: int = 0) -> dict:
    import torch
    from vae_ref import make_reference, params_from_state_dict, rel_l2, state_dict_np

    torch.set_num_threads(torch_threads or os.cpu_count() or 1)
    cfg = V.VAEConfig(**config)
    model = make_reference(cfg)
    params = params_from_state_dict(cfg, state_dict_np(model))
    b, frames, h, w = clip
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (b, 3, frames, h, w)).astype(np.float32)
    z = rng.standard_normal((b, 12, V.latent_frames(frames), h // 8, w // 8)).astype(np.float32)
    xt, zt = torch.from_numpy(x), torch.from_numpy(z)

    enc = jax.jit(functools.partial(V.encode, cfg=cfg))
    dec = jax.jit(functools.partial(V.decode, cfg=cfg))
    xj, zj = jnp.asarray(x), jnp.asarray(z)
    t0 = time.perf_counter()
    enc.lower(params, xj).compile()
    enc_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    dec.lower(params, zj).compile()
    dec_compile = time.perf_counter() - t0

    out = {"config": {k: list(v) for k, v in config.items()}, "clip_BTHW": list(clip),
           "jax_device": str(jax.devices()[0]), "torch_threads": torch.get_num_threads(), "rows": []}
    with torch.no_grad():
        ref_mean = model.encode(xt).latent_dist.mean.numpy()
        ref_pix = model.decode(zt).sample.numpy()
        t_torch_enc = _median_time(lambda: model.encode(xt), repeats)
        t_torch_dec = _median_time(lambda: model.decode(zt), repeats)
    t_jax_enc = _median_time(lambda: jax.block_until_ready(enc(params, xj)), repeats)
    t_jax_dec = _median_time(lambda: jax.block_until_ready(dec(params, zj)), repeats)
    err_enc = rel_l2(enc(params, xj)[0], ref_mean)
    err_dec = rel_l2(dec(params, zj), ref_pix)
    for name, tj, tt, comp, err in (("encode", t_jax_enc, t_torch_enc, enc_compile, err_enc),
                                    ("decode", t_jax_dec, t_torch_dec, dec_compile, err_dec)):
        out["rows"].append({"op": name, "jax_s": tj, "torch_s": tt, "torch_over_jax": tt / tj,
                            "jax_compile_s": comp, "rel_l2_vs_torch": err})
    return out


def _peak(fn, *args) -> dict:
    m = jax.jit(fn).lower(*args).compile().memory_analysis()
    peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    gib = 2.0 ** 30
    return {"peak_gib": peak / gib, "temp_gib": m.temp_size_in_bytes / gib,
            "args_gib": m.argument_size_in_bytes / gib, "out_gib": m.output_size_in_bytes / gib}


def memory(frames_list=MEMORY_FRAMES, size=MEMORY_SIZE, arch: dict | None = None) -> dict:
    """`arch`: VAEConfig fields instead of the released architecture (--smoke)."""
    cfg = V.VAEConfig(**(arch or {}))
    shapes = jax.eval_shape(lambda: V.init(jax.random.PRNGKey(0), cfg))
    dec_params, enc_params = {"decoder": shapes["decoder"]}, {"encoder": shapes["encoder"]}
    h, w = size
    rows = []
    for frames in frames_list:
        t = V.latent_frames(frames)
        z = jax.ShapeDtypeStruct((1, 12, t, h // 8, w // 8), jnp.float32)
        x = jax.ShapeDtypeStruct((1, 3, frames, h, w), jnp.float32)
        for op, fn, params, arg in (("decode", V.decode, dec_params, z), ("encode", V.encode, enc_params, x)):
            for tiled in (False, True):
                r = _peak(functools.partial(fn, cfg=cfg, tiled=tiled), params, arg)
                rows.append({"op": op, "tiled": tiled, "frames": frames, "latent_frames": t, **r})
    knobs = {k: getattr(cfg, k) for k in ("tile_size", "tile_overlap", "chunk_frames")}
    out = {"size_HW": list(size), "dtype": "float32", "tiling": knobs, "backend": jax.default_backend(), "rows": rows}
    if arch:
        out["architecture"] = {k: list(v) for k, v in arch.items() if k in V.VAEConfig.ARCH_FIELDS}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", help="the JSON file (default benchmarks/results/vae.json)")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="the smallest run, to check that it runs (see above)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.repeats = 1

    result = {"host": platform.node(), "cpu_count": os.cpu_count(), "jax": jax.__version__}
    if not args.skip_speed:
        s = speed(args.repeats, **(SMOKE_SPEED if args.smoke else {}))
        result["speed"] = s
        print(f"\nSpeed, small random VAE {s['config']}, clip B,T,H,W = {s['clip_BTHW']} "
              f"(JAX on {s['jax_device']}, torch CPU x{s['torch_threads']} threads)")
        print(f"{'op':8s} {'jax s':>9s} {'torch s':>9s} {'torch/jax':>10s} {'compile s':>10s} {'rel L2':>9s}")
        for r in s["rows"]:
            print(f"{r['op']:8s} {r['jax_s']:9.3f} {r['torch_s']:9.3f} {r['torch_over_jax']:10.2f} "
                  f"{r['jax_compile_s']:10.1f} {r['rel_l2_vs_torch']:9.1e}")
    if not args.skip_memory:
        m = memory(**(SMOKE_MEMORY if args.smoke else {}))
        result["memory"] = m
        arch = "a small random VAE" if args.smoke else "released VAE"
        print(f"\nPeak memory (GiB, XLA compiled memory analysis on {m['backend']}), {arch} fp32, "
              f"{m['size_HW'][0]}x{m['size_HW'][1]}, tiling {m['tiling']}")
        print(f"{'op':8s} {'frames':>6s} {'untiled':>9s} {'tiled':>9s} {'tiled temp':>11s}")
        rows = m["rows"]
        for op in ("decode", "encode"):
            for frames in sorted({r["frames"] for r in rows}):
                u = next(r for r in rows if r["op"] == op and r["frames"] == frames and not r["tiled"])
                t = next(r for r in rows if r["op"] == op and r["frames"] == frames and r["tiled"])
                print(f"{op:8s} {frames:6d} {u['peak_gib']:9.2f} {t['peak_gib']:9.2f} {t['temp_gib']:11.2f}")
    out = Path(args.out) if args.out else (Path(tempfile.gettempdir()) / "vae_smoke.json" if args.smoke
                                           else ROOT / "benchmarks" / "results" / "vae.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
