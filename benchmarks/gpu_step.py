"""The full 10 B LoRA train step and one full render on one accelerator: mochi_jax vs diffusers (+ PEFT), in one
timed script.

    python benchmarks/gpu_step.py                      # on a GPU host; ends within --budget (540 s)
    python benchmarks/gpu_step.py --size small         # a 3-block 'small' DiT on CPU (what the test runs)
    python benchmarks/gpu_step.py --policies dots_no_batch,dots:16,full:31 --frames 37,85,61   # 'full' always runs
    python benchmarks/gpu_step.py --policies full@int8,full@host,full@float8_e4m3fn+host --frames 37,85  # the 24 GB settings
    python benchmarks/gpu_step.py --wheels wheels      # no diffusers on the host: use these carried wheels
    python benchmarks/gpu_step.py --frames '' --render-frames 37,85   # renders only

What runs, each (frames, side, remat policy) in a FRESH subprocess (a device's peak memory cannot be reset):
  ours   `mochi_jax.lib.training.make_train_step` with `make_optimizer` (configs/lora.py's AdamW) and `init_state`,
         `MochiDiT` of configs/dit.py's 'mochi' preset, `REFERENCE_TARGETS` (rank 16 on qkv_x/y, proj_x/y),
         random bf16 weights built on the device by one jit from abstract shapes (no fp32 copy, no download),
         batch 1 at 480x848 with 256 valid text tokens, the 'normalized' flow loss, caption dropout 0 (both
         sides then attend to every text token), attention 'cudnn' on GPU ('xla' elsewhere), remat 'full'
         and each other --policies entry (a REMAT_POLICIES name or save:<names>, a remat_groups string such as
         'dots:16,full:31': the stacked blocks' groups, the last block 'full', or 'auto': per clip length the
         setting remat='auto' picked on an H100, from results/aot_remat.json). A named policy may end in a
         frozen-base setting: '@int8' / '@float8_e4m3fn' (model.param_dtype: a quantized base, its random
         weights drawn in that format), '@host' (model.weights_on_host: the stacked blocks in pinned host
         memory, streamed to the device inside the scan), or both joined by '+', e.g. 'full@int8+host'.
  torch  diffusers' MochiTransformer3DModel of the same size, random bf16 weights made on the device, PEFT
         LoraConfig(r=16, alpha=16) on to_q/to_k/to_v/add_q_proj/add_k_proj/add_v_proj/to_out.0/to_add_out
         (the same layers: diffusers splits qkv into three adapters), gradient checkpointing, LoRA in fp32,
         the same loss and AdamW. Runs where torch, diffusers and peft import and torch sees the device
         JAX used; without diffusers the script prints the wheels to carry and records why it skipped.
  render (policy 'render', both sides, at --render-frames: 37; small: 7) one video of --render-steps (64) Euler
         steps with classifier-free guidance 6.0 (configs/sample.py's; the DiT runs prompt and negative prompt as a
         batch of 2) from random T5 features (256 tokens, 64 of the prompt's valid, the negative prompt's EOS alone;
         T5 itself is not run on either side), then the tiled VAE decode (the released VAE, random weights, 256x256
         pixel tiles overlapping by 64) to frames on the host. Ours: what `python -m mochi_jax.sample` runs
         (`sampling.placement` on a one-device mesh, `sampling.denoise`, `sampling.decode_frames`); theirs:
         diffusers' MochiPipeline with prompt_embeds, the VAE's enable_tiling with the same tiles, output_type 'np'.
         A 2-step render first (ours compiles there); then the timed one: denoise s, decode s, their sum (render_s),
         peak device memory, and the DiT passes' TFLOP/s (`mochi_jax.lib.flops.sampler_flops`).
Per train run: compile time (ours: lower + compile), first step, median and min s/step over --steps (>= 10) after
--warmup steps, peak device memory (`memory_stats()['peak_bytes_in_use']`; torch: max_memory_allocated and
reserved; host peak RSS on CPU), XLA's memory_analysis, and achieved TFLOP/s = FLOPs / median from
`mochi_jax.lib.flops.flops_per_step` (matmuls + attention: forward, input gradients, LoRA gradients, recompute),
as a fraction of the chip's nominal dense bf16 peak and against the "FLOP floor" at 800 TFLOP/s.
XLA's own count is recorded too: `compiled.cost_analysis()` of the step that runs (a scan body counts once
and cuDNN attention counts 0: compare with `flop_breakdown(..., as_xla_counts=True)`), and with --xla-check
(default at --size small) the pre-optimisation cost analysis of the same step with the blocks unrolled.

Time budget: the runs go in order of importance (37 full, torch 37, the renders, 37 <policy>, 85 full,
torch 85, ...: --frames gives the order) and each one is first estimated: process start and weight init +
compile + (warmup + steps) x FLOPs / rate, priors until the first run of a side is measured, then that
side's measured overheads and rate. A run whose estimate does not fit what is left of --budget is
skipped, and one that overruns is killed; both are recorded with the reason.

Output: a table on stdout and one JSON file (--out, default benchmarks/results/gpu_step.json, at --size small
gpu_step_small.json; rewritten after every run, so a killed script still leaves what it measured):
  benchmark, size, budget_s, total_wall_s, settings {frames, policies, steps, warmup, height, width,
  text_tokens, batch, dtype, lora_rank, attention, render {frames, steps, guidance, prompt_tokens, tiled_decode,
  vae}}, model {preset, DiTConfig fields, params}, device {platform,
  kind, peak_tflops, memory_bytes} (from the first run of ours), versions, diffusers {available, version,
  reason, missing, wheels}, flops {frames: {policy: flop_breakdown}}, render_flops {frames: {total, steps}},
  anchors (published: the official fine-tuner's H100 steps, mochi-xdit's L40 renders; FLOP floors),
  runs [{side 'jax' | 'torch', frames, policy, status 'ok' | 'skipped' | 'failed' | 'timeout', reason,
  estimate_s, wall_s, and when ok: compile_s (jax), setup_s, first_step_s, warmup_times_s, step_times_s,
  median_s, min_s, steps, peak_bytes (device; None on CPU), memory {peak_bytes_after_setup, host_peak_rss,
  jax: device_bytes_limit, xla {temp, argument, output, alias} / torch: peak_reserved_bytes}, flops, tflops,
  frac_peak, floor_s, loss_first, loss_last, lora_params, versions, jax: params, attention, xla {compiled_flops,
  model_as_xla_counts, compiled_ratio, unrolled {policy: {lowered_flops, model_flops, ratio}}, check_s},
  torch: lora_layers, threads}; a render: steps, guidance, setup_s, warmup_denoise_s, warmup_decode_s, render_s,
  denoise_s, decode_s, step_s, flops, tflops, frac_peak, floor_s, peak_bytes, memory, video_shape, video_mean],
  ratios [{frames, policy, jax_median_s, torch_median_s, speedup, memory_ratio}], render_ratios [{frames,
  jax_render_s, torch_render_s, speedup, denoise_speedup, decode_speedup, memory_ratio}], skipped [{side, frames,
  policy, reason}].
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GB = 1e9
SIZES = {
    # the real model at the official fine-tuner's resolution; --frames order = importance
    # renders: the released VAE, tiled as `sample` decodes (256x256 pixel tiles, 64 overlap), a 64-token prompt
    "full": dict(preset="mochi", frames="37,85,61", height=480, width=848, text_tokens=256, dtype="bfloat16",
                 render_frames="37", prompt_tokens=64, vae={}),
    # CPU smoke size: the 'small' preset's widths (512 visual, 256 text) with 3 of its 8 blocks (a scan of 2
    # and the last block: every code path) at 64x96, float32 (XLA:CPU emulates bf16 matmuls); renders decode
    # with a narrow VAE in 32x48 tiles (so 64x96 still takes several)
    "small": dict(preset="small", frames="7,13", height=64, width=96, text_tokens=16, dtype="float32", depth=3,
                  render_frames="7", prompt_tokens=12,
                  vae=dict(encoder_channels=(32, 32, 64, 64), decoder_channels=(32, 64, 64, 64),
                           layers_per_block=(1, 1, 1, 1, 1), tile_size=(32, 48), tile_overlap=(8, 8))),
}
# A render run's policy name (both sides): one video, 64 Euler steps with classifier-free guidance at
# configs/sample.py's scale (the DiT runs the prompt and the negative prompt as a batch of 2), then the tiled
# VAE decode to frames on the host
RENDER = "render"
RENDER_GUIDANCE = 6.0
LORA_RANK = 16
# diffusers' MochiAttention names of the same layers (qkv_x = to_q|to_k|to_v, qkv_y = add_{q,k,v}_proj, proj_x =
# to_out.0, proj_y = to_add_out), anchored to the blocks' attn1: a bare "to_q" would also catch the caption pooler
PEFT_TARGETS = (r".*transformer_blocks\.\d+\.attn1\."
                r"(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|to_out\.0|to_add_out)$")
# configs/lora.py's optimizer (the official fine-tuner's): AdamW, 200 warmup steps, cosine to step 2000
OPTIM = dict(lr=2e-4, weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8, warmup_steps=200, schedule="cosine",
             decay_steps=2000, grad_clip=0.0, grad_accum=1)
# Published reference numbers: genmo's fine-tuner on one H100 SXM, rank 16, full activation checkpointing
# (genmoai/mochi, demos/fine_tuner/README.md, "System Requirements"): frames -> (s/step, GB).
OFFICIAL = {37: (1.67, 50), 61: (3.35, 64), 79: (4.92, "69-78"), 85: (5.44, 80)}
FLOOR_TFLOPS = 800.0  # an 8192^3 bf16 matmul on an H100 measures 769-798 TFLOP/s
# Nominal dense bf16 peak, TFLOP/s, by device-name substring (first match wins).
PEAKS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.4), ("H200", 989.4), ("H100", 989.4),
         ("H800", 989.4), ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("A6000", 155.0)]
# diffusers' pure-Python wheel and its requirements (from diffusers-0.42.1.dist-info, the version the
# project's parity tests use): what to carry to a host that lacks it.
DIFFUSERS = ("diffusers", "0.42.1")
DIFFUSERS_REQUIRES = [("importlib_metadata", ""), ("filelock", ""), ("huggingface_hub", ">=1.32.0,<3.0"),
                      ("numpy", ""), ("regex", "!=2019.12.17"), ("requests", ""), ("safetensors", ">=0.8.0"),
                      ("Pillow", "")]
PURE_PYTHON = {"importlib_metadata", "zipp", "filelock", "huggingface_hub", "requests"}
# --policies 'auto': what remat='auto' picked for one H100 at each clip length within the issue's budgets
# (40 GB at 37 frames, 60 GB at 85), compiled ahead of time by `benchmarks/aot_tables.py remat`
REMAT_PICKS = REPO / "benchmarks" / "results" / "aot_remat.json"
# Estimates before a side has run once: seconds of process start + imports + weight init, of compile, and
# the achieved FLOP/s. GPU ('full') priors are deliberately a little pessimistic.
PRIORS = {"full": {"jax": (60.0, 100.0, 400e12), "torch": (45.0, 0.0, 300e12)},
          "small": {"jax": (15.0, 20.0, 3e9), "torch": (15.0, 0.0, 3e9)}}
# Seconds of one VAE decode of a render before any has run (a render decodes twice: warm-up and timed); the
# untiled decode of 37 frames at 480x848 is 271 TFLOP (XLA's count), the tiled one ~2.4x that in 15 overlapping tiles
DECODE_PRIOR = {"full": 15.0, "small": 10.0}
# Published: mochi-xdit (xDiT) renders 49 frames at 848x480 in 394 s on one L40, 74 s on six (CFG parallel x ring)
XDIT_L40 = dict(frames=49, height=480, width=848, gpus={"1": 394.0, "6": 74.0})


# ----------------------------------------------------------------------------- shared helpers


def preset(name: str) -> dict:
    """configs/dit.py's preset as a dict; read from the file when ml_collections is not installed."""
    try:
        from configs import dit as dit_presets

        return dict(dit_presets.get_config(name))
    except ImportError:
        tree = ast.parse((REPO / "configs" / "dit.py").read_text())
        for node in tree.body:
            if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "PRESETS":
                presets = {k.value: {kw.arg: ast.literal_eval(kw.value) for kw in v.keywords}
                           for k, v in zip(node.value.keys, node.value.values)}
                return dict(presets[name], remat="full", scan_layers=True)
        raise


