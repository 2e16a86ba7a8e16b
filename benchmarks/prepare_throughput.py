#!/usr/bin/env python
"""`mochi_jax.prepare` throughput: ffmpeg's scaler vs the numpy one, and reading threads ahead of the
encoders vs one clip at a time.

    python benchmarks/prepare_throughput.py [--clips 12] [--source 1080x1920] [--source-frames 40]
        [--workers 1,2,4] [--compare-workers 0,2] [--num-frames 25] [--bucket 48x80]
        [--out benchmarks/results/prepare_throughput.json]
    python benchmarks/prepare_throughput.py --smoke --out /tmp/prepare_throughput.json   # 2 tiny clips (the test)

Makes one folder of synthetic captioned clips (`--source` pixels, `--source-frames` frames at 30 fps;
or `--input` an existing folder), then prepares it into fresh caches with the same models:

  * the scalers, at each `--compare-workers` N: the clips resized in numpy after ffmpeg decoded them
    at full size (scaler='numpy', the path before) and scaled and cropped inside ffmpeg's filter graph
    (scaler='ffmpeg', the default; mochi_jax/lib/video.py), back to back with the same clips and
    threads; clips/s both ways and the ratio, and how far apart the two caches are (max / mean
    absolute difference of the VAE latents, since the two resamplings differ slightly, beside how far
    the same VAE moves for random +-1 noise on the frames; the captions' T5 features must be equal),
    and the frames themselves (the first clips read both ways at the bucket and at 480x848: mean and
    max difference 0-255, and the seconds);
  * the threads, with the ffmpeg scaler: `workers=0` (each clip decoded and resized in the main thread
    when its turn comes) and each `--workers` N (N threads decode and resize ahead while the main
    thread encodes); their caches must be identical.

The models are the demo's tiny random VAE and T5 unless --vae/--t5/--tokenizer name converted
checkpoints. Reports clips/s as prepare does (model loading and the first clip of each shape, when XLA
compiles, left out), the time per stage and the 1-minute load average before and after each run (other
processes share the CPU). Also times the numpy frame resize itself (images still use it), one --source
frame to 480x848, against the dense einsum it replaced. Prints tables and writes JSON (--out, default
benchmarks/results/prepare_throughput.json in the checkout; --smoke: a temporary folder unless --out is
given).
"""

from __future__ import annotations

import argparse
import contextlib
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

from mochi_jax.configs import prepare as prepare_config  # noqa: E402
from mochi_jax.demo import make_clips, write_demo_models  # noqa: E402
from mochi_jax.lib import preparation, video  # noqa: E402
from mochi_jax.lib.cache import Cache  # noqa: E402
from mochi_jax.lib.video import _Resizer, read_clip  # noqa: E402

# --smoke: the smallest run (2 tiny clips, one reading thread, the scalers compared there), to check that it runs
SMOKE = dict(clips=2, source=(64, 96), source_frames=8, workers="1", compare_workers="1", num_frames=7, bucket=(16, 16))


def size(text: str) -> tuple[int, int]:
    h, w = text.lower().split("x")
    return int(h), int(w)


@contextlib.contextmanager
def default_scaler(name: str):
    """prepare's reading threads resize with `name` ('ffmpeg' or 'numpy') meanwhile."""
    before, video.DEFAULT_SCALER = video.DEFAULT_SCALER, name
    try:
        yield
    finally:
        video.DEFAULT_SCALER = before


def run(cfg, out: Path, workers: int, scaler: str = "ffmpeg") -> dict:
    cfg = cfg.copy_and_resolve_references()
    cfg.output_dir, cfg.workers = str(out), workers
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    with default_scaler(scaler):
        report = preparation.prepare(cfg)
    timing = report["timing"]
    return {"workers": workers, "scaler": scaler, "clips": len(report["new"]), "total_s": time.perf_counter() - t0,
            **timing, "load_1min": [load, os.getloadavg()[0]]}


def max_difference(a: Path, b: Path) -> float:
    ca, cb = Cache(a), Cache(b)
    assert [e["name"] for e in ca.entries] == [e["name"] for e in cb.entries]
    return max(float(np.abs(ca[i][k] - cb[i][k]).max()) for i in range(len(ca)) for k in ("mean", "logvar", "t5_feats"))


