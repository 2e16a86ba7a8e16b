"""Memory before a run: compile a command's exact program ahead of time for a TPU slice or NVIDIA
GPUs on a CPU host (no accelerator, no weights) and read the compiler's per-device memory.

    from mochi_jax.aot import targets
    targets.compile_only_environment()              # before jax is imported
    from mochi_jax.aot import fit
    report = fit.check(config)                      # config: configs/lora.py, sample.py, eval.py or prepare.py
    print(report.format()); report.fits             # arguments, temporaries, outputs, total vs HBM

This module only reads the config and picks the program; each program comes from the library module
that runs it for real (mochi_jax/lib/program.py lists them), with the abstract inputs and shardings
the command gives it: the training step (`sweep.training_parts(...).program`), the sampler step
(`sampling.sampler_program`), prepare's VAE encode and T5 batch (`placement.vae_encode_program`,
`placement.t5_program`). Model shapes come from a converted checkpoint's metadata, or a preset when
there is none. `mochi_jax/aot/report.py` compiles and measures.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint.experimental.v1 as ocp

from mochi_jax.aot import targets as targets_lib
from mochi_jax.aot.report import BadInput, Report, measure
from mochi_jax.checkpoints import dit_config, read_metadata, t5_config, vae_config
from mochi_jax.checkpoints.runs import load_loras
from mochi_jax.configs import common as common_config
from mochi_jax.configs import dit as dit_presets
from mochi_jax.configs import prepare as prepare_config
from mochi_jax.lib import placement, sampling
from mochi_jax.lib import variants as variants_lib
from mochi_jax.lib import sweep as sweep_lib
from mochi_jax.lib import validation as validation_lib
from mochi_jax.lib.program import Program, abstract, mesh_layout
from mochi_jax.models import lora as lora_lib
from mochi_jax.models import remat as remat_lib
from mochi_jax.models import sharding as sharding_lib
from mochi_jax.models import vae as vae_lib
from mochi_jax.models.t5 import T5Config
from mochi_jax.models.vae import VAEConfig

GIB = targets_lib.GIB
WHAT = ("train", "sample", "vae_encode", "t5")
ROOMY_FRACTION = 0.95  # XLA_CLIENT_MEM_FRACTION a GPU run can be given (the rest: CUDA's context, cuDNN's workspace)


def check(cfg, what: str = "") -> Report:
    """Compile the program `what` (default cfg.aot.what, else the config's own command) of a
    configs/lora.py, sample.py, eval.py or prepare.py config for cfg.aot.target and measure it."""
    aot = cfg.aot
    kind = config_kind(cfg)
    what = what or aot.what or {"lora": "train", "sample": "sample", "eval": "sample", "prepare": "vae_encode"}[kind]
    allowed = {"lora": ("train", "sample"), "sample": ("sample",), "eval": ("sample",),
               "prepare": ("vae_encode", "t5")}[kind]
    if what not in WHAT:
        raise BadInput(f"aot.what={what!r}: choose one of {', '.join(WHAT)}")
    if what not in allowed:
        raise BadInput(f"aot.what={what!r} needs " + ("a prepare config (configs/prepare.py)" if what in
                       ("vae_encode", "t5") else "a lora, sample or eval config") + f"; this {kind} config offers "
                       + ", ".join(allowed))
    target = targets_lib.parse_target(aot.target, aot.gpus_per_host, aot.target_config)
    found = []

    def devices():  # made only once the config is checked: a bad clip is bad input with or without a compiler
        if not found:
            with targets_lib.quiet(target):
                found.extend(targets_lib.compile_devices(target))
        return found

    build = {"lora": _lora_program, "sample": _sample_config_program, "eval": _sample_config_program,
             "prepare": _prepare_program}[kind]
    program = build(cfg, what, target, devices)
    if target.platform == "cuda":
        program.details.append("GPU      compiled with autotuning off (no GPU here): the kernels, not the memory, "
                               "may differ on the card")
    limit, source = memory_limit(aot, target, devices)
    report = measure(program, target, limit, source)
    if not report.fits and aot.suggest:
        report.suggestions = _try_ladder(cfg, what, build, target, devices, limit, source)
    return report


def ladder(cfg, what: str, platform: str = "cuda") -> list[dict]:
    """Settings that need less device memory than `cfg`'s, in the order they cost speed (each applied on
    top of the ones before): a training step's remat 'full' (recompute each block in the backward),
    then an int8 weight-only base (about half the bytes of bf16 weights), then the stacked blocks
    waiting in pinned host memory (one block on the device at a time; PCIe traffic per step), then
    for a training step the blocks' inputs kept for the backward pass in pinned host memory
    ('offload:residual', then rounded to bfloat16). The ones the config already has are left out;
    prepare's programs have none. On TPUs the blocks stay on the chips: the TPU compiler cannot slice
    host-held stacked weights one block at a time."""
    if what not in ("train", "sample"):
        return []
    m, rungs = cfg.model, []
    offloaded = str(m.get("remat", "")).startswith("offload:residual")
    if what == "train" and not offloaded and (m.remat not in ("full", "auto") or m.remat_groups):
        rungs.append({"model.remat": "full", "model.remat_groups": ""})
    if m.param_dtype in ("bfloat16", "float16", "float32"):
        rungs.append({"model.param_dtype": "int8"})
    if not m.weights_on_host and m.scan_layers and platform != "tpu":
        rungs.append({"model.weights_on_host": True})
    if what == "train" and not offloaded:
        # the blocks' inputs kept for the backward pass in pinned host memory, then rounded to bfloat16
        rungs += [{"model.remat": "offload:residual", "model.remat_groups": ""},
                  {"model.remat": "offload:residual_bf16", "model.remat_groups": ""}]
    return rungs


def with_overrides(cfg, overrides: dict):
    """A copy of `cfg` with {'model.remat': 'full', ...} set, as --config.<path>=<value> flags would."""
    c = cfg.copy_and_resolve_references()
    for path, value in overrides.items():
        *parents, leaf = path.split(".")
        node = c
        for part in parents:
            node = node[part]
        node[leaf] = value
    return c


def _try_ladder(cfg, what, build, target, devices, limit, source) -> list[dict]:
    """Compile `ladder(cfg, what)`'s settings one on top of the other until one fits: what each needs. On a
    GPU checked at JAX's default memory share, each also says whether it fits in 95 % of the card."""
    roomy = (int(target.nominal_bytes * ROOMY_FRACTION) if target.platform == "cuda" and not cfg.aot.memory_gib
             and cfg.aot.gpu_memory_fraction < ROOMY_FRACTION else 0)
    tried, overrides = [], {}
    for rung in ladder(cfg, what, target.platform):
        before = dict(overrides)
        overrides.update(rung)
        c = with_overrides(cfg, overrides)
        flags = [f"--config.{k}={v}" for k, v in overrides.items() if not (k == "model.remat_groups" and not v)]
        try:
            r = measure(build(c, what, target, devices), target, limit, source)
        except BadInput as e:  # a setting this target or model refuses
            tried.append({"flags": flags, "total_bytes": 0, "fits": False, "error": str(e)})
            overrides = before  # the next settings go on without it
            continue
        tried.append({"flags": flags, "total_bytes": r.total_bytes, "fits": r.fits,
                      "fits_at": ROOMY_FRACTION if not r.fits and roomy and r.total_bytes <= roomy else 0})
        if r.fits:
            break
    return tried


