#!/usr/bin/env python
"""`mochi_jax.prepare` throughput: reading threads ahead of the encoders vs one clip at a time.

    python benchmarks/prepare_throughput.py [--clips 12] [--source 1080x1920] [--source-frames 40]
        [--workers 1,2,4] [--num-frames 25] [--bucket 48x80] [--out benchmarks/results/prepare_throughput.json]
    python benchmarks/prepare_throughput.py --smoke --out /tmp/prepare_throughput.json   # 2 tiny clips (the test)

Makes one folder of synthetic captioned clips (`--source` pixels, `--source-frames` frames at 30 fps;
or `--input` an existing folder), then prepares it into fresh caches with the same models: with
`workers=0` (each clip decoded and resized in the main thread when its turn comes, the path before
the reading threads) and with each `--workers` N (N threads decode and resize ahead while the main
thread encodes). The models are the demo's tiny random VAE and T5 unless --vae/--t5/--tokenizer name
converted checkpoints. Reports clips/s as prepare does (model loading and the first clip of each
shape, when XLA compiles, left out), the time per stage, the ratio, and whether the caches hold the
same numbers. Also times the frame resize itself, one --source frame to 480x848, against the dense
einsum it replaced. Prints a table and writes JSON (--out, default benchmarks/results/prepare_throughput.json
in the checkout; --smoke: a temporary folder unless --out is given).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's package, from any directory

import jax  # noqa: E402
import numpy as np  # noqa: E402

from mochi_jax.configs import prepare as prepare_config
from mochi_jax.demo import make_clips, write_demo_models  # noqa: E402
from mochi_jax.lib import preparation  # noqa: E402
from mochi_jax.lib.cache import Cache  # noqa: E402
from mochi_jax.lib.video import _Resizer  # noqa: E402

# --smoke: the smallest run (2 tiny clips, one reading thread), to check that it runs
SMOKE = dict(clips=2, source=(64, 96), source_frames=8, workers="1", num_frames=7, bucket=(16, 16))


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


def dense_resize(resizer, frame):
    """The resize before the banded filter: two dense einsums over the full weight matrices."""
    x = np.einsum("oh,hwc->owc", resizer.rows, frame.astype(np.float32))
    x = np.einsum("pw,owc->opc", resizer.cols, x)
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def resize_timing(source, target=(480, 848)) -> dict:
    frame = np.random.default_rng(0).integers(0, 256, (*source, 3), dtype=np.uint8)
    r = _Resizer(*source, target)
    out = {}
    for name, fn in (("banded", r), ("dense_einsum", lambda f: dense_resize(r, f))):
        fn(frame)
        t0 = time.perf_counter()
        got = fn(frame)
        out[f"{name}_s"] = time.perf_counter() - t0
        out[name] = got
    diff = int(np.abs(out.pop("banded").astype(int) - out.pop("dense_einsum")).max())
    return {"source": list(source), "target": list(target), **out, "max_difference": diff}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=12)
    ap.add_argument("--source", type=size, default=(1080, 1920), help="synthetic clip size HxW")
    ap.add_argument("--source-frames", type=int, default=40)
    ap.add_argument("--input", default="", help="an existing folder of captioned clips instead")
    ap.add_argument("--workers", default="1,2,4", help="reading thread counts to compare with 0")
    ap.add_argument("--num-frames", type=int, default=25)
    ap.add_argument("--bucket", type=size, default=(48, 80))
    ap.add_argument("--text-batch-size", type=int, default=8)
    ap.add_argument("--vae", default="")
    ap.add_argument("--t5", default="")
    ap.add_argument("--tokenizer", default="")
    ap.add_argument("--work-dir", default="", help="where the clips, demo models and caches go (default: a temp dir)")
    ap.add_argument("--out", help="the JSON file (default benchmarks/results/prepare_throughput.json)")
    ap.add_argument("--smoke", action="store_true", help=f"the smallest run, {SMOKE}, to check that it runs")
    args = ap.parse_args(argv)
    if args.smoke:  # the smoke sizes as defaults: flags given explicitly still win
        ap.set_defaults(**SMOKE)
        args = ap.parse_args(argv)

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

    counts = [int(w) for w in args.workers.split(",")]
    results = []
    for workers in [0] + counts:
        out = work / f"cache_workers{workers}"
        shutil.rmtree(out, ignore_errors=True)
        results.append(run(cfg, out, workers))
    one = results[0]
    diff = max(max_difference(work / "cache_workers0", work / f"cache_workers{w}") for w in counts)
    resize = resize_timing(args.source)

    print(f"\nprepare throughput: {one['clips']} clips of {args.source[0]}x{args.source[1]}, {args.source_frames} frames "
          f"-> {args.num_frames} frames at {args.bucket[0]}x{args.bucket[1]}; {jax.devices()[0].platform}, "
          f"{os.cpu_count()} CPU cores")
    stages = sorted({k for r in results for k in r["stages"]})
    print(f"{'path':<28}{'clips/s':>9}{'speed-up':>9}{'steady s':>10}" + "".join(f"{k[:18]:>20}" for k in stages))
    for r in results:
        name = "one at a time (workers=0)" if r["workers"] == 0 else f"reading threads ({r['workers']})"
        r["speedup"] = r["clips_per_s"] / max(one["clips_per_s"], 1e-9)
        print(f"{name:<28}{r['clips_per_s']:>9.2f}{r['speedup']:>8.2f}x{r['steady_s']:>10.1f}"
              + "".join(f"{r['stages'].get(k, 0.0):>20.2f}" for k in stages))
    print(f"the caches differ by at most {diff:.2e}")
    print(f"resize of one {args.source[0]}x{args.source[1]} frame to 480x848: banded {resize['banded_s'] * 1e3:.0f} ms, "
          f"dense einsum (before) {resize['dense_einsum_s'] * 1e3:.0f} ms ({resize['dense_einsum_s'] / resize['banded_s']:.0f}x), "
          f"outputs differ by at most {resize['max_difference']}")

    out = Path(args.out) if args.out else (Path(tempfile.gettempdir()) / "prepare_throughput_smoke.json"
                                           if args.smoke else ROOT / "benchmarks" / "results" / "prepare_throughput.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "clips": one["clips"], "source": list(args.source), "source_frames": args.source_frames,
        "num_frames": args.num_frames, "bucket": list(args.bucket), "models": "demo" if not args.vae else args.vae,
        "platform": jax.devices()[0].platform, "device": str(jax.devices()[0].device_kind),
        "cpu_count": os.cpu_count(), "machine": platform.platform(),
        "runs": results, "max_cache_difference": diff, "resize_1_frame": resize}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