def split_setting(policy: str) -> tuple[str, dict]:
    """'full@int8+host' -> ('full', {'param_dtype': 'int8', 'weights_on_host': True}); no '@': no change."""
    policy, _, base = policy.partition("@")
    over = {}
    for part in filter(None, base.split("+")):
        if part == "host":
            over["weights_on_host"] = True
        else:
            over["param_dtype"] = part
    return policy, over


def dit_config(size: str, policy: str, attention: str, depth: int | None = None, **over):
    """The DiTConfig of a run: the size's preset (`depth` blocks if given) and dtype, `policy` as remat or
    as remat_groups, and its base setting (`split_setting`)."""
    from mochi_jax.models.dit import DiTConfig
    from mochi_jax.models.remat import is_remat_groups

    policy, base = split_setting(policy)
    over = {**base, **over}
    s = SIZES[size]
    fields = {k: v for k, v in preset(s["preset"]).items() if k in {f.name for f in dataclasses.fields(DiTConfig)}}
    remat = dict(remat="full", remat_groups=policy) if is_remat_groups(policy) else dict(remat=policy, remat_groups="")
    if depth or s.get("depth"):
        fields["depth"] = depth or s["depth"]
    return DiTConfig(**{**fields, "param_dtype": s["dtype"], "compute_dtype": s["dtype"], "attention": attention,
                        **remat, **over})


def remat_of(policy: str) -> str:
    """The remat part of a policy entry (what the FLOP model counts)."""
    return split_setting(policy)[0]


def peak_tflops(kind: str) -> float | None:
    for key, tf in PEAKS:
        if key.lower() in kind.lower():
            return tf
    return None