def config_kind(cfg) -> str:
    """'lora', 'sample', 'eval' or 'prepare': which command's config this is."""
    keys = set(cfg.keys())
    if {"optim", "lora", "mesh"} <= keys:
        return "lora"
    if {"sampling", "prompt", "model"} <= keys:
        return "sample"
    if {"sampling", "prompt_file", "seeds", "clip"} <= keys:
        return "eval"
    if {"buckets", "text_batch_size", "vae"} <= keys:
        return "prepare"
    raise BadInput("the config is none of configs/lora.py, sample.py, eval.py, prepare.py")


def memory_limit(aot, target, devices) -> tuple[int, str]:
    """(bytes per device, where the figure comes from): --config.aot.memory_gib, else the target's."""
    if aot.memory_gib > 0:
        return int(aot.memory_gib * GIB), "--config.aot.memory_gib"
    return targets_lib.memory_limit(target, devices(), aot.gpu_memory_fraction)


# ----------------------------------------------------------------------------- model shapes and clips


def _metadata(path):
    """The converted checkpoint's custom metadata, or None when `path` holds none."""
    if not path or not Path(path).is_dir():
        return None
    try:
        return read_metadata(path)
    except Exception:  # noqa: BLE001 - not a checkpoint
        return None


DEMO_ARCH = {"dit": common_config.DEMO_DIT, "vae": common_config.DEMO_VAE, "t5": common_config.DEMO_T5}