def latent_difference(a: Path, b: Path) -> dict:
    """How far apart two caches of the same clips are: max and mean |a - b| of the VAE latents (mean,
    logvar) over all clips, the latents' own mean |value| for scale, and the T5 features' max |a - b|."""
    ca, cb = Cache(a), Cache(b)
    assert [e["name"] for e in ca.entries] == [e["name"] for e in cb.entries]
    out = {}
    for k in ("mean", "logvar"):
        d = [np.abs(ca[i][k] - cb[i][k]) for i in range(len(ca))]
        out[k] = {"max": float(max(x.max() for x in d)), "mean": float(np.mean([x.mean() for x in d])),
                  "mean_abs_value": float(np.mean([np.abs(ca[i][k]).mean() for i in range(len(ca))]))}
    out["t5_feats_max"] = max(float(np.abs(ca[i]["t5_feats"] - cb[i]["t5_feats"]).max()) for i in range(len(ca)))
    return out


def latent_noise_floor(cfg, clip: Path, num_frames: int, bucket) -> dict:
    """How much the VAE's latents move for a nudge, to read the caches' difference against: max / mean
    |change of the latent mean| when `clip`'s numpy-scaled frames get random -1/0/+1 (0-255) noise, and
    when they are read with the ffmpeg scaler instead (the demo's random-weight VAE turns a 1/255 nudge
    into a large latent change)."""
    m = preparation.load_models(cfg)
    frames = read_clip(clip, num_frames, cfg.fps, bucket, scaler="numpy")
    noise = np.random.default_rng(0).integers(-1, 2, frames.shape)
    nudged = np.clip(frames.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    base = m.encode_video(frames)[0]
    out = {"clip": clip.name}
    for name, other in (("plus_minus_1", nudged), ("ffmpeg_scaler", read_clip(clip, num_frames, cfg.fps, bucket))):
        d = np.abs(m.encode_video(other)[0] - base)
        out[name] = {"frames_mean": float(np.abs(other.astype(np.int16) - frames).mean()),
                     "latent_max": float(d.max()), "latent_mean": float(d.mean())}
    return out


def frame_difference(clips, num_frames: int, fps: float, bucket) -> dict:
    """The frames of `clips` read with both scalers: max and mean |ffmpeg - numpy| (0-255), and seconds."""
    diffs, seconds = [], {"numpy": 0.0, "ffmpeg": 0.0}
    if not clips:
        return {"bucket": list(bucket), "clips": 0, "max": None, "mean": None, "read_s": seconds}
    for path in clips:
        got = {}
        for scaler in seconds:
            t0 = time.perf_counter()
            got[scaler] = read_clip(path, num_frames, fps, bucket, scaler=scaler).astype(np.int16)
            seconds[scaler] += time.perf_counter() - t0
        diffs.append(np.abs(got["ffmpeg"] - got["numpy"]))
    return {"bucket": list(bucket), "clips": len(clips), "max": int(max(d.max() for d in diffs)),
            "mean": float(np.mean([d.mean() for d in diffs])), "read_s": seconds}


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
    ap.add_argument("--compare-workers", default="0,2",
                    help="thread counts at which the numpy scaler runs too, to compare with the ffmpeg one ('' for none)")
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
    compare = [int(w) for w in args.compare_workers.split(",") if w.strip()]
    results, numpy_runs = [], {}
    for workers in [0] + counts + [w for w in compare if w not in [0] + counts]:
        if workers in compare:  # the numpy scaler just before the ffmpeg one, with the same threads
            out = work / f"cache_numpy_workers{workers}"
            shutil.rmtree(out, ignore_errors=True)
            numpy_runs[workers] = run(cfg, out, workers, "numpy")
        out = work / f"cache_workers{workers}"
        shutil.rmtree(out, ignore_errors=True)
        results.append(run(cfg, out, workers))
    one = results[0]
    diff = max(max_difference(work / "cache_workers0", work / f"cache_workers{w}") for w in counts)
    scalers = []
    for w, before in numpy_runs.items():
        after = next(r for r in results if r["workers"] == w)
        scalers.append({"workers": w, "numpy": before,
                        "ffmpeg": {k: after[k] for k in ("clips_per_s", "steady_s", "stages", "load_1min")},
                        "ratio": after["clips_per_s"] / max(before["clips_per_s"], 1e-9),
                        "latents": latent_difference(work / f"cache_numpy_workers{w}", work / f"cache_workers{w}")})
    clips = sorted(src.glob("*.mp4"))
    # the frames both ways: at the benchmark's bucket (2 clips), and at Mochi's 480x848 (the first clip)
    frames = [frame_difference(clips[:2], args.num_frames, cfg.fps, args.bucket),
              frame_difference(clips[:1], args.num_frames, cfg.fps, (480, 848))]
    floor = latent_noise_floor(cfg, clips[0], args.num_frames, args.bucket) if clips and scalers else None
    resize = resize_timing(args.source)

    print(f"\nprepare throughput: {one['clips']} clips of {args.source[0]}x{args.source[1]}, {args.source_frames} frames "
          f"-> {args.num_frames} frames at {args.bucket[0]}x{args.bucket[1]}; {jax.devices()[0].platform}, "
          f"{os.cpu_count()} CPU cores, 1-minute load {os.getloadavg()[0]:.1f} at the end")
    reading = "reading (decode + resize, all threads)"
    print(f"\nscalers: numpy (full-size frames from ffmpeg, resized in numpy; before) vs ffmpeg (scaled and cropped in "
          f"ffmpeg's filter graph, flags {video.FFMPEG_SCALE_FLAGS})")
    print(f"{'workers':<9}{'numpy clips/s':>14}{'ffmpeg clips/s':>15}{'ratio':>7}{'reading s':>18}{'VAE s':>16}"
          f"{'latent |diff| max':>19}{'mean':>9}{'load':>11}")
    for c in scalers:
        lat, a, b = c["latents"]["mean"], c["numpy"]["stages"], c["ffmpeg"]["stages"]
        print(f"{c['workers']:<9}{c['numpy']['clips_per_s']:>14.2f}{c['ffmpeg']['clips_per_s']:>15.2f}{c['ratio']:>6.2f}x"
              f"{a.get(reading, 0.0):>8.1f} ->{b.get(reading, 0.0):>7.1f}{a.get('VAE', 0.0):>8.1f} ->{b.get('VAE', 0.0):>5.1f}"
              f"{lat['max']:>19.2e}{lat['mean']:>9.1e}"
              f"{c['numpy']['load_1min'][0]:>7.1f}-{c['ffmpeg']['load_1min'][1]:.1f}")
    if scalers:
        lat = scalers[0]["latents"]
        print(f"latents (VAE mean) are {lat['mean']['mean_abs_value']:.2e} on average; logvar differs by at most "
              f"{max(c['latents']['logvar']['max'] for c in scalers):.2e}; T5 features by "
              f"{max(c['latents']['t5_feats_max'] for c in scalers):.1e}")
    if floor:
        a, b = floor["plus_minus_1"], floor["ffmpeg_scaler"]
        print(f"VAE sensitivity ({floor['clip']}): random +-1 noise on the numpy frames (mean |change| "
              f"{a['frames_mean']:.2f}) moves the latent mean by max {a['latent_max']:.2e} / mean {a['latent_mean']:.1e}; the ffmpeg scaler's "
              f"frames (mean |change| {b['frames_mean']:.2f}) by max {b['latent_max']:.2e} / mean {b['latent_mean']:.1e}")
    for f in frames:
        if f["clips"]:
            print(f"{f['clips']} clip(s) read both ways at {f['bucket'][0]}x{f['bucket'][1]}: the frames differ by "
                  f"{f['mean']:.2f} on average, at most {f['max']} (0-255); read in {f['read_s']['numpy']:.2f} s (numpy) "
                  f"vs {f['read_s']['ffmpeg']:.2f} s (ffmpeg), "
                  f"{f['read_s']['numpy'] / max(f['read_s']['ffmpeg'], 1e-9):.2f}x")

    print("\nreading threads (ffmpeg scaler):")
    stages = sorted({k for r in results for k in r["stages"]})
    print(f"{'path':<28}{'clips/s':>9}{'speed-up':>9}{'steady s':>10}" + "".join(f"{k[:18]:>20}" for k in stages))
    for r in results:
        name = "one at a time (workers=0)" if r["workers"] == 0 else f"reading threads ({r['workers']})"
        r["speedup"] = r["clips_per_s"] / max(one["clips_per_s"], 1e-9)
        print(f"{name:<28}{r['clips_per_s']:>9.2f}{r['speedup']:>8.2f}x{r['steady_s']:>10.1f}"
              + "".join(f"{r['stages'].get(k, 0.0):>20.2f}" for k in stages))
    print(f"the caches differ by at most {diff:.2e}")
    print(f"numpy resize of one {args.source[0]}x{args.source[1]} frame to 480x848: banded {resize['banded_s'] * 1e3:.0f} ms, "
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
        "scale_flags": video.FFMPEG_SCALE_FLAGS, "scalers": scalers, "frames": frames,
        "latent_noise_floor": floor,
        "runs": results, "max_cache_difference": diff, "resize_1_frame": resize}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
