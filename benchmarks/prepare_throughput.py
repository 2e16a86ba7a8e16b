#!/usr/bin/env python
"""`mochi_jax.prepare` throughput: reading threads ahead of the encoders vs one clip at a time.

    python benchmarks/prepare_throughput.py [--clips 16] [--source 360x640] [--source-frames 40]
        [--workers 4] [--num-frames 25] [--bucket 48x80] [--out benchmarks/results/prepare_throughput.json]

Makes one folder of synthetic captioned clips (`--source` pixels, `--source-frames` frames at 30 fps;
or `--input` an existing folder), then prepares it twice into fresh caches with the same models: with
`workers=0` (each clip decoded and resized in the main thread when its turn comes, the path before
the reading threads) and with `workers=N` (N threads decode and resize ahead while the main thread
encodes). The models are the demo's tiny random VAE and T5 unless --vae/--t5/--tokenizer name
converted checkpoints. Reports clips/s as prepare does (model loading and the first clip of each
shape, when XLA compiles, left out), the time per stage, the ratio, and whether the two caches hold
the same numbers. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from mochi_jax.configs import prepare as prepare_config
from mochi_jax.demo import make_clips, write_demo_models
from mochi_jax.lib import preparation
from mochi_jax.lib.cache import Cache


def size(text: str) -> tuple[int, int]:
    h, w = text.lower().split("x")
    return int(h), int(w)


def run(cfg, out: Path, workers: int) -> dict:
    cfg = cfg.copy_and_resolve_references()
    cfg.output_dir, cfg.workers = str(out), workers
    t0 = time.perf_counter()
    report = preparation.prepare(cfg)
    timing = report["timing"]
    return {"workers": workers, "clips": len(report["new"]), "total_s": time.perf_counter() - t0, **timing}


def max_difference(a: Path, b: Path) -> float:
    ca, cb = Cache(a), Cache(b)
    assert [e["name"] for e in ca.entries] == [e["name"] for e in cb.entries]
    return max(float(np.abs(ca[i][k] - cb[i][k]).max()) for i in range(len(ca)) for k in ("mean", "logvar", "t5_feats"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=16)
    ap.add_argument("--source", type=size, default=(360, 640), help="synthetic clip size HxW")
    ap.add_argument("--source-frames", type=int, default=40)
    ap.add_argument("--input", default="", help="an existing folder of captioned clips instead")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--num-frames", type=int, default=25)
    ap.add_argument("--bucket", type=size, default=(48, 80))
    ap.add_argument("--text-batch-size", type=int, default=8)
    ap.add_argument("--vae", default="")
    ap.add_argument("--t5", default="")
    ap.add_argument("--tokenizer", default="")
    ap.add_argument("--work-dir", default="", help="where the clips, demo models and caches go (default: a temp dir)")
    ap.add_argument("--out", default="benchmarks/results/prepare_throughput.json")
    args = ap.parse_args()

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="prepare_bench_"))
    src = Path(args.input) if args.input else work / "clips"
    if not args.input and not (src.is_dir() and any(src.glob("*.mp4"))):
        t0 = time.perf_counter()
        make_clips(src, n=args.clips, num_frames=args.source_frames, size=args.source, seed=0)
        print(f"made {args.clips} clips of {args.source_frames} frames at {args.source[0]}x{args.source[1]} in "
              f"{time.perf_counter() - t0:.1f} s")
    models = write_demo_models(work / "models") if not args.vae else {}
    cfg = prepare_config.get_config()
    cfg.input_dir = str(src)
    cfg.vae, cfg.t5, cfg.tokenizer = (args.vae or str(models["vae"]), args.t5 or str(models["t5"]),
                                      args.tokenizer or str(models["tokenizer"]))
    cfg.num_frames, cfg.buckets, cfg.text_batch_size = args.num_frames, (args.bucket,), args.text_batch_size
    if not args.vae:
        cfg.tile_size, cfg.tile_overlap = (32, 32), (16, 16)

    results = []
    for workers in (0, args.workers):
        out = work / f"cache_workers{workers}"
        shutil.rmtree(out, ignore_errors=True)
        results.append(run(cfg, out, workers))
    one, piped = results
    diff = max_difference(work / "cache_workers0", work / f"cache_workers{args.workers}")

    print(f"\nprepare throughput: {one['clips']} clips of {args.source[0]}x{args.source[1]} -> {args.num_frames} frames "
          f"at {args.bucket[0]}x{args.bucket[1]}; {jax.devices()[0].platform}, {os.cpu_count()} CPU cores")
    stages = sorted({k for r in results for k in r["stages"]})
    head = f"{'path':<26}{'clips/s':>9}{'steady s':>10}{'wall s':>8}" + "".join(f"{k[:22]:>24}" for k in stages)
    print(head)
    for r, name in ((one, "one at a time (workers=0)"), (piped, f"reading threads ({args.workers})")):
        print(f"{name:<26}{r['clips_per_s']:>9.2f}{r['steady_s']:>10.1f}{r['wall_s']:>8.1f}"
              + "".join(f"{r['stages'].get(k, 0.0):>24.2f}" for k in stages))
    ratio = piped["clips_per_s"] / max(one["clips_per_s"], 1e-9)
    print(f"speed-up {ratio:.2f}x; the two caches differ by at most {diff:.2e}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "clips": one["clips"], "source": list(args.source), "source_frames": args.source_frames,
        "num_frames": args.num_frames, "bucket": list(args.bucket), "models": "demo" if not args.vae else args.vae,
        "platform": jax.devices()[0].platform, "device": str(jax.devices()[0].device_kind),
        "cpu_count": os.cpu_count(), "machine": platform.platform(),
        "one_at_a_time": one, "pipelined": piped, "speedup": ratio, "max_cache_difference": diff}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