def _arch(kind: str, spec: str, path: str, demo: bool) -> tuple[dict, str, str]:
    """(architecture fields, where they come from, the checkpoint path or '') of the 'dit', 'vae' or
    't5' model. `spec`: '' (the checkpoint at `path` if there is one, else the demo's tiny model for
    a demo config, else the released model), 'mochi' (the released model), 'demo', a configs/dit.py
    preset, or a checkpoint path."""
    name = {"dit": "mochi_dit", "vae": "mochi_vae", "t5": "t5_encoder"}[kind]
    why = ""
    if not spec:
        meta = _metadata(path)
        if meta is not None and meta.get("model") == name:
            return dict(meta["config"]), f"the checkpoint {path}", path
        if demo:
            return dict(DEMO_ARCH[kind]), f"the demo's tiny model ({path} not made yet)", ""
        spec, why = "mochi", f" ({path} holds no converted checkpoint)"
    if spec == "mochi":
        if kind == "dit":
            return dict(dit_presets.PRESETS["mochi"]), "the released model's shapes (configs/dit.py 'mochi')" + why, ""
        return {}, "the released model's shapes" + why, ""
    if spec == "demo":
        return dict(DEMO_ARCH[kind]), "the demo's tiny model", ""
    if kind == "dit" and spec in dit_presets.PRESETS:
        return dict(dit_presets.PRESETS[spec]), f"configs/dit.py preset {spec!r}", ""
    meta = _metadata(spec)
    if meta is None or meta.get("model") != name:
        presets = "'mochi', 'small', 'tiny', 'demo'" if kind == "dit" else "'mochi', 'demo'"
        raise BadInput(f"aot.model={spec!r} is neither a converted {kind} checkpoint nor a preset ({presets})")
    return dict(meta["config"]), f"the checkpoint {spec}", spec


def _clip(aot, frames: int, height: int, width: int, source: str) -> tuple[tuple[int, int, int], str]:
    clip = (aot.num_frames or frames, aot.height or height, aot.width or width)
    given = (aot.num_frames, aot.height, aot.width) != (0, 0, 0)
    try:
        sampling.latent_shape(*clip)
    except ValueError as e:
        raise BadInput(f"clip {clip[0]} frames {clip[1]}x{clip[2]}: {e}") from e
    return clip, "--config.aot" if given else source


def _longest(num_frames) -> int:
    """A prepare config's frame count, or the longest of its frame buckets (the most memory)."""
    return int(num_frames) if isinstance(num_frames, int) else max(int(n) for n in num_frames)


def _largest_bucket(buckets) -> tuple[int, int]:
    return tuple(max((tuple(b) for b in buckets), key=lambda b: b[0] * b[1]))


def _prepare_clip_defaults(cfg) -> tuple[int, int, int, str]:
    """The clip a lora config trains on when the aot block does not say: its demo prepare settings,
    or configs/prepare.py's defaults (what `mochi_jax.prepare` caches)."""
    p = cfg.demo.get("prepare") if cfg.get("demo") else None
    if p is not None and "num_frames" in p:
        return (_longest(p.num_frames), *_largest_bucket(p.buckets), "the config's prepare settings")
    d = prepare_config.get_config()
    return (_longest(d.num_frames), *_largest_bucket(d.buckets), "configs/prepare.py defaults")


def _clip_line(batch: int, frames: int, height: int, width: int, latent) -> str:
    return (f"clip     {batch} x {frames} frames {height}x{width} -> latents [{batch}, "
            + ", ".join(map(str, latent)) + "]")


def _is_demo(cfg) -> bool:
    return bool(cfg.get("demo"))  # only the :demo presets carry a demo block