def latent_shape(frames: int, h: int, w: int) -> tuple:
    return (1, 12, (frames - 1) // 6 + 1, h // 8, w // 8)


def host_peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def timed(fn, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


# ----------------------------------------------------------------------------- ours (a child process)


def random_params(cfg, targets, sharding, seed: int = 0):
    """Random frozen weights made on the device by one jit from abstract shapes, straight in the param
    dtype: kernels N(0, 1/fan_in), biases 0, norm weights 1, pos_frequencies N(0, 0.02^2). Stacked block
    weights are drawn one layer at a time (lax.map), so the generator's temporaries stay one layer's size
    and the device's peak memory stays the step's."""
    import jax
    import jax.numpy as jnp

    from mochi_jax.models.dit import abstract_variables

    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_variables(cfg, targets)["params"])

    def init(key):
        out = []
        for i, (path, s) in enumerate(leaves):
            name = getattr(path[-1], "key", "")
            if name == "bias":
                out.append(jnp.zeros(s.shape, s.dtype))
            elif name == "weight":
                out.append(jnp.ones(s.shape, s.dtype))
            else:
                std = s.shape[-2] ** -0.5 if name == "kernel" else 0.02

                def draw(k, shape=s.shape[1:] if len(s.shape) == 3 else s.shape, std=std, dtype=s.dtype):
                    if jnp.issubdtype(dtype, jnp.integer):  # an int8 kernel: its scale carries the size
                        return jax.random.randint(k, shape, -127, 128, dtype)
                    return (jax.random.normal(k, shape, jnp.float32) * std).astype(dtype)

                k = jax.random.fold_in(key, i)
                out.append(jax.lax.map(draw, jax.random.split(k, s.shape[0])) if len(s.shape) == 3 else draw(k))
        return jax.tree_util.tree_unflatten(treedef, out)

    return jax.jit(init, out_shardings=sharding)(jax.random.PRNGKey(seed))


def xla_flops(cost) -> float | None:
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    return float(cost["flops"]) if cost and "flops" in cost else None


def child_jax(a) -> dict:
    t_start = time.perf_counter()
    import types

    import jax
    import jax.numpy as jnp

    from mochi_jax.lib import training
    from mochi_jax.lib.flops import flop_breakdown
    from mochi_jax.models import lora as lora_lib
    from mochi_jax.models import sharding as sharding_lib
    from mochi_jax.models.dit import MochiDiT, abstract_variables, param_count

    dev = jax.devices()[0]
    attention = a.attention if a.attention != "auto" else ("cudnn" if dev.platform == "gpu" else "xla")
    cfg = dit_config(a.size, a.policy, attention, a.depth)
    policy = remat_of(a.policy)
    targets = lora_lib.targets_from_config({k: dict(v, rank=LORA_RANK, alpha=float(LORA_RANK))
                                            for k, v in lora_lib.REFERENCE_TARGETS.items()})
    model, one = MochiDiT(cfg, targets), jax.sharding.SingleDeviceSharding(dev)
    opt = training.make_optimizer(types.SimpleNamespace(**OPTIM))
    mesh = sh = None
    if cfg.weights_on_host:  # the blocks' memory kind is a sharding: the trainer's, on a one-device mesh
        mesh = sharding_lib.make_mesh({"data": 1}, [dev])
        sh = training.train_shardings(model, opt, mesh)
    params = jax.block_until_ready(random_params(cfg, targets, sh["params"] if sh else one))
    state = training.init_state(model, opt, 0, sh["state"] if sh else one)
    shape = latent_shape(a.frames, a.height, a.width)
    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    batch = dict(mean=jax.random.normal(k1, shape), logvar=jnp.full(shape, -4.0),
                 t5_feats=jax.random.normal(k2, (1, a.text_tokens, cfg.t5_dim)),
                 t5_mask=jnp.ones((1, a.text_tokens), bool))
    batch = jax.device_put(batch, {k: sh["batch"][k] for k in batch} if sh else one)
    setup_s = time.perf_counter() - t_start
    setup_peak = (dev.memory_stats() or {}).get("peak_bytes_in_use")

    t = time.perf_counter()
    if sh is None:
        compiled = training.make_train_step(model, opt, "normalized", 0.0).lower(state, params, batch).compile()
    else:
        with sharding_lib.activate(mesh):
            compiled = training.make_train_step(model, opt, "normalized", 0.0, mesh, sh).jitted.lower(
                state, params, batch).compile()
    compile_s = time.perf_counter() - t
    m = compiled.memory_analysis()
    memory = {k: getattr(m, f"{k}_size_in_bytes", None) for k in ("temp", "argument", "output", "alias",
                                                                    "generated_code")} if m is not None else {}
    flops = flop_breakdown(cfg, a.frames, a.height, a.width, policy, targets, a.text_tokens)
    as_counted = flop_breakdown(cfg, a.frames, a.height, a.width, policy, targets, a.text_tokens,
                                as_xla_counts=True)["total"]
    xla = dict(compiled_flops=xla_flops(compiled.cost_analysis()), model_as_xla_counts=as_counted)
    xla["compiled_ratio"] = xla["compiled_flops"] / as_counted if xla["compiled_flops"] else None

    losses, box = [], {"state": state}

    def one_step():
        box["state"], out = compiled(box["state"], params, batch)
        losses.append(float(jax.block_until_ready(out)["loss"]))

    first = timed(one_step, 1)[0]
    warm = timed(one_step, a.warmup - 1)
    times = timed(one_step, a.steps)
    stats = dev.memory_stats() or {}

    t = time.perf_counter()
    if a.xla_check:  # the same step with the blocks unrolled, lowered only: every block is counted
        xla["unrolled"] = {}
        for pol in [a.policy] + (["none"] if a.policy == "full" else []):  # 'none': forward + backward alone
            if cfg.remat_groups or cfg.weights_on_host:
                xla["unrolled"][pol] = "remat groups and host-streamed blocks need scanned blocks"
                continue
            ucfg = dataclasses.replace(dit_config(a.size, pol, attention, a.depth), scan_layers=False)
            umodel = MochiDiT(ucfg, targets)
            abstract = abstract_variables(ucfg, targets)
            ustate = {"step": jax.ShapeDtypeStruct((), jnp.int32), "lora": abstract["lora"],
                      "opt": jax.eval_shape(opt.init, abstract["lora"]),
                      "rng": jax.eval_shape(lambda: jax.random.PRNGKey(0))}
            lowered = training.make_train_step(umodel, opt, "normalized", 0.0).lower(ustate, abstract["params"], batch)
            got = xla_flops(lowered.cost_analysis())
            want = flop_breakdown(ucfg, a.frames, a.height, a.width, remat_of(pol), targets, a.text_tokens)["total"]
            xla["unrolled"][pol] = dict(lowered_flops=got, model_flops=want, ratio=got / want if got else None)
    xla["check_s"] = time.perf_counter() - t

    med = statistics.median(times)
    peak_tf = peak_tflops(dev.device_kind) if dev.platform == "gpu" else None
    peak_tf = a.peak_tflops or peak_tf
    return dict(
        status="ok", side="jax", frames=a.frames, policy=a.policy, attention=attention, setup_s=setup_s,
        compile_s=compile_s, first_step_s=first, warmup_times_s=[first, *warm], step_times_s=times, median_s=med,
        min_s=min(times), steps=len(times), peak_bytes=stats.get("peak_bytes_in_use"),
        memory=dict(device_bytes_limit=stats.get("bytes_limit"), bytes_in_use_after=stats.get("bytes_in_use"),
                    peak_bytes_after_setup=setup_peak,
                    host_peak_rss=host_peak_rss(), xla=memory),
        flops=flops["total"], tflops=flops["total"] / med / 1e12,
        frac_peak=flops["total"] / med / 1e12 / peak_tf if peak_tf else None,
        floor_s=flops["total"] / (FLOOR_TFLOPS * 1e12), loss_first=losses[0], loss_last=losses[-1], xla=xla,
        lora_params=lora_lib.count(box["state"]["lora"]), params=param_count(params),
        device=dict(platform=dev.platform, kind=dev.device_kind, peak_tflops=peak_tf,
                    memory_bytes=stats.get("bytes_limit")),
        versions={"jax": jax.__version__, "jaxlib": importlib.metadata.version("jaxlib")},
        cfg=dataclasses.asdict(cfg),
    )


# ----------------------------------------------------------------------------- diffusers + PEFT (a child)


def torch_setup(a):
    """(device, dtype) of a torch run, seeded, with torch's CPU threads set; or a 'skipped' result when torch
    does not see the device JAX ran on."""
    import torch

    cuda = torch.cuda.is_available()
    if (a.expect_device == "gpu") != cuda:
        return dict(status="skipped", reason=f"torch sees {'a' if cuda else 'no'} CUDA device while JAX ran on "
                    f"{a.expect_device}: the two sides would not share a device")
    if not cuda:  # torch at 2 threads on a loaded 2-core machine runs 10x slower than at 1 (docs/benchmarks.md)
        torch.set_num_threads(a.torch_threads)
    torch.manual_seed(0)
    return torch.device("cuda" if cuda else "cpu"), getattr(torch, SIZES[a.size]["dtype"])


def torch_dit(cfg, text_tokens: int):
    """diffusers' MochiTransformer3DModel of `cfg`'s size, on the meta device (no memory yet)."""
    import torch
    from diffusers import MochiTransformer3DModel

    with torch.device("meta"):
        return MochiTransformer3DModel(
            patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
            num_layers=cfg.depth, pooled_projection_dim=cfg.text_width, in_channels=cfg.in_channels,
            text_embed_dim=cfg.t5_dim, time_embed_dim=cfg.time_embed_dim, max_sequence_length=text_tokens)


def materialise(model, dev, dtype):
    """Every parameter of a meta-device model made on `dev` in `dtype` (no fp32 copy), frozen, with ours'
    init (`random_params`, `random_vae_params`): biases 0, other vectors 1, pos_frequencies N(0, 0.02^2),
    the rest N(0, 1/fan_in); meta buffers zero."""
    import torch

    for mod in list(model.modules()):
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            if p.ndim == 1 and name == "bias":
                v = torch.zeros(p.shape, dtype=dtype, device=dev)
            elif p.ndim == 1:
                v = torch.ones(p.shape, dtype=dtype, device=dev)
            elif name == "pos_frequencies":
                v = torch.randn(p.shape, dtype=torch.float32, device=dev) * 0.02
            else:
                fan_in = p[0].numel()
                v = torch.randn(p.shape, dtype=dtype, device=dev) * fan_in ** -0.5
            mod._parameters[name] = torch.nn.Parameter(v, requires_grad=False)
        for name, b in list(mod._buffers.items()):
            if b is not None and b.is_meta:
                mod._buffers[name] = torch.zeros(b.shape, dtype=b.dtype, device=dev)
    return model


def child_torch(a) -> dict:
    t_start = time.perf_counter()
    import torch
    from peft import LoraConfig

    from mochi_jax.lib.flops import flop_breakdown
    from mochi_jax.models import vae as vae_lib

    if isinstance(setup := torch_setup(a), dict):
        return setup
    (dev, dtype), cfg = setup, dit_config(a.size, "full", "xla", a.depth)
    cuda = dev.type == "cuda"
    model = materialise(torch_dit(cfg, a.text_tokens), dev, dtype)
    model.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=PEFT_TARGETS))
    lora = [p for p in model.parameters() if p.requires_grad]
    for p in lora:  # LoRA factors and their optimizer state in fp32, like ours
        p.data = p.data.to(device=dev, dtype=torch.float32)
    model.enable_gradient_checkpointing()
    model.train()
    opt = torch.optim.AdamW(lora, lr=OPTIM["lr"], betas=(OPTIM["b1"], OPTIM["b2"]), eps=OPTIM["eps"],
                            weight_decay=OPTIM["weight_decay"])
    shape = latent_shape(a.frames, a.height, a.width)
    g = torch.Generator(device=dev).manual_seed(1)
    mean = torch.randn(shape, generator=g, device=dev)
    logvar = torch.full(shape, -4.0, device=dev)
    feats = torch.randn((1, a.text_tokens, cfg.t5_dim), generator=g, device=dev).to(dtype)
    mask = torch.ones((1, a.text_tokens), dtype=torch.bool, device=dev)
    lm = torch.tensor(vae_lib.LATENTS_MEAN, dtype=torch.float32, device=dev).view(1, -1, 1, 1, 1)
    ls = torch.tensor(vae_lib.LATENTS_STD, dtype=torch.float32, device=dev).view(1, -1, 1, 1, 1)
    if cuda:  # no reset of the peak: like ours, it includes making the weights (about their size)
        torch.cuda.synchronize()
    setup_s, losses = time.perf_counter() - t_start, []
    setup_peak = torch.cuda.max_memory_allocated(dev) if cuda else None

    def one_step():  # the 'normalized' flow loss, as flow_loss computes it
        n, eps = torch.randn(shape, generator=g, device=dev), torch.randn(shape, generator=g, device=dev)
        sigma = torch.rand((1,), generator=g, device=dev)
        z = (mean + torch.exp(0.5 * logvar) * n - lm) / ls
        s = sigma.view(-1, 1, 1, 1, 1)
        pred = model(hidden_states=((1 - s) * z + s * eps).to(dtype), encoder_hidden_states=feats,
                     timestep=1000.0 * (1.0 - sigma), encoder_attention_mask=mask, return_dict=False)[0]
        loss = torch.mean((pred.float() - (z - eps)) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())  # waits for the step

    first = timed(one_step, 1)[0]
    warm = timed(one_step, a.warmup - 1)
    times = timed(one_step, a.steps)
    med = statistics.median(times)
    flops = flop_breakdown(dataclasses.replace(cfg, attention="cudnn" if cuda else "xla"), a.frames, a.height,
                           a.width, "full", None, a.text_tokens)["total"]  # checkpointing = full recompute
    kind = torch.cuda.get_device_name(dev) if cuda else "cpu"
    peak_tf = a.peak_tflops or (peak_tflops(kind) if cuda else None)
    return dict(
        status="ok", side="torch", frames=a.frames, policy="gradient checkpointing", setup_s=setup_s,
        first_step_s=first, warmup_times_s=[first, *warm], step_times_s=times, median_s=med, min_s=min(times),
        steps=len(times), peak_bytes=torch.cuda.max_memory_allocated(dev) if cuda else None,
        memory=dict(peak_reserved_bytes=torch.cuda.max_memory_reserved(dev) if cuda else None,
                    peak_bytes_after_setup=setup_peak,
                    host_peak_rss=host_peak_rss()),
        flops=flops, tflops=flops / med / 1e12, frac_peak=flops / med / 1e12 / peak_tf if peak_tf else None,
        floor_s=flops / (FLOOR_TFLOPS * 1e12), loss_first=losses[0], loss_last=losses[-1],
        lora_params=sum(p.numel() for p in lora), device=dict(kind=kind),
        lora_layers=sum(1 for m in model.modules() if hasattr(m, "lora_A") and len(m.lora_A)),
        threads=None if cuda else torch.get_num_threads(),
        versions={"torch": torch.__version__, "diffusers": importlib.metadata.version("diffusers"),
                  "peft": importlib.metadata.version("peft")},
    )


