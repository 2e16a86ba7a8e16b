"""Fit tables of the full-size LoRA training step, measured with the AOT fit check (mochi_jax.aot.fit):
the 10 B base, the default rank-16 LoRA (configs/lora.py), 480x848 clips, on a CPU host.

    python benchmarks/aot_tables.py gpu     # per GPU and remat policy: the longest clip that fits at batch 1
    python benchmarks/aot_tables.py tpu     # per clip length: the smallest TPU slice (and mesh) that fits
    python benchmarks/aot_tables.py quant   # per GPU and base-weight setting (bf16, fp8, int8, host-streamed)
    python benchmarks/aot_tables.py remat   # one H100: memory, attention reruns and FLOPs per remat policy, remat=auto
    python benchmarks/aot_tables.py sample  # the released model's sharded sampler step per slice / GPU, FLOP floors
    python benchmarks/aot_tables.py offload # long clips on small cards: the blocks' inputs in host memory, PCIe per step
    python benchmarks/aot_tables.py show    # print the tables from benchmarks/results/aot_{gpu,tpu,gpu_quant,remat,sample,offload}.json
    python benchmarks/aot_tables.py tpu --smoke --results /tmp/aot   # one cell, a tiny model (the test)

--results DIR: where the JSON files are read and written (default benchmarks/results/). --model: the DiT's
shapes for every cell (aot.model: default 'mochi', the released model; a configs/dit.py preset such as 'tiny').
--smoke: the first cell of the table alone (the first GPU or slice, policy or setting, 7 frames) for the
'tiny' preset, into a temporary folder unless --results is given, to check that the script runs.

GPU: H100 80 GB, H200 141 GB, A100 80 GB and RTX 4090 (24 GB), one GPU, batch 1, cuDNN attention;
for each remat policy the clips 37, 61, 85, 163 frames are compiled in order until one exceeds the
card's memory (longer clips only need more). "fits" is reported at JAX's default 75 % of the card and at 95 %
(XLA_CLIENT_MEM_FRACTION=.95).
Quant: the frozen base as bf16, float8_e4m3fn, int8 (model.param_dtype), and bf16 / fp8 with the stacked
blocks in pinned host memory (model.weights_on_host), remat full, cuDNN attention, batch 1, one H100 and
one RTX 4090, 37, 85 and 163 frames (every cell compiled): benchmarks/results/aot_gpu_quant.json.
Remat: one H100, cuDNN attention, batch 1, 37 / 61 / 85 frames, remat full, save:attn, dots_no_batch and
dots: the compiled memory, the attention forwards the backward loop reruns per block (remat.attention_reruns,
from the compiled program) and the step's FLOPs (mochi_jax/lib/flops.py) with its time at 800 TFLOP/s;
and what remat='auto' picks within 40 GB at 37 frames and 60 GB at 85 (the issue's goals):
benchmarks/results/aot_remat.json.
Offload: one RTX 4090 with an fp8 base and host-streamed blocks at 37, 85 and 163 frames, remat full,
offload:residual (the blocks' inputs kept for the backward in pinned host memory) and offload:residual_bf16,
and one v5e chip (16 GB) at 85 frames with an int8 base on the chip: device and pinned-host GiB, the bytes that cross
PCIe per step (the streamed blocks' weights and the offloaded inputs, each there and back) and their time at
25 GB/s beside the step's FLOP time at 800 TFLOP/s: benchmarks/results/aot_offload.json.
TPU: 'xla' attention by default, --attention=splash for the Pallas kernel,
remat full, slices v5p-8 (4 chips), v6e-8 (8), v5e-16 (16); per slice the meshes fsdp=N (batch N),
then fsdp=N/s x sequence=s (batch N/s, at least one clip per host) for s = 2, 4, 8 until one fits
(--frugal: the other way round, from the most sequence-parallel mesh until one does not fit, so a
slice that cannot hold the clip costs one compile). --all measures every slice of every clip
length; by default the search of a clip length stops at the first slice that fits. The tables in
docs/fit.md came from `tpu --frames 37 --all`, `tpu --frames 85`, `tpu --frames 163 --frugal` and
`tpu --frames 85 --frugal --all --slices v6e-8,v5e-16`, and with `--attention=splash` from
`--frames 163 --frugal --all`, `--frames 85 --frugal --all` and `--frames 37 --all`.

Every cell is compiled in a fresh process (the compiler's memory is returned between cells) and saved
to the JSON as soon as it is measured, so an interrupted run resumes where it stopped (--redo measures
again). Compiles take 0.3-1 min (GPU) and 2.5-12 min (TPU; refusals a few seconds) each on a
shared 2-core host.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from mochi_jax.aot import targets  # noqa: E402
from mochi_jax.stderr import dropping_stderr  # noqa: E402

targets.compile_only_environment()  # before jax is imported (here and in every child process)

RESULTS = ROOT / "benchmarks" / "results"
GIB = targets.GIB
GPUS = ("h100", "h200", "a100-80gb", "rtx4090")
POLICIES = ("full", "none", "dots", "dots_no_batch", "offload_dots")
GPU_FRAMES = (37, 61, 85, 163)
SLICES = ("v5p-8", "v6e-8", "v5e-16")  # by chip count
TPU_FRAMES = (37, 85, 163)


def measure(overrides: dict) -> dict:
    """One cell: configs/lora.py (or, with 'config': 'sample', configs/sample.py) with `overrides`
    ({'model.remat': 'full', ...}), checked by fit.check."""

    with dropping_stderr(targets.GPU_COMPILER_NOISE):  # the CUDA plugin, when installed, looks for a driver
        from mochi_jax.configs import lora, sample
        from mochi_jax.aot import fit

    overrides = dict(overrides)
    cfg = (sample if overrides.pop("config", "lora") == "sample" else lora).get_config()
    cfg.aot.model = "mochi"  # the released model's shapes, whatever ckpt/ holds
    cfg = fit.with_overrides(cfg, overrides)
    try:
        report = fit.check(cfg)
    except ValueError as e:  # fit.BadInput and the config's own checks
        return {"error": " ".join(str(e).split())}
    out = report.to_dict()
    out.pop("compiler_message", None)
    return out


def in_child(overrides: dict) -> dict:
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        return pool.submit(measure, overrides).result()


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"cells": {}}


def save(path: Path, data: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def cell(data: dict, path: Path, key: str, overrides: dict, redo: bool) -> dict:
    if key in data["cells"] and not redo:
        return data["cells"][key]
    t0 = time.time()
    result = in_child(overrides)
    result["wall_s"] = round(time.time() - t0, 1)
    result["overrides"] = overrides
    data["cells"][key] = result
    save(path, data)
    gib = result.get("total_bytes", 0) / GIB
    print(f"  {key}: {'error: ' + result['error'] if 'error' in result else f'{gib:.2f} GiB'} "
          f"(compile {result.get('compile_s', 0):.0f} s, wall {result['wall_s']:.0f} s)", flush=True)
    return result


def device_bytes(gpu: str) -> int:
    return targets.GPUS[gpu].memory_bytes


# ----------------------------------------------------------------------------- GPU


def model_overrides(args) -> dict:
    """--model other than the released model's shapes: recorded in every cell's overrides."""
    return {} if args.model == "mochi" else {"aot.model": args.model}


def setup(text: str, args) -> str:
    return text if args.model == "mochi" else f"{text}; DiT shapes: aot.model={args.model!r} (not the 10 B base)"


def run_gpu(args):
    path = args.results / "aot_gpu.json"
    data = load(path)
    data["setup"] = setup("10 B base (configs/dit.py 'mochi', bf16), rank-16 LoRA on qkv_x/y, proj_x/y, AdamW; "
                          "480x848; batch 1; one GPU; cuDNN attention; autotuning off", args)
    for gpu in args.gpus:
        for policy in args.policies:
            for frames in args.frames:
                key = f"{gpu}/{policy}/{frames}"
                r = cell(data, path, key, {"aot.target": gpu, "model.attention": "cudnn", "model.remat": policy,
                                           "aot.num_frames": frames, **model_overrides(args)}, args.redo)
                if "error" in r or r["total_bytes"] > device_bytes(gpu):
                    break  # a longer clip needs more
    show_gpu(data)


def show_gpu(data: dict):
    cells = data["cells"]
    print("\nGPU: total per GPU (GiB) of the full-size train step, batch 1, cuDNN attention, 480x848")
    head = f"{'GPU':10} {'remat':14} " + " ".join(f"{f:>7}" for f in GPU_FRAMES) + "   longest at 75 % / 95 %"
    print(head)
    for gpu in GPUS:
        for policy in POLICIES:
            row = [cells.get(f"{gpu}/{policy}/{f}") for f in GPU_FRAMES]
            if not any(row):
                continue
            vals = " ".join(f"{r['total_bytes'] / GIB:7.1f}" if r and "total_bytes" in r else f"{'-':>7}" for r in row)
            best = []
            for frac in (0.75, 0.95):
                ok = [f for f, r in zip(GPU_FRAMES, row) if r and "total_bytes" in r
                      and r["total_bytes"] <= frac * device_bytes(gpu)]
                best.append(str(max(ok)) if ok else "none")
            print(f"{gpu:10} {policy:14} {vals}   {best[0]:>5} / {best[1]}")
    host = [(k, v["host_bytes"]) for k, v in cells.items() if v.get("host_bytes")]
    for k, b in host:
        print(f"  {k}: {b / GIB:.1f} GiB in pinned host memory")


# ----------------------------------------------------------------------------- quantized / host-streamed base

QUANT_GPUS = ("rtx4090", "h100")
QUANT_FRAMES = (37, 85, 163)
# name -> (model.param_dtype, model.weights_on_host)
QUANT_SETTINGS = {"bf16": ("bfloat16", False), "fp8": ("float8_e4m3fn", False), "int8": ("int8", False),
                  "bf16+host": ("bfloat16", True), "fp8+host": ("float8_e4m3fn", True)}
QUANT_GOALS = ((37, 22, "a quantized base"), (85, 22, "host-streamed weights"), (163, 40, "any setting"))


def run_quant(args):
    path = args.results / "aot_gpu_quant.json"
    data = load(path)
    data["setup"] = setup("10 B base (configs/dit.py 'mochi'), rank-16 LoRA on qkv_x/y, proj_x/y, AdamW; 480x848; "
                          "batch 1; one GPU; remat full; cuDNN attention; autotuning off", args)
    for gpu in args.gpus:
        for name in args.settings:
            dtype, host = QUANT_SETTINGS[name]
            for frames in args.frames:
                cell(data, path, f"{gpu}/{name}/{frames}",
                     {"aot.target": gpu, "model.attention": "cudnn", "model.remat": "full", "aot.num_frames": frames,
                      "model.param_dtype": dtype, "model.weights_on_host": host, **model_overrides(args)}, args.redo)
    show_quant(data)


def show_quant(data: dict):
    cells = data["cells"]
    print("\nGPU memory (GiB per GPU, the compiler's figure) of the full-size LoRA train step by base weights; "
          "480x848, batch 1, remat full, cuDNN attention")
    print(f"{'GPU':8} {'base':10} " + " ".join(f"{f:>6}f" for f in QUANT_FRAMES) + "   weights on device / host")
    for gpu in QUANT_GPUS:
        for name in QUANT_SETTINGS:
            row = [cells.get(f"{gpu}/{name}/{f}") for f in QUANT_FRAMES]
            if not any(row):
                continue
            vals = " ".join(f"{r['total_bytes'] / GIB:7.2f}" if r and "total_bytes" in r else f"{'-':>7}" for r in row)
            r = next(r for r in row if r and "inputs" in r)
            dev = r["inputs"].get("frozen weights", 0) / GIB
            host = r["inputs"].get("frozen weights in host memory", 0) / GIB
            print(f"{gpu:8} {name:10} {vals}   {dev:6.2f} / {host:.2f}")
    print("\ngoals:")
    for frames, gib, what in QUANT_GOALS:
        ok = sorted({f"{k.split('/')[0]} {k.split('/')[1]} ({r['total_bytes'] / GIB:.1f})" for k, r in cells.items()
                     if k.endswith(f"/{frames}") and r.get("total_bytes", 1 << 62) <= gib * GIB})
        print(f"  {frames} frames within {gib} GiB ({what}): " + (", ".join(ok) if ok else "none measured"))


# ----------------------------------------------------------------------------- remat: memory against recompute

REMAT_POLICIES = ("full", "save:attn", "dots_no_batch", "dots")
REMAT_FRAMES = (37, 61, 85)
REMAT_BUDGETS = ((37, 40), (85, 60))  # (frames, GB): the goals
FLOOR_TFLOPS = 800


def _remat_over(frames: int, **over) -> dict:
    return {"aot.target": "h100", "model.attention": "cudnn", "aot.num_frames": frames, **over}


def run_remat(args):
    path = args.results / "aot_remat.json"
    data = load(path)
    data["setup"] = setup("10 B base (configs/dit.py 'mochi', bf16), rank-16 LoRA on qkv_x/y, proj_x/y, AdamW; "
                          "480x848; batch 1; one H100; cuDNN attention; autotuning off", args)
    for frames in args.frames:
        for policy in args.policies:
            cell(data, path, f"{policy}/{frames}", _remat_over(frames, **{"model.remat": policy},
                                                              **model_overrides(args)), args.redo)
    for frames, gb in REMAT_BUDGETS:
        if frames in args.frames:
            cell(data, path, f"auto@{gb}GB/{frames}",
                 _remat_over(frames, **{"model.remat": "auto", "model.memory_budget_gb": gb * 1e9 / GIB},
                             **model_overrides(args)), args.redo)
    show_remat(data)


def show_remat(data: dict):
    from mochi_jax.lib.flops import flop_breakdown
    from mochi_jax.models.dit import DiTConfig

    cells = data["cells"]
    print("\nRemat on one H100 (AOT, cuDNN, 480x848, batch 1): memory against recomputation")
    print(f"{'frames':>6} {'remat':28} {'GiB':>6} {'x full':>6} {'reruns':>6} {'TFLOP':>7} {'x full':>6} "
          f"{'floor s':>7}")
    for key in sorted(cells, key=lambda k: (int(k.split("/")[-1]), k)):
        r, (policy, frames) = cells[key], key.rsplit("/", 1)
        frames = int(frames)
        if "error" in r:
            print(f"{frames:6} {policy:28} error: {r['error']}")
            continue
        setting = r.get("remat") or policy
        cfg = DiTConfig(attention="cudnn")
        flops = flop_breakdown(cfg, frames, 480, 848, setting)["total"]  # a policy or a groups string
        full = cells.get(f"full/{frames}", {})
        full_flops = flop_breakdown(cfg, frames, 480, 848, "full")["total"]
        name = f"{policy} -> {setting}" if policy.startswith("auto") else policy
        mem_ratio = f"{r['total_bytes'] / full['total_bytes']:6.2f}" if "total_bytes" in full else f"{'-':>6}"
        print(f"{frames:6} {name:28} {r['total_bytes'] / GIB:6.1f} {mem_ratio} {r.get('attention_reruns', -1):6} "
              f"{flops / 1e12:7.1f} {flops / full_flops:6.3f} {flops / (FLOOR_TFLOPS * 1e12):7.3f}")
    print("reruns: attention forwards in the backward layer loop's body (1: every block reruns it); "
          f"floor s: the FLOPs at {FLOOR_TFLOPS} TFLOP/s")


# ----------------------------------------------------------------------------- TPU


def tpu_meshes(chips: int, hosts: int):
    """(mesh, batch) candidates of a slice, from the most data-parallel to the most sequence-parallel;
    the batch is one clip per fsdp group, or more where every host must have one (the trainer's rule)."""
    out = []
    for s in (1, 2, 4, 8):
        if chips % s == 0 and 24 % s == 0:
            fsdp = chips // s
            out.append(({"data": 1, "fsdp": fsdp, "sequence": s, "tensor": 1}, math.lcm(fsdp, hosts)))
    return out


def run_tpu(args):
    path = args.results / "aot_tpu.json"
    data = load(path)
    data["setup"] = setup("10 B base (configs/dit.py 'mochi', bf16), rank-16 LoRA on qkv_x/y, proj_x/y, AdamW; "
                          "480x848; remat full; attention xla, or splash for the cells whose key starts with splash/; "
                          "batch = data x fsdp", args)
    for frames in args.frames:
        for name in args.slices:
            target = targets.parse_target(name)
            fitted = False
            meshes = tpu_meshes(target.num_devices, target.num_hosts)
            for mesh, batch in (meshes[::-1] if args.frugal else meshes):
                tag = "x".join(f"{k[0]}{v}" for k, v in mesh.items() if v > 1) or "1"
                key = f"{args.attention}/{frames}/{name}/{tag}"
                over = {"aot.target": name, "model.attention": args.attention, "model.remat": "full",
                        "aot.num_frames": frames, "batch_size": batch, **model_overrides(args)}
                over.update({f"mesh.{k}": v for k, v in mesh.items()})
                r = cell(data, path, key, over, args.redo)
                if args.frugal:  # from the most sequence-parallel mesh: the first that fails ends the slice
                    if not r.get("fits"):
                        break
                    fitted = True
                elif r.get("fits"):
                    fitted = True
                    break
            if fitted and not args.all:
                break
    show_tpu(data)


def show_tpu(data: dict):
    cells = data["cells"]
    print("\nTPU: the full-size train step per chip, remat full, 480x848 (GiB; '>' = the compiler's refusal)")
    print(f"{'attention':9} {'frames':>6} {'slice':8} {'mesh':14} {'batch':>5} {'total':>8} {'limit':>7} "
          f"{'fits':>5} {'compile s':>9}")
    for key in sorted(cells, key=lambda k: (k.split("/")[0], int(k.split("/")[1]), SLICES.index(k.split("/")[2])
                                            if k.split("/")[2] in SLICES else 9, k)):
        r = cells[key]
        attention, frames, name, mesh = key.split("/")
        if "error" in r:
            print(f"{attention:9} {frames:>6} {name:8} {mesh:14} error: {r['error']}")
            continue
        total = (">" if r.get("compiler_error") else "") + f"{r['total_bytes'] / GIB:.1f}"
        fits = "yes" if r["fits"] else "no" if r.get("compiler_error") else "no*"
        print(f"{attention:9} {frames:>6} {name:8} {mesh:14} {r['overrides']['batch_size']:>5} {total:>8} "
              f"{r['limit_bytes'] / GIB:7.2f} {fits:>5} {r['compile_s']:9.0f}")
    print("no*: compiled (the compiler did not refuse it) but the total is over the compiler's limit")
    print("\nsmallest slice that fits, per clip length:")
    for attention in sorted({k.split("/")[0] for k in cells}):
        for frames in TPU_FRAMES:
            found = None
            for name in SLICES:
                ok = [k for k, r in cells.items() if k.startswith(f"{attention}/{frames}/{name}/") and r.get("fits")]
                if ok:  # the most data-parallel mesh that fits
                    best = max(ok, key=lambda k: cells[k]["overrides"]["batch_size"])
                    found = (name, best.split("/")[-1], cells[best])
                    break
            tried = any(k.startswith(f"{attention}/{frames}/") for k in cells)
            if found:
                name, mesh, r = found
                print(f"  {attention} {frames:3} frames: {name}, mesh {mesh}, batch {r['overrides']['batch_size']}, "
                      f"{r['total_bytes'] / GIB:.1f} of {r['limit_bytes'] / GIB:.2f} GiB per chip")
            elif tried:
                print(f"  {attention} {frames:3} frames: none of the slices measured fits")


# ----------------------------------------------------------------------------- sampling

# the released model's 64-step sampler with guidance (both branches: DiT batch 2), one video per call
SAMPLE_CELLS = {
    "v5e-16/37/fsdp16": ("v5e-16", 37, {"mesh.fsdp": -1}, "xla"),
    "v5e-16/37/data2_fsdp8": ("v5e-16", 37, {"mesh.data": 2, "mesh.fsdp": 8}, "xla"),
    "rtx4090/37/int8": ("rtx4090", 37, {"model.param_dtype": "int8"}, "cudnn"),
    "v5p-8/85/data2_fsdp2": ("v5p-8", 85, {"mesh.data": 2, "mesh.fsdp": 2}, "xla"),
    "v5p-8/163/data2_fsdp2": ("v5p-8", 163, {"mesh.data": 2, "mesh.fsdp": 2}, "xla"),
    "v5p-8/163/data2_fsdp2/splash": ("v5p-8", 163, {"mesh.data": 2, "mesh.fsdp": 2}, "splash"),
    "h100-8/163/data2_fsdp4": ("h100-8", 163, {"mesh.data": 2, "mesh.fsdp": 4}, "cudnn"),
}
# dense bf16 peaks (vendor figures) for the FLOP floor, and mochi-xdit's published L40 times (49 frames at
# 848x480: 394 s on one L40, 74 s on six, CFG parallel x ring attention)
PEAK_TFLOPS = {"H100": 989, "L40": 181}
XDIT_L40_S = {1: 394, 6: 74}


def run_sample(args):
    path = args.results / "aot_sample.json"
    data = load(path)
    print(setup("sampler step of the released model (64 steps, guidance 6, batch 1)", args), flush=True)
    for key, (target, frames, over, attention) in SAMPLE_CELLS.items():
        if args.cells and key not in args.cells:
            continue
        if args.smoke:
            frames = 7
        overrides = {"config": "sample", "aot.target": target, "sampling.num_frames": frames,
                     "model.attention": attention, **over, **model_overrides(args)}
        cell(data, path, key, overrides, args.redo)
    show_sample(data)


def show_sample(data: dict):
    from mochi_jax.configs import dit as dit_presets
    from mochi_jax.lib.flops import sampler_flops
    from mochi_jax.models.dit import DiTConfig

    print(f"\n{'cell':30} {'GiB/device':>10} {'limit':>7} {'fits':>5}  mesh")
    for key, r in data["cells"].items():
        if "error" in r:
            print(f"{key:30} error: {r['error']}")
            continue
        total = (">" if r.get("compiler_error") else "") + f"{r['total_bytes'] / GIB:.2f}"
        print(f"{key:30} {total:>10} {r['limit_bytes'] / GIB:7.2f} {'yes' if r['fits'] else 'no':>5}  "
              + ", ".join(f"{k} {v}" for k, v in r["mesh"].items() if v > 1))
    cfg = DiTConfig.from_dict(dit_presets.PRESETS["mochi"])
    print("\nFLOP floor of one video (64 steps x 2 branches of the DiT forward; seconds at the dense bf16 peak):")
    for frames in (37, 49):
        flops = sampler_flops(cfg, frames, 480, 848)
        cols = "  ".join(f"{chip} x{n}: {flops / (n * peak * 1e12):6.1f} s"
                         for chip, peak in PEAK_TFLOPS.items() for n in (1, 4, 8))
        print(f"  {frames} frames 480x848: {flops / 1e15:6.1f} PFLOP; {cols}")
    print("  mochi-xdit, published (49 frames 848x480, L40): " + ", ".join(f"{n} GPU(s) {t} s"
                                                                          for n, t in XDIT_L40_S.items()))


# ----------------------------------------------------------------------------- offload: long clips, small cards

PCIE_GBPS = 25  # host <-> device, GB/s (PCIe 4.0 x16 in practice)
GENMO_H100_37_S = 1.67  # genmo's fine-tuner, 37 frames on one H100 (demos/fine_tuner/README.md)
OFFLOAD_REMATS = {"full": "full", "offload": "offload:residual", "offload_bf16": "offload:residual_bf16"}
OFFLOAD_CELLS = {  # key -> overrides: (target, base dtype, frames, remat)
    **{f"rtx4090/fp8+host/{name}/{frames}": ("rtx4090", "float8_e4m3fn", frames, remat)
       for frames in (37, 85, 163) for name, remat in OFFLOAD_REMATS.items()},
    # a v5e chip (16 GB): TPU's compiler cannot slice the host-held blocks one row at a time (weights_on_host
    # is refused), so the int8 base stays on the chip
    **{f"v5e-1/int8/{name}/85": ("v5e-1", "int8", 85, remat) for name, remat in OFFLOAD_REMATS.items()},
}


def run_offload(args):
    path = args.results / "aot_offload.json"
    data = load(path)
    data["setup"] = setup("10 B base (configs/dit.py 'mochi'), rank-16 LoRA on qkv_x/y, proj_x/y, AdamW; 480x848; "
                          "batch 1; '+host': blocks in pinned host memory; the platform's attention (cuDNN, splash); "
                          "autotuning off", args)
    for key, (target, dtype, frames, remat) in OFFLOAD_CELLS.items():
        if args.cells and key not in args.cells:
            continue
        cell(data, path, key, {"aot.target": target, "model.param_dtype": dtype, "model.weights_on_host": "+host" in key,
                               "model.remat": remat, "aot.num_frames": 7 if args.smoke else frames,
                               "aot.suggest": False, **model_overrides(args)}, args.redo)
    show_offload(data)


def show_offload(data: dict):
    from mochi_jax.lib.flops import flops_per_step
    from mochi_jax.models.dit import DiTConfig

    print("\nLong clips on small cards (AOT; 480x848, batch 1; '+host': blocks in pinned host memory): device and "
          "host memory, PCIe per step")
    print(f"{'cell':34} {'device':>7} {'limit':>6} {'fits':>4} {'host':>6} {'PCIe GB':>7} {'PCIe s':>6} "
          f"{'FLOP s':>6} {'sum s':>6}")
    for key, r in data["cells"].items():
        if "error" in r:
            print(f"{key:34} error: {r['error']}")
            continue
        frames, remat = r["overrides"]["aot.num_frames"], r["overrides"]["model.remat"]
        weights = r["inputs"].get("frozen weights in host memory", 0)
        # each block's weights cross twice (the forward, the backward's recompute), the offloaded inputs
        # twice (out in the forward, back in the backward)
        crossing = 2 * weights + 2 * (r["host_bytes"] - weights)
        pcie_s = crossing / (PCIE_GBPS * 1e9)
        flop_s = flops_per_step(DiTConfig(attention="cudnn"), frames, 480, 848, remat) / (FLOOR_TFLOPS * 1e12)
        print(f"{key:34} {r['total_bytes'] / GIB:7.2f} {r['limit_bytes'] / GIB:6.2f} {'yes' if r['fits'] else 'no':>4} "
              f"{r['host_bytes'] / GIB:6.2f} {crossing / 1e9:7.1f} {pcie_s:6.2f} {flop_s:6.2f} {pcie_s + flop_s:6.2f}")
    print(f"GiB per device and of pinned host memory; PCIe at {PCIE_GBPS} GB/s, not overlapped (an upper bound); "
          f"FLOP s at {FLOOR_TFLOPS} TFLOP/s (an H100's floor); genmo's fine-tuner: {GENMO_H100_37_S} s per step at "
          "37 frames on one H100")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("gpu", "tpu", "quant", "remat", "sample", "offload", "show"))
    p.add_argument("--cells", type=lambda s: s.split(","), default=None, help="sample, offload: the cells to measure")
    p.add_argument("--settings", type=lambda s: s.split(","), default=tuple(QUANT_SETTINGS),
                   help="quant: base settings to measure, of " + ", ".join(QUANT_SETTINGS))
    p.add_argument("--gpus", type=lambda s: s.split(","), default=GPUS)
    p.add_argument("--policies", type=lambda s: s.split(","), default=None)
    p.add_argument("--slices", type=lambda s: s.split(","), default=SLICES)
    p.add_argument("--frames", type=lambda s: [int(x) for x in s.split(",")], default=None)
    p.add_argument("--attention", default="xla")
    p.add_argument("--all", action="store_true", help="TPU: measure every slice, not only up to the first that fits")
    p.add_argument("--frugal", action="store_true",
                   help="TPU: start each slice from its most sequence-parallel mesh (the least memory per chip) and "
                        "stop at the first that does not fit: one compile says a slice cannot hold the clip at all")
    p.add_argument("--redo", action="store_true", help="measure cells already in the JSON again")
    p.add_argument("--results", type=Path, help="the folder of the JSON files (default benchmarks/results/)")
    p.add_argument("--model", default="mochi", help="the DiT's shapes (aot.model): 'mochi' or a configs/dit.py preset")
    p.add_argument("--smoke", action="store_true", help="one cell of a tiny model, to check that the script runs")
    args = p.parse_args(argv)
    if args.smoke:  # one cell: the first entry of every list, 7 frames, the tiny preset; flags given still win
        p.set_defaults(model="tiny", frames=[7], gpus=[(QUANT_GPUS if args.what == "quant" else GPUS)[0]],
                       slices=[SLICES[0]], settings=[next(iter(QUANT_SETTINGS))],
                       policies=[(REMAT_POLICIES if args.what == "remat" else POLICIES)[0]])
        args = p.parse_args(argv)
    args.results = args.results or (Path(tempfile.mkdtemp(prefix="aot_tables_smoke_")) if args.smoke else RESULTS)
    if args.what == "gpu":
        args.frames, args.policies = args.frames or GPU_FRAMES, args.policies or POLICIES
        run_gpu(args)
    elif args.what == "remat":
        args.frames, args.policies = args.frames or REMAT_FRAMES, args.policies or REMAT_POLICIES
        run_remat(args)
    elif args.what == "quant":
        args.gpus = QUANT_GPUS if args.gpus == GPUS else args.gpus
        args.frames = args.frames or QUANT_FRAMES
        run_quant(args)
    elif args.what == "tpu":
        args.frames = args.frames or TPU_FRAMES
        run_tpu(args)
    elif args.what == "sample":
        if args.smoke:
            args.cells = args.cells or [next(iter(SAMPLE_CELLS))]
        run_sample(args)
    elif args.what == "offload":
        if args.smoke:
            args.cells = args.cells or [next(iter(OFFLOAD_CELLS))]
        run_offload(args)
    else:
        for name, show in (("aot_gpu.json", show_gpu), ("aot_tpu.json", show_tpu), ("aot_gpu_quant.json", show_quant),
                           ("aot_remat.json", show_remat), ("aot_sample.json", show_sample),
                           ("aot_offload.json", show_offload)):
            if (args.results / name).exists():
                show(load(args.results / name))
    if args.what != "show":
        print(f"results in {args.results}")


if __name__ == "__main__":
    main()