# ----------------------------------------------------------------------------- the programs


def train_program(cfg, dit_cfg, devices, clip, text_tokens: int, num_hosts: int = 1) -> Program:
    """The trainer's step (`sweep.training_parts`) of a configs/lora.py config for `dit_cfg`, over the
    mesh of cfg.mesh built from `devices`, on a batch of cfg.batch_size clips of `clip` = (frames,
    height, width)."""
    mesh = sharding_lib.make_mesh(cfg.mesh.to_dict(), devices)
    n_batch = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.batch_size % n_batch or cfg.batch_size % num_hosts:
        raise BadInput(f"batch_size {cfg.batch_size} must be divisible by data x fsdp = {n_batch} (mesh "
                       f"{mesh_layout(mesh)}) and by the {num_hosts} hosts; change --config.batch_size or "
                       "--config.mesh.*")
    try:
        parts = sweep_lib.training_parts(cfg, dit_cfg, mesh)
    except ValueError as e:  # the config's LoRA targets or sweep
        raise BadInput(str(e)) from e
    latent = sampling.latent_shape(*clip)
    program = parts.program(cfg.batch_size, latent, text_tokens)
    accum = f", {cfg.optim.grad_accum} micro-batches per update" if cfg.optim.grad_accum > 1 else ""
    lora = program.args[0]["lora"]
    if parts.sweep is None:
        lora_line = (f"LoRA     {lora_lib.count(lora):,} float32 parameters ("
                     + ", ".join(f"{t.pattern} r{t.rank}" for t in parts.targets) + f") and their AdamW moments{accum}")
    else:
        n = sum(int(math.prod(x.shape)) for x in jax.tree_util.tree_leaves(lora))
        lora_line = (f"LoRA     a sweep of {parts.sweep.size} LoRAs trained together ({', '.join(parts.sweep.names)}): "
                     f"{n:,} stacked float32 parameters and their AdamW moments{accum}")
    program.details += [lora_line, _clip_line(cfg.batch_size, *clip, latent)]
    return program


def _sampler_line(batch: int, clip, guidance: float) -> str:
    latent = sampling.latent_shape(*clip)
    return _clip_line(batch, *clip, latent) + (f", guidance {guidance:g}: both branches, DiT batch {2 * batch}"
                                               if guidance > 1.0 else ", no guidance")