# ----------------------------------------------------------------------------- one render (a child per side)


def text_inputs(text_tokens: int, t5_dim: int, prompt_tokens: int):
    """Random T5 features (float32) and masks of a prompt (its first `prompt_tokens` tokens valid) and of
    the empty negative prompt (EOS alone): ((feats [1, L, D], mask [1, L]), same for the negative)."""
    import numpy as np

    rng = np.random.default_rng(2)
    feats = rng.standard_normal((2, 1, text_tokens, t5_dim)).astype(np.float32)
    mask = np.zeros((2, 1, text_tokens), bool)
    mask[0, 0, :prompt_tokens], mask[1, 0, :1] = True, True
    return (feats[0], mask[0]), (feats[1], mask[1])


def vae_config(size: str):
    """The render's VAEConfig: the size's architecture and tiles, weights and convolutions in its dtype."""
    from mochi_jax.models.vae import VAEConfig

    dtype = SIZES[size]["dtype"]
    return VAEConfig(**SIZES[size]["vae"], param_dtype=dtype, compute_dtype=dtype)


def random_vae_params(cfg, sharding, seed: int = 3):
    """Random VAE weights made by one jit from abstract shapes in cfg.param_dtype, with `materialise`'s init."""
    import math

    import jax
    import jax.numpy as jnp

    from mochi_jax.models import vae as vae_lib

    leaves, treedef = jax.tree_util.tree_flatten_with_path(
        jax.eval_shape(lambda k: vae_lib.init(k, cfg), jax.random.PRNGKey(0)))
    dtype = jnp.dtype(cfg.param_dtype)

    def init(key):
        out = []
        for i, (path, s) in enumerate(leaves):
            if len(s.shape) == 1:
                out.append(jnp.full(s.shape, 0.0 if getattr(path[-1], "key", "") == "bias" else 1.0, dtype))
            else:
                std = math.prod(s.shape[:-1]) ** -0.5
                out.append((jax.random.normal(jax.random.fold_in(key, i), s.shape, jnp.float32) * std).astype(dtype))
        return jax.tree_util.tree_unflatten(treedef, out)

    return jax.jit(init, out_shardings=sharding)(jax.random.PRNGKey(seed))


