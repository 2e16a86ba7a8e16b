"""Sampling with classifier-free guidance: seconds per denoising step, mochi_jax (`sampling.denoise`,
jit) vs diffusers' MochiPipeline, same small random transformer, same latents, same prompt
embeddings, same run.

    python benchmarks/sample_step.py [--steps 10] [--repeats 7] [--frames 13] [--height 96]
                                     [--width 160] [--torch-threads 1,2] [--out FILE]
    python benchmarks/sample_step.py --smoke --out /tmp/sample_step.json   # 1 step, 1 repeat, tiny (the test)

Both sides run float32 on the host CPU with guidance on (batch 1 -> 2 in the DiT). Timed:
  ours      one `denoise` call over N steps (after a warm-up call that compiles), / N; includes
            concatenating the cond/uncond embeddings and committing the noise to the device.
  diffusers one `pipe(..., num_inference_steps=N, output_type='latent')` call, / N; includes the
            pipeline's set-up (input checks, latents, schedule, scheduler) around the loop. Its
            in-loop step alone (deltas between `callback_on_step_end` calls) is reported too.
torch runs at 1 thread and at its default (all cores): on a shared machine its multi-threaded
runs can be far slower than one thread; the speed-up is against its faster setting. The repeats
alternate between the sides. The final latents of both are compared (relative L2).
Writes benchmarks/results/sample_step.json (--out; --smoke: a temporary folder unless --out is given).
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
# from any directory: the checkout's package and its reference harnesses (tests/harness/dit_ref.py)
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "harness")]
from dit_ref import make_reference, rel_l2, write_both_layouts  # noqa: E402

from mochi_jax.lib import sampling  # noqa: E402
from mochi_jax.checkpoints import convert_dit  # noqa: E402
from mochi_jax.models.dit import DiTConfig  # noqa: E402
from mochi_jax.checkpoints import load_dit  # noqa: E402

BENCH = dict(depth=4, num_heads=4, head_dim=32, text_width=64, t5_dim=64, time_embed_dim=64)
# --smoke: the smallest run (2 steps, one repeat, one torch thread count), to check that it runs
SMOKE = dict(steps=2, repeats=1, frames=1, height=16, width=16, text_len=16, torch_threads="1")


def embeddings(t5_dim, text_len, seed=0):
    """(feats, mask) for one prompt (12 valid tokens) and one negative prompt ("" = EOS only)."""
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((2, 1, text_len, t5_dim)).astype(np.float32)
    mask = np.zeros((2, 1, text_len), bool)
    mask[0, 0, :min(12, text_len)] = True
    mask[1, 0, :1] = True
    return (feats[0], mask[0]), (feats[1], mask[1])


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--frames", type=int, default=13)
    ap.add_argument("--height", type=int, default=96)
    ap.add_argument("--width", type=int, default=160)
    ap.add_argument("--text-len", type=int, default=32)
    ap.add_argument("--guidance", type=float, default=6.0)
    ap.add_argument("--torch-threads", default=f"1,{torch.get_num_threads()}",
                    help="torch thread counts to time (comma-separated; the speed-up uses the fastest)")
    ap.add_argument("--out", help="the JSON file (default benchmarks/results/sample_step.json)")
    ap.add_argument("--smoke", action="store_true", help=f"the smallest run, {SMOKE}, to check that it runs")
    args = ap.parse_args(argv)
    if args.smoke:  # the smoke sizes as defaults: flags given explicitly still win
        ap.set_defaults(**SMOKE)
        args = ap.parse_args(argv)
    from diffusers import FlowMatchEulerDiscreteScheduler, MochiPipeline

    cfg = DiTConfig(**BENCH, param_dtype="float32", compute_dtype="float32", remat="none")
    ref = make_reference(cfg, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        _, genmo = write_both_layouts(ref, Path(tmp))
        convert_dit(genmo, Path(tmp) / "ours", dtype="float32", progress=False)
        cfg, params = load_dit(Path(tmp) / "ours", compute_dtype="float32", remat="none")

    n, g = args.steps, args.guidance
    cond, uncond = embeddings(cfg.t5_dim, args.text_len)
    shape = sampling.latent_shape(args.frames, args.height, args.width)
    noise = np.asarray(sampling.initial_noise([0], shape))
    sigmas = sampling.sigma_schedule(n)

    def ours():
        return jax.block_until_ready(sampling.denoise(cfg, params, noise, cond, uncond, sigmas, g))

    t0 = time.perf_counter()
    z_ours = ours()  # compiles the step
    first_s = time.perf_counter() - t0

    pipe = MochiPipeline(scheduler=FlowMatchEulerDiscreteScheduler(invert_sigmas=True), vae=None,
                         text_encoder=None, tokenizer=None, transformer=ref)
    pipe.set_progress_bar_config(disable=True)
    marks = []

    def mark(_pipe, _i, _t, kwargs):
        marks.append(time.perf_counter())
        return {}

    def theirs(threads):
        """One pipeline call at `threads` torch threads: (latents, seconds, in-loop step seconds)."""
        torch.set_num_threads(threads)
        marks.clear()
        t = time.perf_counter()
        z = pipe(prompt_embeds=torch.from_numpy(cond[0]), prompt_attention_mask=torch.from_numpy(cond[1]),
                 negative_prompt_embeds=torch.from_numpy(uncond[0]),
                 negative_prompt_attention_mask=torch.from_numpy(uncond[1]),
                 height=args.height, width=args.width, num_frames=args.frames, num_inference_steps=n,
                 guidance_scale=g, latents=torch.from_numpy(noise), output_type="latent",
                 callback_on_step_end=mark).frames
        return z.numpy(), time.perf_counter() - t, np.diff(marks).tolist()

    threads = list(dict.fromkeys(int(x) for x in args.torch_threads.split(",")))
    for k in threads:
        z_theirs = theirs(k)[0]  # warm-up
    t_ours, t_theirs = [], {k: dict(call_s=[], loop_step_s=[]) for k in threads}
    for _ in range(args.repeats):  # interleaved, so that load from other processes hits all sides alike
        t_ours += timed(ours, 1)
        for k in threads:
            _, call, loop = theirs(k)
            t_theirs[k]["call_s"].append(call)
            t_theirs[k]["loop_step_s"] += loop
    err = rel_l2(z_ours, z_theirs)

    med = statistics.median
    ours_step = med(t_ours) / n
    for r in t_theirs.values():
        r.update(step_median_s=med(r["call_s"]) / n, loop_step_median_s=med(r["loop_step_s"]))
    best = min(threads, key=lambda k: t_theirs[k]["step_median_s"])
    speedup = t_theirs[best]["step_median_s"] / ours_step
    speedup_loop = t_theirs[best]["loop_step_median_s"] / ours_step
    tokens = shape[1] * (shape[2] // 2) * (shape[3] // 2)
    print(f"CFG sampling, {args.frames} frames {args.height}x{args.width} -> latents {list(shape)} = {tokens} visual "
          f"+ {args.text_len} text tokens, DiT batch 2, {n} steps x {args.repeats} reps after warm-up, config {BENCH}; "
          f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"  {'s per step':52s} {'median':>9s} {'min':>9s}")
    print(f"  {'mochi_jax sampling.denoise (jit), call / N':52s} {ours_step:9.4f} {min(t_ours) / n:9.4f}")
    for k, r in t_theirs.items():
        print(f"  {f'diffusers MochiPipeline, {k} thread(s), call / N':52s} {r['step_median_s']:9.4f} "
              f"{min(r['call_s']) / n:9.4f}")
        print(f"  {f'diffusers MochiPipeline, {k} thread(s), in-loop step':52s} {r['loop_step_median_s']:9.4f} "
              f"{min(r['loop_step_s']):9.4f}")
    print(f"  speed-up (diffusers at its best thread count ({best}) / ours, per step, median): {speedup:.2f}x "
          f"(in-loop step only: {speedup_loop:.2f}x); ours' first call incl. compile {first_s:.2f} s; "
          f"final latents rel L2 {err:.1e}")

    res = dict(benchmark="sample_step", config=BENCH, frames=args.frames, height=args.height, width=args.width,
               latent_shape=list(shape), visual_tokens=tokens, text_len=args.text_len, dit_batch=2, steps=n,
               guidance=g, repeats=args.repeats, ours_call_s=t_ours, ours_step_median_s=ours_step,
               diffusers={str(k): v for k, v in t_theirs.items()}, diffusers_best_threads=best, speedup=speedup,
               speedup_in_loop=speedup_loop, ours_first_call_s=first_s, final_latents_rel_l2=err,
               platform=jax.devices()[0].platform, machine=platform.processor() or platform.machine(),
               cpu_count=os.cpu_count(), load_average=os.getloadavg(),
               versions={"jax": jax.__version__, "torch": torch.__version__,
                         "diffusers": __import__("diffusers").__version__})
    out = Path(args.out) if args.out else (Path(tempfile.gettempdir()) / "sample_step_smoke.json" if args.smoke
                                           else ROOT / "benchmarks" / "results" / "sample_step.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