def _lora_program(cfg, what, target, devices) -> Program:
    """configs/lora.py: the training step, or (what='sample') a validation video's sampler step with
    the weights sharded as in training."""
    aot, m = cfg.aot, cfg.model
    arch, arch_src, _ = _arch("dit", aot.model, m.dit, _is_demo(cfg))
    auto = m.remat == "auto"
    dit_cfg = dit_config(m, arch, target.platform, **({"remat": "full", "remat_groups": ""} if auto else {}))
    picked = ""
    if what == "train":
        f, h, w, src = _prepare_clip_defaults(cfg)
        clip, src = _clip(aot, f, h, w, src)
        if auto:
            limit, _ = memory_limit(aot, target, devices)
            budget = int(m.memory_budget_gb * GIB) if m.memory_budget_gb > 0 else limit

            def memory_of(remat: str, groups: str) -> int:
                c = dataclasses.replace(dit_cfg, remat=remat, remat_groups=groups)
                return measure(train_program(cfg, c, devices(), clip, aot.text_tokens, target.num_hosts), target,
                               limit, "").total_bytes

            try:
                choice = remat_lib.choose(dit_cfg.depth - 1, memory_of, budget, dit_cfg.attention)
            except ValueError as e:
                raise BadInput(str(e)) from e
            dit_cfg = dataclasses.replace(dit_cfg, remat=choice.remat, remat_groups=choice.groups)
            picked = f"remat    auto -> {choice.describe()}"
        program = train_program(cfg, dit_cfg, devices(), clip, aot.text_tokens, target.num_hosts)
    else:
        s = cfg.validation.sampling
        dit_cfg = dataclasses.replace(dit_cfg, remat="none", remat_groups="")  # sampling keeps nothing for a backward
        try:
            groups = validation_lib.by_shape(validation_lib.validation_prompts(cfg.validation))
            sweep = sweep_lib.from_config(cfg, dit_cfg)
        except ValueError as e:  # a wrong validation prompt or sweep
            raise BadInput(str(e)) from e
        # validation renders one batch per clip shape: the one whose videos hold the most latents together
        group = max(groups, key=lambda g: len(g) * math.prod(sampling.latent_shape(*g[0].shape)), default=None)
        shape, batch = (group[0].shape, len(group)) if group else ((s.num_frames, s.height, s.width), 1)
        clip, src = _clip(aot, *shape, "config.validation.prompts" if group else "config.validation.sampling")
        # a sweep renders all its LoRAs together, from the same noise
        targets = sweep.union if sweep else lora_lib.targets_from_config(cfg.lora.to_dict())
        k = sweep.size if sweep else 0
        mesh = sharding_lib.make_mesh(cfg.mesh.to_dict(), devices())
        program = sampling.sampler_program(dit_cfg, targets, batch, sampling.latent_shape(*clip), aot.text_tokens,
                                           s.guidance > 1.0, sampling.placement(dit_cfg, targets, mesh, bool(k)), k)
        total = sum(map(len, groups))
        if not groups:
            which = "validation.prompts is empty: one video"
        elif len(groups) == 1:
            which = f"one batch of its {total} prompt(s)"
        else:
            which = f"one batch per clip shape; the largest of {len(groups)} shapes: {batch} of {total} prompts"
        program.details += [_sampler_line(batch, clip, s.guidance)
                            + (f"; x {k} LoRAs of the sweep rendered together" if k else ""),
                            f"         (validation renders {which}; the train state, resident meanwhile, is not "
                            "counted)"]
    program.details.insert(0, f"model    {arch_src}: depth {dit_cfg.depth}, width {dit_cfg.width}, {m.param_dtype} "
                              f"weights" + (" (blocks in pinned host memory)" if dit_cfg.weights_on_host else "")
                              + f", attention {_attention(m, dit_cfg)}, remat {m.remat}"
                           + (f" ({m.remat_groups})" if m.remat_groups else ""))
    program.details.append(f"         (clip size from {src})")
    if picked:
        program.details.insert(1, picked)
    return program


def _sample_config_program(cfg, what, target, devices) -> Program:
    """configs/sample.py and configs/eval.py: one sampler step over the command's mesh (cfg.mesh) with
    its LoRAs (an evaluation: base and LoRAs stacked, as it renders them), the VAE's weights resident."""
    aot, m, s = cfg.aot, cfg.model, cfg.sampling
    demo = _is_demo(cfg)
    arch, arch_src, _ = _arch("dit", aot.model, m.dit, demo)
    dit_cfg = dit_config(m, arch, target.platform, remat="none", remat_groups="")
    clip, _ = _clip(aot, s.num_frames, s.height, s.width, "the config")
    try:
        mesh = sharding_lib.make_mesh(cfg.mesh.to_dict(), devices())
        if config_kind(cfg) == "eval":
            targets, k = _eval_lora_targets(cfg, dit_cfg)
            variants, batch = (k if cfg.batch_loras else 0), int(cfg.batch_size)
        else:
            targets, variants, batch = _sample_lora_targets(cfg, dit_cfg), 0, int(cfg.batch_size)
        place = sampling.placement(dit_cfg, targets, mesh, variants=bool(variants))
    except ValueError as e:  # the mesh, or the heads it does not divide
        raise BadInput(str(e)) from e
    program = sampling.sampler_program(dit_cfg, targets, batch, sampling.latent_shape(*clip), aot.text_tokens,
                                       s.guidance > 1.0, place, variants)
    # a DiT preset ('small', 'tiny') has no VAE of its own: the released one's weights wait beside it
    vae_arch, _, vae_ckpt = _arch("vae", "mochi" if aot.model in dit_presets.PRESETS else aot.model, m.vae, demo)
    vae_cfg = vae_config(m, vae_arch, _stored_dtype(vae_ckpt) if vae_ckpt else "bfloat16")
    program.resident["VAE weights"] = abstract(jax.eval_shape(lambda: vae_lib.init(jax.random.PRNGKey(0), vae_cfg)),
                                               place.replicated)
    program.details += [_sampler_line(batch, clip, s.guidance)]
    note = sampling.idle_note(mesh, sampling.dit_rows(batch, s.guidance), dit_cfg.num_heads)
    if note:
        program.details.append(f"note     {note}")
    if variants:
        program.details.append(f"LoRAs    base and {variants - 1} LoRA(s) stacked, rendered in one vmapped step")
    program.details.insert(0, f"model    {arch_src}: depth {dit_cfg.depth}, width {dit_cfg.width}, "
                              f"{m.param_dtype} weights, attention {_attention(m, dit_cfg)}"
                           + (f"; LoRAs {cfg.loras}" if targets else ""))
    return program