def render_result(a, side: str, setup_s: float, warm: tuple, times: tuple, flops: float, peak_tf, frames, **extra):
    """A render run's JSON: warm (the first call's denoise of two steps, its decode) and times (denoise, decode) in s;
    video_mean: the frames' mean in [0, 1] (ours are uint8, diffusers' 'np' output floats)."""
    denoise_s, decode_s = times
    return dict(status="ok", side=side, frames=a.frames, policy=RENDER, steps=a.render_steps,
                guidance=RENDER_GUIDANCE, setup_s=setup_s, warmup_denoise_s=warm[0], warmup_decode_s=warm[1],
                render_s=denoise_s + decode_s, denoise_s=denoise_s, decode_s=decode_s,
                step_s=denoise_s / a.render_steps, flops=flops, tflops=flops / denoise_s / 1e12,
                frac_peak=flops / denoise_s / 1e12 / peak_tf if peak_tf else None,
                floor_s=flops / (FLOOR_TFLOPS * 1e12), video_shape=list(frames.shape),
                video_mean=float(frames.astype("float64").mean() / (255 if frames.dtype == "uint8" else 1)), **extra)


def child_jax_render(a) -> dict:
    """One render as `python -m mochi_jax.sample` makes it: the DiT placed by `sampling.placement` on a one-device
    mesh, `sampling.denoise` (64 steps, guidance), `sampling.decode_frames` (tiled) to uint8 frames on the host.
    A 2-step render first compiles the step and the decoder (its times are the warm-up's)."""
    t_start = time.perf_counter()
    import jax

    from mochi_jax.lib import sampling
    from mochi_jax.lib.flops import sampler_flops
    from mochi_jax.models import sharding as sharding_lib
    from mochi_jax.models import vae as vae_lib
    from mochi_jax.models.dit import param_count

    dev = jax.devices()[0]
    attention = a.attention if a.attention != "auto" else ("cudnn" if dev.platform == "gpu" else "xla")
    cfg = dit_config(a.size, "none", attention, a.depth)  # no gradients: remat plays no part
    place = sampling.placement(cfg, (), sharding_lib.make_mesh({"data": 1}, [dev]))
    params = jax.block_until_ready(random_params(cfg, (), place.params))
    vcfg = vae_config(a.size)
    vparams = jax.block_until_ready(random_vae_params(vcfg, place.replicated))
    cond, uncond = text_inputs(a.text_tokens, cfg.t5_dim, a.prompt_tokens)
    shape = sampling.latent_shape(a.frames, a.height, a.width)
    sigmas = sampling.sigma_schedule(a.render_steps)
    setup_s = time.perf_counter() - t_start

    def render(sig):
        t0 = time.perf_counter()
        z = jax.block_until_ready(sampling.denoise(cfg, params, sampling.initial_noise([0], shape), cond, uncond,
                                                   sig, RENDER_GUIDANCE))
        t1 = time.perf_counter()
        frames = sampling.decode_frames(vcfg, vparams, z, tiled=True)
        return frames, (t1 - t0, time.perf_counter() - t1)

    _, warm = render(sigmas[:3])
    frames, times = render(sigmas)
    stats = dev.memory_stats() or {}
    peak_tf = a.peak_tflops or (peak_tflops(dev.device_kind) if dev.platform == "gpu" else None)
    flops = sampler_flops(cfg, a.frames, a.height, a.width, a.render_steps, True, a.text_tokens)
    return render_result(
        a, "jax", setup_s, warm, times, flops, peak_tf, frames, attention=attention,
        peak_bytes=stats.get("peak_bytes_in_use"),
        memory=dict(device_bytes_limit=stats.get("bytes_limit"), host_peak_rss=host_peak_rss()),
        params=param_count(params), vae_params=vae_lib.param_count(vparams),
        device=dict(platform=dev.platform, kind=dev.device_kind, peak_tflops=peak_tf,
                    memory_bytes=stats.get("bytes_limit")),
        versions={"jax": jax.__version__, "jaxlib": importlib.metadata.version("jaxlib")})


def child_torch_render(a) -> dict:
    """One render with diffusers' MochiPipeline (no text encoder: the same T5 features as ours given as
    prompt_embeds), the VAE tiled with ours' tiles (enable_tiling), output_type 'np' (frames on the host).
    A 2-step call first; the timed call's last step callback (after a device sync) splits denoise and decode."""
    t_start = time.perf_counter()
    import torch
    from diffusers import AutoencoderKLMochi, FlowMatchEulerDiscreteScheduler, MochiPipeline

    from mochi_jax.lib.flops import sampler_flops

    if isinstance(setup := torch_setup(a), dict):
        return setup
    (dev, dtype), cfg, vcfg = setup, dit_config(a.size, "none", "xla", a.depth), vae_config(a.size)
    cuda = dev.type == "cuda"
    model = materialise(torch_dit(cfg, a.text_tokens), dev, dtype).eval()
    with torch.device("meta"):
        vae = AutoencoderKLMochi(
            encoder_block_out_channels=vcfg.encoder_channels, decoder_block_out_channels=vcfg.decoder_channels,
            latent_channels=vcfg.latent_channels, layers_per_block=vcfg.layers_per_block,
            temporal_expansions=vcfg.temporal_expansions, spatial_expansions=vcfg.spatial_expansions,
            add_attention_block=vcfg.encoder_attention)
    vae = materialise(vae, dev, dtype).eval()
    (th, tw), (oh, ow) = vcfg.tile_size, vcfg.tile_overlap
    vae.enable_tiling(tile_sample_min_height=th, tile_sample_min_width=tw, tile_sample_stride_height=th - oh,
                      tile_sample_stride_width=tw - ow)
    pipe = MochiPipeline(scheduler=FlowMatchEulerDiscreteScheduler(invert_sigmas=True), vae=vae, text_encoder=None,
                         tokenizer=None, transformer=model)
    pipe.set_progress_bar_config(disable=True)
    (feats, mask), (nfeats, nmask) = (
        (torch.from_numpy(f).to(dev, dtype), torch.from_numpy(m).to(dev)) for f, m in
        text_inputs(a.text_tokens, cfg.t5_dim, a.prompt_tokens))
    if cuda:
        torch.cuda.synchronize()
    setup_s = time.perf_counter() - t_start
    marks = []

    def mark(_pipe, i, _t, _kwargs):
        if i == _pipe.num_timesteps - 1:
            if cuda:
                torch.cuda.synchronize()
            marks.append(time.perf_counter())
        return {}

    def render(steps):
        marks.clear()
        t0 = time.perf_counter()
        video = pipe(prompt_embeds=feats, prompt_attention_mask=mask, negative_prompt_embeds=nfeats,
                     negative_prompt_attention_mask=nmask, height=a.height, width=a.width, num_frames=a.frames,
                     num_inference_steps=steps, guidance_scale=RENDER_GUIDANCE, output_type="np",
                     generator=torch.Generator(device=dev).manual_seed(0), callback_on_step_end=mark).frames
        return video, (marks[0] - t0, time.perf_counter() - marks[0])

    _, warm = render(2)  # diffusers' schedule needs 2 steps at least
    frames, times = render(a.render_steps)
    kind = torch.cuda.get_device_name(dev) if cuda else "cpu"
    peak_tf = a.peak_tflops or (peak_tflops(kind) if cuda else None)
    flops = sampler_flops(cfg, a.frames, a.height, a.width, a.render_steps, True, a.text_tokens)
    return render_result(
        a, "torch", setup_s, warm, times, flops, peak_tf, frames,
        peak_bytes=torch.cuda.max_memory_allocated(dev) if cuda else None,
        memory=dict(peak_reserved_bytes=torch.cuda.max_memory_reserved(dev) if cuda else None,
                    host_peak_rss=host_peak_rss()),
        threads=None if cuda else torch.get_num_threads(),
        versions={"torch": torch.__version__, "diffusers": importlib.metadata.version("diffusers")})


# ----------------------------------------------------------------------------- the parent: plan, run, report