def _prepare_program(cfg, what, target, devices) -> Program:
    """configs/prepare.py: the VAE encode of one clip of the largest bucket, or one T5 batch, on one
    host's devices (prepare runs on each host alone)."""
    aot = cfg.aot
    demo = _is_demo(cfg)

    def local_devices():
        every = devices()
        local = [d for d in every if d.process_index == every[0].process_index]
        n = int(cfg.get("devices", -1))
        if n == 0 or n < -1 or n > len(local):
            raise BadInput(f"devices={n}: choose -1 (all {len(local)} of a host) or 1..{len(local)}")
        return local if n == -1 else local[:n]

    if what == "vae_encode":
        arch, arch_src, ckpt = _arch("vae", aot.model, cfg.vae, demo)
        vae_cfg = vae_config(cfg, arch, _stored_dtype(ckpt) if ckpt else VAEConfig.param_dtype)
        h, w = _largest_bucket(cfg.buckets)
        clip, _ = _clip(aot, _longest(cfg.num_frames), h, w, "the config")
        program = placement.vae_encode_program(vae_cfg, local_devices(), clip, bool(cfg.tiled))
        program.details.insert(0, f"model    {arch_src}: VAE, {vae_cfg.param_dtype} weights")
    else:
        arch, arch_src, ckpt = _arch("t5", aot.model, cfg.t5, demo)
        t5_cfg = t5_config(cfg, arch, _stored_dtype(ckpt) if ckpt else T5Config.param_dtype)
        sizes = cfg.get("mesh", None)
        sizes = dict(sizes.to_dict() if hasattr(sizes, "to_dict") else sizes or {"fsdp": -1})
        program = placement.t5_program(t5_cfg, local_devices(), int(cfg.text_batch_size), int(cfg.max_length), sizes)
        program.details.insert(0, f"model    {arch_src}: T5 encoder, {t5_cfg.param_dtype} weights")
    if len(local_devices()) < target.num_devices:
        program.details.append(f"devices  {len(local_devices())} of {target.num_devices}: one host's (prepare runs "
                               "on each host alone)")
    return program


def _attention(m, dit_cfg) -> str:
    """The attention the program runs, and that 'auto' chose it."""
    return f"{dit_cfg.attention} (auto)" if m.attention == "auto" else dit_cfg.attention


def _stored_dtype(path) -> str:
    """The dtype of a converted checkpoint's weights (its first floating leaf)."""
    meta = ocp.metadata(Path(path).absolute()).metadata
    for leaf in jax.tree_util.tree_leaves(meta):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            return jnp.dtype(leaf.dtype).name
    return "bfloat16"


def _eval_lora_targets(cfg, dit_cfg) -> tuple[tuple, int]:
    """(targets of the stacked adapters, number of variants) of an eval config: the base and its LoRAs."""
    try:
        variants = variants_lib.load_variants(cfg.loras, dit_cfg)
    except (OSError, ValueError) as e:
        raise BadInput(f"loras={cfg.loras!r}: {e}") from e
    _, targets = variants_lib.stack_adapters(variants)
    return tuple(targets), len(variants)


def _sample_lora_targets(cfg, dit_cfg):
    """The combined adapter's targets of a sample config's LoRAs (the files are read: they are small)."""
    if not cfg.loras:
        return ()
    try:
        _, targets = load_loras(cfg.loras, dit_cfg)
    except (OSError, ValueError) as e:
        raise BadInput(f"loras={cfg.loras!r}: {e}") from e
    return tuple(targets)