def diffusers_status() -> dict:
    """Can the torch side run here? If diffusers is missing: which wheels to carry."""
    have = {m: importlib.util.find_spec(m) is not None for m in ("torch", "diffusers", "peft")}
    if all(have.values()):
        return dict(available=True, version=importlib.metadata.version("diffusers"), reason="", missing=[], wheels=[])
    missing = [m for m in ("torch", "peft") if not have[m]]  # not carried: the GPU host's own builds
    wheels = []
    if not have["diffusers"]:
        wheels.append(dict(requirement=f"{DIFFUSERS[0]}=={DIFFUSERS[1]}", installed=None, pure_python=True))
        for name, spec in DIFFUSERS_REQUIRES:
            try:
                version = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                version = None
            if version is not None:
                try:
                    from packaging.specifiers import SpecifierSet
                except ImportError:
                    continue
                if not spec or version in SpecifierSet(spec):
                    continue
            wheels.append(dict(requirement=name + spec, installed=version, pure_python=name in PURE_PYTHON))
            if name == "importlib_metadata" and version is None and importlib.util.find_spec("zipp") is None:
                wheels.append(dict(requirement="zipp", installed=None, pure_python=True))
    missing += [w["requirement"] + (f" (installed {w['installed']})" if w["installed"] else "") for w in wheels]
    return dict(available=False, version=None, reason="missing: " + ", ".join(missing), missing=missing,
                wheels=wheels)


def print_wheel_help(d: dict):
    reqs = " ".join(f'"{w["requirement"]}"' for w in d["wheels"])
    binary = [w["requirement"] for w in d["wheels"] if not w["pure_python"]]
    print(f"[gpu_step] torch side skipped: {d['reason']}", flush=True)
    if reqs:
        print("  carry these wheels (diffusers is pure Python"
              + (f"; {', '.join(binary)} need the host's cp312 manylinux x86_64 build" if binary else "") + "):\n"
              "    pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 "
              f"-d wheels {reqs}\n"
              "  then on the GPU host:  python benchmarks/gpu_step.py --wheels wheels\n"
              "  (--wheels installs them with pip --no-deps --no-index into a temporary folder for the torch side)",
              flush=True)


def auto_picks(size: str, path: Path = REMAT_PICKS) -> dict:
    """{frames: remat setting} that remat='auto' picked for the full-size model on one H100 (REMAT_PICKS);
    none for --size small, whose model that table does not cover."""
    if size != "full" or not path.exists():
        return {}
    cells = json.loads(path.read_text())["cells"]
    return {int(k.rsplit("/", 1)[1]): c["remat"] for k, c in cells.items() if k.startswith("auto@") and c.get("remat")}


def parse_policies(spec: str, n_blocks: int) -> list[str]:
    """'dots_no_batch,dots:16,full:31' -> ['full', 'dots_no_batch', 'dots:16,full:31']: 'full' first; pieces
    with a count join into one remat_groups string until their counts reach the stacked blocks' number."""
    from mochi_jax.models.remat import is_remat_groups

    out, group, count = ["full"], [], 0
    for piece in filter(None, (x.strip() for x in spec.split(","))):
        if not is_remat_groups(piece):
            out.append(piece)
            continue
        group.append(piece)
        count += int(piece.partition(":")[2] or 0)
        if count >= n_blocks:
            out.append(",".join(group))
            group, count = [], 0
    if group:
        raise ValueError(f"--policies: the remat groups {','.join(group)} count {count} blocks, the model has "
                         f"{n_blocks} stacked blocks")
    return list(dict.fromkeys(out))


class Planner:
    """Per-run cost estimates: priors until a side has run, then its measured overhead, compile and rate."""

    def __init__(self, size: str, steps: int, warmup: int):
        self.prior, self.seen, self.n = PRIORS[size], {}, warmup + steps

    def learn(self, r: dict, wall: float):
        if r["policy"] == RENDER:  # the train steps' overheads and rates stand for a render's too
            return
        busy = sum(r["warmup_times_s"]) + sum(r["step_times_s"]) + r.get("compile_s", 0.0)
        s = self.seen.setdefault(r["side"], {"rate": {}})
        s["overhead"], s["compile"] = max(wall - busy, 0.0), r.get("compile_s", 0.0)
        s["rate"][r["policy"]] = s["rate"]["any"] = r["flops"] / r["median_s"]

    def estimate(self, side: str, policy: str, flops: float, n: int | None = None, extra_s: float = 0.0) -> float:
        """Seconds of a run of `n` steps (default warmup + steps) of `flops` each, plus `extra_s`."""
        overhead, compile_s, rate = self.prior[side]
        if side in self.seen:
            s = self.seen[side]
            overhead, compile_s, rate = s["overhead"], s["compile"], s["rate"].get(policy, s["rate"]["any"])
        elif side == "torch" and "jax" in self.seen:  # no torch number yet: assume 3/4 of our rate
            rate = 0.75 * self.seen["jax"]["rate"]["any"]
        return 1.1 * (overhead + compile_s + (n or self.n) * flops / rate + extra_s)


def run_child(args, side: str, frames: int, policy: str, timeout: float, env: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        res = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--child", side, "--frames", str(frames), "--policy", policy,
               "--result", str(res), "--size", args.size, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--height", str(args.height), "--width", str(args.width), "--text-tokens", str(args.text_tokens),
               "--attention", args.attention, "--expect-device", args.expect_device,
               "--torch-threads", str(args.torch_threads), "--render-steps", str(args.render_steps),
               "--prompt-tokens", str(args.prompt_tokens)]
        cmd += ["--depth", str(args.depth)] if args.depth else []
        cmd += ["--xla-check"] if args.xla_check else []
        cmd += ["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else []
        try:
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired as e:
            tail = (e.stderr or b"")[-600:]
            tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
            return dict(status="timeout", reason=f"killed after {timeout:.0f} s (the budget's remainder); {tail}")
        if res.exists():
            return json.loads(res.read_text())
        tail = "\n".join((p.stderr or p.stdout).strip().splitlines()[-12:])
        oom = "RESOURCE_EXHAUSTED" in p.stderr or "out of memory" in p.stderr.lower()
        return dict(status="failed", reason=("out of device memory: " if oom else f"exit {p.returncode}: ") + tail)


def fmt(v, spec, none="-"):
    return none if v is None else format(v, spec)


def memory_ratio(ours: dict, theirs: dict) -> float | None:
    """Our peak device memory over theirs (None on CPU: no device statistics)."""
    return ours["peak_bytes"] / theirs["peak_bytes"] if ours["peak_bytes"] and theirs["peak_bytes"] else None


def not_ok(r: dict, name: str) -> bool:
    """Print a report row for a run that did not run (status and reason); True if so."""
    if r["status"] != "ok":
        print(f"  {r['frames']:6d} {name:28s} {r['status']}: {r.get('reason', '')[:100]}")
    return r["status"] != "ok"


def peak_cell(r: dict) -> str:
    """Peak device memory in GB, or (CPU: no device statistics) the process's peak host RSS, marked '*'."""
    peak = r["peak_bytes"] or r["memory"].get("host_peak_rss")
    return fmt(peak and peak / GB, ".1f") + ("" if r["peak_bytes"] else "*")


def report(res: dict):
    st = res["settings"]
    order = {p: i for i, p in enumerate(st["policies"])}
    runs = sorted((r for r in res["runs"] if r["policy"] != RENDER),
                  key=lambda r: (r["frames"], r["side"] != "jax", order.get(r["policy"], 0)))
    params = res["model"].get("params")
    size = ("" if not params else f" ({params / 1e9:.2f} B params)" if params >= 1e9
            else f" ({params / 1e6:.1f} M params)")
    if not runs:
        report_renders(res)
        return
    print(f"\nLoRA train step: {res['model']['preset']} DiT, depth {res['model']['depth']}{size}", end="")
    print(f", rank {st['lora_rank']}, batch 1 at {st['height']}x{st['width']}, {st['text_tokens']} text tokens, "
          f"{st['dtype']}, on {res['device'].get('kind', '?')}; median of {st['steps']} steps after {st['warmup']}")
    print(f"  {'frames':>6s} {'side':28s} {'compile s':>9s} {'s/step':>8s} {'min s':>8s} {'peak GB':>7s} "
          f"{'TFLOP':>8s} {'TFLOP/s':>8s} {'% peak':>6s} {'floor s':>7s}")
    for r in runs:
        if not_ok(r, name := f"ours, remat {r['policy']}" if r["side"] == "jax" else "diffusers+PEFT, checkpoint"):
            continue
        print(f"  {r['frames']:6d} {name:28s} {fmt(r.get('compile_s'), '9.1f'):>9s} {r['median_s']:8.4g} "
              f"{r['min_s']:8.4g} {peak_cell(r):>7s} {r['flops'] / 1e12:8.4g} {r['tflops']:8.3g} "
              f"{fmt(r['frac_peak'] and 100 * r['frac_peak'], '6.1f'):>6s} {r['floor_s']:7.3g}")
    if any(r["status"] == "ok" and not r["peak_bytes"] for r in runs):
        print("  * no device memory statistics (CPU): the process's peak host RSS instead")
    print(f"  TFLOP: the FLOP model per step (mochi_jax.lib.flops); floor s: TFLOP at {FLOOR_TFLOPS:.0f} TFLOP/s")
    for f, by_policy in sorted(res["flops"].items(), key=lambda kv: int(kv[0])):
        print(f"  FLOP model, {f} frames ({next(iter(by_policy.values()))['visual_tokens']} visual tokens): "
              + ", ".join(f"{p} {b['total'] / 1e12:.4g} TFLOP = {b['total'] / (FLOOR_TFLOPS * 1e12):.3g} s"
                          for p, b in by_policy.items()) + f" at {FLOOR_TFLOPS:.0f} TFLOP/s")
    for q in res["ratios"]:
        mem = f", {q['memory_ratio']:.2f}x its peak memory" if q["memory_ratio"] else ""
        print(f"  {q['frames']} frames, ours with remat {q['policy']}: {q['speedup']:.2f}x the speed of "
              f"diffusers + PEFT{mem}")
    for f, (s, gb) in OFFICIAL.items():
        if str(f) in res["flops"] and res["size"] == "full":
            print(f"  {f} frames, the official fine-tuner as published (H100 SXM, full checkpointing): {s} s/step, "
                  f"{gb} GB")
    report_renders(res)


def report_renders(res: dict):
    r = res["settings"]["render"]
    runs = sorted((x for x in res["runs"] if x["policy"] == RENDER), key=lambda x: (x["frames"], x["side"] != "jax"))
    if not runs:
        return
    st = res["settings"]
    print(f"\nRender: one video, {r['steps']} steps, guidance {r['guidance']} (DiT batch 2), "
          f"{st['height']}x{st['width']}, {st['text_tokens']} text tokens ({r['prompt_tokens']} valid), "
          f"tiled VAE decode to frames on the host, "
          f"{st['dtype']}, on {res['device'].get('kind', '?')}")
    print(f"  {'frames':>6s} {'side':28s} {'warm-up s':>9s} {'render s':>8s} {'denoise s':>9s} {'s/step':>7s} "
          f"{'decode s':>8s} {'peak GB':>7s} {'TFLOP/s':>8s} {'floor s':>7s}")
    for x in runs:
        if not_ok(x, name := "ours, sample's path" if x["side"] == "jax" else "diffusers MochiPipeline"):
            continue
        print(f"  {x['frames']:6d} {name:28s} {x['warmup_denoise_s'] + x['warmup_decode_s']:9.1f} "
              f"{x['render_s']:8.2f} {x['denoise_s']:9.2f} {x['step_s']:7.3f} {x['decode_s']:8.2f} {peak_cell(x):>7s} "
              f"{x['tflops']:8.3g} {x['floor_s']:7.3g}")
    print("  warm-up: a 2-step render first (ours: compiles the step and the decoder); TFLOP/s: the DiT passes' "
          f"FLOP model / denoise s; floor s: those FLOPs at {FLOOR_TFLOPS:.0f} TFLOP/s")
    for q in res["render_ratios"]:
        mem = f", {q['memory_ratio']:.2f}x its peak memory" if q["memory_ratio"] else ""
        print(f"  {q['frames']} frames: ours renders in {q['jax_render_s']:.1f} s, {q['speedup']:.2f}x the speed of "
              f"diffusers' MochiPipeline ({q['torch_render_s']:.1f} s; denoise {q['denoise_speedup']:.2f}x, decode "
              f"{q['decode_speedup']:.2f}x){mem}")
    if res["size"] == "full":
        x = res["anchors"]["xdit_l40_render"]
        print(f"  published: mochi-xdit renders {x['frames']} frames at {x['width']}x{x['height']} in "
              f"{x['gpus']['1']:.0f} s on one L40, {x['gpus']['6']:.0f} s on six")


def parent(args):
    t0 = time.perf_counter()
    from mochi_jax.lib.flops import flop_breakdown, sampler_flops

    frames = [int(f) for f in args.frames.split(",") if f.strip()]
    render_frames = [int(f) for f in args.render_frames.split(",") if f.strip()]
    cfg_full = dit_config(args.size, "full", "cudnn" if args.attention == "auto" else args.attention, args.depth)
    if args.attention == "auto" and args.size == "small":
        cfg_full = dataclasses.replace(cfg_full, attention="xla")
    policies = parse_policies(args.policies, cfg_full.depth - 1)
    diff = diffusers_status()
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # the step, not the default 75 %, decides what fits
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    if not diff["available"] and args.wheels:
        target = tempfile.mkdtemp(prefix="gpu_step_wheels_")
        wheels = sorted(str(w) for w in Path(args.wheels).glob("*.whl"))
        p = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", target,
                            *wheels], capture_output=True, text=True)
        if p.returncode == 0:
            env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], target])
            diff = dict(available=True, version=f"from {args.wheels}", reason="", missing=[], wheels=wheels)
        else:
            diff["reason"] += f"; installing --wheels failed: {p.stderr.strip().splitlines()[-1:]}"
    if not diff["available"]:
        print_wheel_help(diff)
    if args.no_torch:
        diff = dict(diff, available=False, reason="--no-torch")

    out = Path(args.out)
    res = dict(benchmark="gpu_step", size=args.size, budget_s=args.budget, total_wall_s=None,
               settings=dict(frames=frames, policies=policies, steps=args.steps, warmup=args.warmup,
                             height=args.height, width=args.width, text_tokens=args.text_tokens, batch=1,
                             dtype=SIZES[args.size]["dtype"], lora_rank=LORA_RANK, attention=args.attention,
                             peft_targets=PEFT_TARGETS, optimizer=OPTIM,
                             render=dict(frames=render_frames, steps=args.render_steps, guidance=RENDER_GUIDANCE,
                                         prompt_tokens=args.prompt_tokens, tiled_decode=True,
                                         vae=dict(SIZES[args.size]["vae"]))),
               model=dict(preset=SIZES[args.size]["preset"], params=None, **dataclasses.asdict(cfg_full)),
               device={}, versions={}, diffusers=diff, flops={}, render_flops={}, runs=[], ratios=[],
               render_ratios=[], skipped=[],
               anchors=dict(official_h100={str(f): dict(s_per_step=s, gb=gb) for f, (s, gb) in OFFICIAL.items()},
                            floor_tflops=FLOOR_TFLOPS, xdit_l40_render=XDIT_L40))
    picks, unresolved = auto_picks(args.size), []
    # in order of importance: the first clip length's 'full' against diffusers + PEFT, the renders, then the rest
    renders = [(side, f, RENDER) for f in render_frames for side in ("jax", "torch")]
    plan = [] if frames else renders
    for i, f in enumerate(frames):
        ours = []
        for p in policies:
            if p != "auto":
                ours.append(("jax", f, p))
            elif f in picks:
                ours.append(("jax", f, picks[f]))
            else:
                unresolved.append(f)
        theirs = ("torch", f, "gradient checkpointing")
        plan += [ours[0], theirs, *renders, *ours[1:]] if i == 0 else [*ours, theirs]
    plan = list(dict.fromkeys(plan))  # an 'auto' pick may be a policy already listed
    res["settings"]["auto"] = {str(f): picks.get(f) for f in frames} if "auto" in policies else {}
    for f in frames:
        res["flops"][str(f)] = {p: flop_breakdown(cfg_full, f, args.height, args.width, remat_of(p), None,
                                                  args.text_tokens)
                                for side, g, p in plan if side == "jax" and g == f and p != RENDER}
    res["render_flops"] = {str(f): dict(total=sampler_flops(cfg_full, f, args.height, args.width, args.render_steps,
                                                           True, args.text_tokens), steps=args.render_steps)
                           for f in render_frames}
    res["anchors"]["floor_s"] = {str(f): {p: b["total"] / (FLOOR_TFLOPS * 1e12) for p, b in v.items()}
                                 for f, v in ((int(k), v) for k, v in res["flops"].items())}
    for f in unresolved:
        reason = (f"no remat='auto' pick for {f} frames in {REMAT_PICKS.relative_to(REPO)} (it covers the full-size "
                  "model; python benchmarks/aot_tables.py remat)")
        res["runs"].append(dict(side="jax", frames=f, policy="auto", status="skipped", reason=reason))
        res["skipped"].append(dict(side="jax", frames=f, policy="auto", reason=reason))
    planner = Planner(args.size, args.steps, args.warmup)

    def save():
        res["total_wall_s"] = time.perf_counter() - t0
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2))

    for side, f, p in plan:
        entry = dict(side=side, frames=f, policy=p)
        if p == RENDER:  # a 2-step render, then the timed one; each decodes once
            est = planner.estimate(side, p, res["render_flops"][str(f)]["total"] / args.render_steps,
                                   args.render_steps + 2, 2 * DECODE_PRIOR[args.size])
        else:
            est = planner.estimate(side, p, res["flops"][str(f)]["full" if side == "torch" else p]["total"])
        left = args.budget - (time.perf_counter() - t0)
        if side == "torch" and not diff["available"]:
            entry.update(status="skipped", reason=diff["reason"])
        elif side == "torch" and not args.expect_device:
            entry.update(status="skipped", reason="ours did not run, so the device to compare on is unknown")
        elif est > left:
            entry.update(status="skipped", reason=f"estimated {est:.0f} s, {left:.0f} s of the budget left")
        else:
            print(f"[gpu_step] {side} {f} frames {p}: estimated {est:.0f} s, {left:.0f} s left", flush=True)
            t = time.perf_counter()
            r = run_child(args, side, f, p, left - 2.0, env)
            wall = time.perf_counter() - t
            entry.update(r, side=side, frames=f, policy=p, wall_s=wall)
            if entry["status"] == "ok":
                planner.learn(entry, wall)
                if side == "jax" and not res["device"]:
                    res["device"], res["model"]["params"] = entry.pop("device"), entry["params"]
                    args.expect_device = res["device"]["platform"]
                    res["versions"].update(entry["versions"])
                elif side == "torch":
                    res["versions"].update(entry["versions"])
            if entry["status"] != "ok":
                done = entry["reason"][:300]
            else:
                done = f"{entry['render_s']:.2f} s per video" if p == RENDER else f"{entry['median_s']:.3f} s/step"
            print(f"[gpu_step]   {entry['status']} in {wall:.0f} s: {done}", flush=True)
        entry["estimate_s"] = est
        entry.pop("cfg", None)
        entry.pop("device", None)
        res["runs"].append(entry)
        if entry["status"] != "ok":
            res["skipped"].append(dict(side=side, frames=f, policy=p, reason=entry.get("reason", "")))
        save()

    ok = {(r["side"], r["frames"], r["policy"]): r for r in res["runs"] if r["status"] == "ok"}
    for (side, f, p), r in ok.items():
        t = ok.get(("torch", f, RENDER if p == RENDER else "gradient checkpointing"))
        if side == "jax" and t and p == RENDER:
            res["render_ratios"].append(dict(
                frames=f, jax_render_s=r["render_s"], torch_render_s=t["render_s"],
                speedup=t["render_s"] / r["render_s"], denoise_speedup=t["denoise_s"] / r["denoise_s"],
                decode_speedup=t["decode_s"] / r["decode_s"], memory_ratio=memory_ratio(r, t)))
        elif side == "jax" and t:
            res["ratios"].append(dict(frames=f, policy=p, jax_median_s=r["median_s"], torch_median_s=t["median_s"],
                                      speedup=t["median_s"] / r["median_s"], memory_ratio=memory_ratio(r, t)))
    save()
    report(res)
    print(f"wrote {out} ({res['total_wall_s']:.0f} s of a {args.budget:.0f} s budget)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="full")
    ap.add_argument("--frames", help="comma-separated, in order of importance (full: 37,85,61; small: 7,13)")
    ap.add_argument("--policies", default="auto,save:attn",
                    help="remat policies besides 'full' (always first): REMAT_POLICIES names, save:<names>, remat_groups "
                         "strings like dots:16,full:31, or 'auto' (remat='auto''s pick per clip length from "
                         "benchmarks/results/aot_remat.json), comma-separated")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per run (>= 10)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first, >= 1 (the first one is reported)")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for the whole script")
    ap.add_argument("--out", help="the JSON file (default benchmarks/results/gpu_step.json; --size small: "
                                   "gpu_step_small.json, so a CPU run never overwrites a GPU result)")
    ap.add_argument("--attention", default="auto", choices=("auto", "cudnn", "xla"),
                    help="auto: cudnn on GPU, xla elsewhere")
    ap.add_argument("--xla-check", action=argparse.BooleanOptionalAction, default=None,
                    help="also lower the step with unrolled blocks and compare XLA's count (default: --size small)")
    ap.add_argument("--peak-tflops", type=float, help="the chip's peak, if its name is not in the table")
    ap.add_argument("--no-torch", action="store_true", help="skip diffusers + PEFT")
    ap.add_argument("--torch-threads", type=int, default=1, help="torch's CPU threads (CPU runs only)")
    ap.add_argument("--wheels", help="a folder of wheels (diffusers and deps) to use when diffusers is missing")
    ap.add_argument("--render-frames", help="clip lengths of the renders, comma-separated, '' for none (full: 37; "
                                            "small: 7)")
    ap.add_argument("--render-steps", type=int, default=64, help="denoising steps of a render")
    for flag in ("height", "width", "text-tokens", "prompt-tokens", "depth"):
        ap.add_argument(f"--{flag}", type=int)
    # internal: one run in this process
    ap.add_argument("--child", choices=("jax", "torch"), help=argparse.SUPPRESS)
    ap.add_argument("--policy", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--expect-device", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    s = SIZES[a.size]
    a.frames = s["frames"] if a.frames is None else a.frames
    a.render_frames = s["render_frames"] if a.render_frames is None else a.render_frames
    a.prompt_tokens = a.prompt_tokens or s["prompt_tokens"]
    a.out = a.out or str(REPO / "benchmarks" / "results" / f"gpu_step{'' if a.size == 'full' else '_small'}.json")
    a.height, a.width = a.height or s["height"], a.width or s["width"]
    a.text_tokens = a.text_tokens or s["text_tokens"]
    a.xla_check = a.size == "small" if a.xla_check is None else a.xla_check
    a.warmup = max(a.warmup, 1)
    if a.steps < 10 and not a.child:
        print(f"[gpu_step] note: --steps {a.steps} < 10; medians over fewer steps are noisier", flush=True)
    if a.child:
        a.frames = int(a.frames)
        render = a.policy == RENDER
        r = {"jax": child_jax_render if render else child_jax, "torch": child_torch_render if render else child_torch}[
            a.child](a)
        Path(a.result).write_text(json.dumps(r))
        return
    parent(a)


if __name__ == "__main__":
    main()
