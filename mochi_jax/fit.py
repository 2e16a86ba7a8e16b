"""Memory before a run: compile a command's exact program ahead of time for a TPU slice or NVIDIA
GPUs on a CPU host (no accelerator, no weights) and read the compiler's per-device memory.

    from mochi_jax import targets
    targets.compile_only_environment()              # before jax is imported
    from mochi_jax import fit
    report = fit.check(config)                      # config: configs/lora.py, sample.py or prepare.py
    print(report.format()); report.fits             # arguments, temporaries, outputs, total vs HBM

The programs are the commands' own: the training step is the trainer's (`sweep.training_parts`: one
LoRA's `training.make_train_step`, or a sweep's step) with its shardings over the mesh of
`config.mesh` (`sharding.make_mesh`); the sampler step is
`sampling.euler_step`; prepare's VAE encode and T5 are `vae.encode` and the T5 encoder placed as
`mochi_jax.lib.preparation` places them. Inputs are ShapeDtypeStructs with the shardings the command would
give them: model shapes come from a converted checkpoint's metadata, or a preset when there is none.

The figures are the compiler's (`compiled.memory_analysis()`), per device: arguments (weights,
state, batch), temporaries, outputs, and aliasing (outputs written into donated arguments, e.g.
the train state). Total = arguments + outputs - aliased + temporaries + generated code, plus what
sits on the device without being an argument (prepare's VAE decoder weights during the encode). A TPU
compiler refuses a program that does not fit its HBM; its message (with the sizes) is the answer.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from pathlib import Path
from typing import Callable

from mochi_jax import targets as targets_lib

GIB = targets_lib.GIB
WHAT = ("train", "sample", "vae_encode", "t5")


class BadInput(ValueError):
    """A config, target or shape that cannot be compiled; the message is one line saying why."""


# ----------------------------------------------------------------------------- the report


@dataclasses.dataclass
class Report:
    what: str
    target: str
    hardware: str
    num_devices: int
    mesh: dict
    details: list  # lines: model, batch, ...
    inputs: dict  # name -> bytes per device
    remat: str = ""  # a training step's remat setting (a policy or a groups string; remat='auto': its choice)
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0
    temp_bytes: int = 0
    code_bytes: int = 0
    host_bytes: int = 0  # pinned host memory of the program (weights on the host, offloaded activations)
    resident: dict = dataclasses.field(default_factory=dict)  # name -> bytes on the device the program never reads
    total_bytes: int = 0  # per device
    limit_bytes: int = 0
    limit_source: str = ""
    fits: bool = False
    lower_s: float = 0.0
    compile_s: float = 0.0
    # attention forward kernels (cuDNN, splash) in the bodies of the backward pass's layer loops (one loop
    # per remat group): each is rerun by every block of its loop (its remat keeps no 'attn'); 0 when no
    # block's backward reruns its attention; -1 when not applicable (no such kernel or loop, not compiled)
    attention_reruns: int = -1
    compiler_error: str = ""  # the first line of the compiler's out-of-memory refusal
    compiler_message: str = ""  # all of it (TPU: the largest allocations), cut at 4000 characters

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def format(self) -> str:
        g = lambda b: f"{b / GIB:8.2f} GiB" if b >= GIB // 10 or not b else f"{b / (1 << 20):8.1f} MiB"  # noqa: E731
        mb = lambda b: f"{b / GIB:.2f} GiB" if b >= GIB // 10 or not b else f"{b / (1 << 20):.1f} MiB"  # noqa: E731
        unit = "chip" if self.hardware.startswith("TPU") else "GPU"
        lines = [f"{self.what} on {self.hardware}"]
        lines += [f"  {line}" for line in self.details]
        lines.append("  mesh     " + ", ".join(f"{k} {v}" for k, v in self.mesh.items()) if self.mesh else
                     "  mesh     one device")
        if self.compiler_error:
            lines.append(f"  compiler: {self.compiler_error}")
        else:
            parts = ", ".join(f"{k} {mb(v)}" for k, v in self.inputs.items())
            lines += [f"  per {unit}:",
                      f"    arguments   {g(self.argument_bytes)}  ({parts})",
                      f"    temporaries {g(self.temp_bytes)}",
                      f"    outputs     {g(self.output_bytes)}  ({mb(self.alias_bytes)} of them written into "
                      "donated arguments)",
                      f"    code        {g(self.code_bytes)}"]
            for k, v in self.resident.items():
                lines.append(f"    resident    {g(v)}  ({k}: on the device, unused by this program)")
            if self.host_bytes:
                lines.append(f"    host memory {g(self.host_bytes)}  (pinned host: weights streamed block by block, "
                             "offloaded activations; not counted in the total)")
            lines.append(f"    total       {g(self.total_bytes)}  of {self.limit_bytes / GIB:.2f} GiB "
                         f"({self.limit_source})")
        if self.attention_reruns > 0:
            lines.append("  remat    the backward reruns the attention kernel's forward per block "
                         "(model.remat=save:attn keeps its output and softmax statistics instead)")
        lines.append(f"  compiled in {self.compile_s:.1f} s (lowered in {self.lower_s:.1f} s)")
        share = f"{self.total_bytes / GIB:.2f} GiB of {self.limit_bytes / GIB:.2f} GiB per {unit}"
        if self.fits:
            lines.append(f"FITS: {share} ({100 * self.total_bytes / self.limit_bytes:.0f} %)")
        elif self.compiler_error:
            lines.append(f"DOES NOT FIT: the compiler needs at least {share}")
        else:
            lines.append(f"DOES NOT FIT: {share}, {(self.total_bytes - self.limit_bytes) / GIB:.2f} GiB over")
            if self.hardware.startswith("TPU") and self.limit_source == "the TPU compiler's HBM limit":
                lines.append("  (the TPU compiler accepted the program, but its own memory analysis is over the "
                             "limit it enforces on simpler programs: not counted as fitting until run on a chip)")
        return "\n".join(lines)


def device_bytes(tree, memory: str = "device") -> int:
    """Bytes of one device's shards of a tree of ShapeDtypeStructs carrying shardings, in device
    memory (memory='device') or in pinned host memory (memory='pinned_host')."""
    import jax
    import numpy as np

    total = 0
    for x in jax.tree_util.tree_leaves(tree):
        kind = getattr(getattr(x, "sharding", None), "memory_kind", None) or "device"
        if (kind == "pinned_host") != (memory == "pinned_host"):
            continue
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += math.prod(shape) * np.dtype(x.dtype).itemsize
    return total


_USED = re.compile(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm")
_REQUIRED = re.compile(r"\(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)")


def parse_out_of_memory(message: str) -> tuple[int, int] | None:
    """(bytes needed, bytes available) from a TPU compiler's out-of-memory error, if it is one."""
    for pattern in (_USED, _REQUIRED):
        m = pattern.search(message)
        if m:
            a, ua, b, ub = m.groups()
            return targets_lib.parse_size(a, ua), targets_lib.parse_size(b, ub)
    return None


# ----------------------------------------------------------------------------- what the compiled program does

_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) ", re.M)
_CALLS = re.compile(r"(?:calls|to_apply|body|condition|branch_computations|called_computations)="
                    r"(\{[^}]*\}|%[\w.\-]+)")
_BACKWARD_LOOP = re.compile(r"while\([^\n]*?body=%([\w.\-]+)[^\n]*op_name=\"[^\"]*transpose\(")
_ATTENTION_FORWARD = re.compile(r'%splash_mha_fwd[\w.]* = .*custom-call\(|custom_call_target="__cudnn\$fmha(?!\w*Backward)')


def _computations(hlo: str) -> dict:
    """{computation name: its text} of an HLO module's text."""
    starts = [(m.group(1), m.start()) for m in _COMPUTATION.finditer(hlo)]
    return {name: hlo[a:b] for (name, a), (_, b) in zip(starts, starts[1:] + [(None, len(hlo))])}


def attention_reruns(hlo: str) -> int:
    """How many attention forward kernels (cuDNN's or splash's) the bodies of the backward pass's layer
    loops hold (one loop per remat group, summed): the attention forwards remat recomputes per block.
    -1 when the program has no attention kernel or no backward loop. From the compiled module's text
    (`compiled.as_text()`)."""
    if not _ATTENTION_FORWARD.search(hlo):
        return -1
    comps = _computations(hlo)

    def called(name: str) -> set:
        return {c.strip().lstrip("%") for group in _CALLS.findall(comps.get(name, ""))
                for c in group.strip("{}").split(",") if c.strip()}

    bodies = _BACKWARD_LOOP.findall(hlo)
    if not bodies:
        return -1
    seen, count = set(), 0
    for body in bodies:
        todo = [body]
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            count += len(_ATTENTION_FORWARD.findall(comps.get(name, "")))
            todo += called(name)
    return count


# ----------------------------------------------------------------------------- programs


@dataclasses.dataclass
class Program:
    """A jitted function lowered with abstract inputs: `lower()` -> jax.stages.Lowered."""

    what: str
    lower: Callable
    inputs: dict  # name -> tree of ShapeDtypeStructs (with shardings)
    mesh: dict
    details: list
    resident: dict = dataclasses.field(default_factory=dict)  # name -> tree on the device, not an argument
    remat: str = ""  # Report.remat


def _placed(tree, shardings):
    """ShapeDtypeStructs like `tree`, each with its sharding (one Sharding for all, or a tree)."""
    import jax

    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings), tree)
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _mesh_dict(mesh) -> dict:
    return {k: int(v) for k, v in mesh.shape.items()}


def _clip_line(batch: int, frames: int, height: int, width: int, latent) -> str:
    return (f"clip     {batch} x {frames} frames {height}x{width} -> latents [{batch}, "
            + ", ".join(map(str, latent)) + "]")


def train_program(cfg, dit_cfg, devices, clip, text_tokens: int, num_hosts: int = 1) -> Program:
    """The training step of a configs/lora.py config for `dit_cfg`, over the mesh of cfg.mesh built
    from `devices`, on a batch of cfg.batch_size clips of `clip` = (frames, height, width)."""
    import jax
    import jax.numpy as jnp

    from mochi_jax.lib import sampling
    from mochi_jax.models import sharding as sharding_lib
    from mochi_jax.lib import sweep as sweep_lib
    from mochi_jax.models import lora as lora_lib
    from mochi_jax.models.dit import abstract_variables

    mesh = sharding_lib.make_mesh(cfg.mesh.to_dict(), devices)
    n_batch = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.batch_size % n_batch or cfg.batch_size % num_hosts:
        raise BadInput(f"batch_size {cfg.batch_size} must be divisible by data x fsdp = {n_batch} (mesh "
                       f"{_mesh_dict(mesh)}) and by the {num_hosts} hosts; change --config.batch_size or "
                       "--config.mesh.*")
    try:
        parts = sweep_lib.training_parts(cfg, dit_cfg, mesh)
    except ValueError as e:  # the config's LoRA targets or sweep
        raise BadInput(str(e)) from e
    sweep, targets, shardings, step = parts.sweep, parts.targets, parts.shardings, parts.step
    variables = abstract_variables(dit_cfg, targets)
    state = parts.abstract_state()
    lora = state["lora"]
    state = _placed(state, shardings["state"])
    params = _placed(variables["params"], shardings["params"])
    b, latent = cfg.batch_size, sampling.latent_shape(*clip)
    batch = {"mean": jax.ShapeDtypeStruct((b, *latent), jnp.float32),
             "logvar": jax.ShapeDtypeStruct((b, *latent), jnp.float32),
             "t5_feats": jax.ShapeDtypeStruct((b, text_tokens, dit_cfg.t5_dim), jnp.float32),
             "t5_mask": jax.ShapeDtypeStruct((b, text_tokens), jnp.bool_)}
    batch = _placed(batch, shardings["batch"])

    def lower():
        with sharding_lib.activate(mesh):
            return step.jitted.lower(state, params, batch)

    accum = f", {cfg.optim.grad_accum} micro-batches per update" if cfg.optim.grad_accum > 1 else ""
    if sweep is None:
        lora_line = (f"LoRA     {lora_lib.count(lora):,} float32 parameters ("
                     + ", ".join(f"{t.pattern} r{t.rank}" for t in targets) + f") and their AdamW moments{accum}")
    else:
        n = sum(int(math.prod(x.shape)) for x in jax.tree_util.tree_leaves(lora))
        lora_line = (f"LoRA     a sweep of {sweep.size} LoRAs trained together ({', '.join(sweep.names)}): "
                     f"{n:,} stacked float32 parameters and their AdamW moments{accum}")
    return Program("train step", lower, {"frozen weights": params, "train state (donated)": state, "batch": batch},
                   _mesh_dict(mesh), [lora_line, _clip_line(b, *clip, latent)])


def sample_program(dit_cfg, targets, devices, batch: int, clip, guidance: float, text_tokens: int,
                   mesh=None, param_shardings=None, lora_shardings=None) -> Program:
    """One Euler step of the sampler (`sampling.euler_step`) for `batch` videos of `clip`; with
    guidance > 1 the conditional and unconditional branches run in one batch of 2 x batch. On one
    device, or (the trainer's validation videos) with the weights sharded as in training."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

    from mochi_jax.lib import sampling
    from mochi_jax.models.dit import abstract_variables

    guided = guidance > 1.0
    variables = abstract_variables(dit_cfg, targets)
    if mesh is None:
        one = SingleDeviceSharding(devices[0])
        param_shardings = lora_shardings = rep = one
    else:
        rep = NamedSharding(mesh, PartitionSpec())
    params = _placed(variables["params"], param_shardings)
    lora = _placed(variables.get("lora", {}), lora_shardings) if targets else {}
    latent = sampling.latent_shape(*clip)
    rows = 2 * batch if guided else batch
    f32 = jnp.float32
    z = jax.ShapeDtypeStruct((batch, *latent), f32, sharding=rep)
    feats = jax.ShapeDtypeStruct((rows, text_tokens, dit_cfg.t5_dim), f32, sharding=rep)
    mask = jax.ShapeDtypeStruct((rows, text_tokens), jnp.bool_, sharding=rep)
    scalar = jax.ShapeDtypeStruct((), f32, sharding=rep)
    step = jax.jit(sampling.euler_step(dit_cfg, tuple(targets), guided))

    def lower():
        return step.lower(params, lora, z, feats, mask, scalar, scalar, scalar)

    detail = _clip_line(batch, *clip, latent) + (f", guidance {guidance:g}: both branches, DiT batch {rows}"
                                                 if guided else ", no guidance")
    return Program("sampler step", lower, {"weights": params, "LoRA": lora, "latents and text": (z, feats, mask)},
                   _mesh_dict(mesh) if mesh is not None else {}, [detail])


def vae_encode_program(vae_cfg, devices, clip, tiled: bool) -> Program:
    """prepare's VAE encode of one clip: on one device, or split spatially over `devices` with the
    weights replicated (mochi_jax.lib.preparation.Models; tiled clips are encoded whole on one device)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

    from mochi_jax.models import vae as vae_lib
    from mochi_jax.lib.preparation import spatial_split

    frames, height, width = clip
    vae_lib.check_pixels((1, 3, frames, height, width), vae_cfg)
    params = jax.eval_shape(lambda: vae_lib.init(jax.random.PRNGKey(0), vae_cfg))
    n, s = len(devices), vae_cfg.spatial_factor
    mesh_desc = {}
    if n == 1 or tiled:
        one = SingleDeviceSharding(devices[0])
        params, pixels = _placed(params, one), jax.ShapeDtypeStruct((1, 3, frames, height, width), jnp.float32,
                                                                    sharding=one)
        fn = jax.jit(vae_lib.encode, static_argnames=("cfg", "tiled"))
    else:
        dh, dw = spatial_split(height // s, width // s, n)
        mesh = Mesh(np.asarray(devices).reshape(dh, dw, n // (dh * dw)), ("height", "width", "copies"))
        split = NamedSharding(mesh, PartitionSpec(None, None, None, "height", "width"))
        params = _placed(params, NamedSharding(mesh, PartitionSpec()))
        pixels = jax.ShapeDtypeStruct((1, 3, frames, height, width), jnp.float32, sharding=split)
        fn = jax.jit(vae_lib.encode, static_argnames=("cfg", "tiled"), out_shardings=(split, split))
        mesh_desc = _mesh_dict(mesh)

    def lower():
        return fn.lower(params, pixels, cfg=vae_cfg, tiled=tiled)  # jit drops the unused decoder argument

    latent = (vae_cfg.latent_channels, vae_lib.latent_frames(frames), height // s, width // s)
    return Program("VAE encode", lower, {"encoder weights": params["encoder"], "pixels": pixels}, mesh_desc,
                   [f"clip     {frames} frames {height}x{width} (float32 pixels) -> latents {list(latent)}"
                    + (", tiled" if tiled else "")], resident={"decoder weights": params["decoder"]})


def t5_program(t5_cfg, devices, batch: int, length: int, mesh_sizes) -> Program:
    """prepare's T5 call on a batch of captions: one device (text.encode_tokens), or the weights
    sharded over the mesh of `mesh_sizes` and the batch split (prepare's batch-split T5)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

    from mochi_jax.models import sharding as sharding_lib
    from mochi_jax.models import t5 as t5_lib

    params = t5_lib.abstract_params(t5_cfg)
    ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    mask = jax.ShapeDtypeStruct((batch, length), jnp.bool_)
    detail = [f"captions {batch} x {length} tokens -> features [{batch}, {length}, {t5_cfg.d_model}]"]
    if len(devices) == 1:
        from mochi_jax.lib.text import encode_tokens

        one = SingleDeviceSharding(devices[0])
        params, ids, mask = _placed(params, one), _placed(ids, one), _placed(mask, one)
        drop = jax.ShapeDtypeStruct((batch,), jnp.bool_, sharding=one)
        return Program("T5 encode", lambda: encode_tokens.lower(t5_cfg, params, ids, mask, drop),
                       {"weights": params, "tokens": (ids, mask)}, {}, detail)
    from mochi_jax.lib.preparation import _batch_split_t5

    mesh = sharding_lib.make_mesh(mesh_sizes, devices)
    shardings = sharding_lib.param_shardings(t5_lib.t5_logical_axes(params), params, mesh)
    batch_rule = (("batch", tuple(a for a in sharding_lib.AXES if a in mesh.shape)),)
    rows = sharding_lib.spec(("batch",), (batch,), mesh, rules=batch_rule)[0]
    text_sharding = NamedSharding(mesh, PartitionSpec(rows, None))
    params, ids, mask = _placed(params, shardings), _placed(ids, text_sharding), _placed(mask, text_sharding)
    run = _batch_split_t5(t5_cfg, text_sharding)
    return Program("T5 encode", lambda: run.lower(params, ids, mask), {"weights": params, "tokens": (ids, mask)},
                   _mesh_dict(mesh), detail)


# ----------------------------------------------------------------------------- compile and measure


def measure(program: Program, target: targets_lib.Target, limit: int, limit_source: str) -> Report:
    """Lower and compile `program` and read its memory; a TPU compiler's out-of-memory refusal
    becomes a report that does not fit (with the sizes from its message)."""
    inputs = {k: device_bytes(v) for k, v in program.inputs.items()}
    inputs.update({f"{k} in host memory": b for k, v in program.inputs.items() if (b := device_bytes(v, "pinned_host"))})
    report = Report(program.what, target.name, target.describe(), target.num_devices, program.mesh,
                    program.details, inputs, remat=program.remat,
                    limit_bytes=limit, limit_source=limit_source,
                    resident={k: device_bytes(v) for k, v in program.resident.items()})
    t0 = time.time()
    try:
        lowered = program.lower()
    except ValueError as e:  # shapes, meshes, attention backends the model refuses
        raise BadInput(" ".join(str(e).split())) from e
    report.lower_s = time.time() - t0
    t0 = time.time()
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - only an out-of-memory refusal is an answer; the rest is re-raised
        report.compile_s = time.time() - t0
        sizes = parse_out_of_memory(str(e))
        if sizes is None:
            raise
        report.total_bytes, report.limit_bytes = sizes
        report.limit_source = "the compiler's limit"
        report.compiler_error = str(e).strip().splitlines()[0][:400]
        report.compiler_message = str(e).strip()[:4000]
        return report
    report.compile_s = time.time() - t0
    report.attention_reruns = attention_reruns(compiled.as_text())
    m = compiled.memory_analysis()
    report.argument_bytes = int(m.argument_size_in_bytes)
    report.output_bytes = int(m.output_size_in_bytes)
    report.alias_bytes = int(m.alias_size_in_bytes)
    report.temp_bytes = int(m.temp_size_in_bytes)
    report.code_bytes = int(m.generated_code_size_in_bytes)
    report.host_bytes = sum(int(getattr(m, f"host_{k}_size_in_bytes", 0)) for k in ("argument", "output", "temp"))
    report.total_bytes = (report.argument_bytes + report.output_bytes - report.alias_bytes + report.temp_bytes
                          + report.code_bytes + sum(report.resident.values()))
    report.fits = report.total_bytes <= report.limit_bytes
    return report


# ----------------------------------------------------------------------------- remat under a budget

# Each keeps less than the one before and recomputes more. With a fused attention kernel (cuDNN, splash)
# 'dots' keeps every weight matmul and the kernel's residuals, as much as 'dots_no_batch' and
# recomputing less; the next rung down, 'save:attn', recomputes the matmuls but not the attention.
# With 'xla' attention 'dots' also keeps the [heads, S, S] logits, so 'dots_no_batch' is the rung below.
REMAT_LADDERS = {"xla": ("none", "dots", "dots_no_batch", "full"), "fused": ("none", "dots", "save:attn", "full")}


def remat_ladder(n: int, attention: str = "xla") -> list[tuple[str, str]]:
    """(remat, remat_groups) settings for n stacked blocks, from the least recomputation to the most:
    all blocks at one policy of the attention's REMAT_LADDERS, then the first k blocks at it and the
    rest at the next one for k = n-1 .. 1, then all at the next, and so on to 'full'."""
    policies = REMAT_LADDERS["xla" if attention == "xla" else "fused"]
    out = [(policies[0], "")]
    for p, q in zip(policies, policies[1:]):
        out += [("full", f"{p}:{k},{q}:{n - k}") for k in range(n - 1, 0, -1)] + [(q, "")]
    return out


@dataclasses.dataclass
class RematChoice:
    remat: str
    groups: str
    bytes: int  # compiled memory per device
    budget: int
    tried: list  # [(remat, groups, bytes)] in the order compiled

    def describe(self) -> str:
        setting = self.groups or self.remat
        return (f"{setting}: {self.bytes / GIB:.2f} GiB within the {self.budget / GIB:.2f} GiB budget "
                f"({len(self.tried)} settings compiled)")


def choose_remat(n: int, memory_of: Callable[[str, str], int], budget: int, attention: str = "xla") -> RematChoice:
    """The setting of `remat_ladder(n, attention)` with the least recomputation whose compiled memory
    per device (`memory_of(remat, groups)`) is within `budget` bytes, by bisection over the ladder
    (memory falls along it: each step keeps fewer activations), so about log2(3n) compiles."""
    ladder, memo, tried = remat_ladder(n, attention), {}, []

    def mem(i: int) -> int:
        if i not in memo:
            memo[i] = memory_of(*ladder[i])
            tried.append((*ladder[i], memo[i]))
        return memo[i]

    last = len(ladder) - 1
    if mem(last) > budget:
        raise BadInput(f"remat='auto': even remat 'full' needs {mem(last) / GIB:.2f} GiB per device, over the "
                       f"{budget / GIB:.2f} GiB budget (a smaller clip or batch, more fsdp / sequence devices, or "
                       "a larger model.memory_budget_gb)")
    lo, hi = 0, last
    while lo < hi:
        mid = (lo + hi) // 2
        if mem(mid) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return RematChoice(*ladder[lo], mem(lo), budget, tried)


def choose_remat_here(cfg, latent_shape, text_tokens: int) -> RematChoice:
    """remat='auto' for a training run on the devices at hand: compile the config's train step for
    its largest latent shape [12, t, h, w] and pick the least recomputation within
    cfg.model.memory_budget_gb (default: what the first device reports it can hold)."""
    import jax

    from mochi_jax.checkpoints import dit_config

    m = cfg.model
    devices = jax.devices()
    budget = int(m.memory_budget_gb * GIB)
    if budget <= 0:
        stats = devices[0].memory_stats() or {}
        budget = int(stats.get("bytes_limit", 0))
    if budget <= 0:
        raise BadInput(f"remat='auto': {devices[0].platform} reports no memory limit; "
                       "set --config.model.memory_budget_gb")
    dit_cfg = dit_config(m.dit, param_dtype=m.param_dtype, compute_dtype=m.compute_dtype, attention=m.attention,
                         weights_on_host=bool(m.get("weights_on_host", False)))
    _, t, h, w = latent_shape
    clip = (6 * (t - 1) + 1, 8 * h, 8 * w)
    target = targets_lib.local_target(devices)

    def memory_of(remat: str, groups: str) -> int:
        c = dataclasses.replace(dit_cfg, remat=remat, remat_groups=groups)
        return measure(train_program(cfg, c, devices, clip, text_tokens, jax.process_count()), target, budget,
                       "model.memory_budget_gb").total_bytes

    return choose_remat(dit_cfg.depth - 1, memory_of, budget, dit_cfg.attention)


# ----------------------------------------------------------------------------- from a config


def config_kind(cfg) -> str:
    """'lora', 'sample' or 'prepare': which command's config this is."""
    keys = set(cfg.keys())
    if {"optim", "lora", "mesh"} <= keys:
        return "lora"
    if {"sampling", "prompt", "model"} <= keys:
        return "sample"
    if {"buckets", "text_batch_size", "vae"} <= keys:
        return "prepare"
    raise BadInput("the config is none of configs/lora.py, configs/sample.py, configs/prepare.py")


def _metadata(path):
    """The converted checkpoint's custom metadata, or None when `path` holds none."""
    if not path or not Path(path).is_dir():
        return None
    from mochi_jax.checkpoints.common import read_metadata

    try:
        return read_metadata(path)
    except Exception:  # noqa: BLE001 - not a checkpoint
        return None


def _arch(kind: str, spec: str, path: str, demo: bool) -> tuple[dict, str, str]:
    """(architecture fields, where they come from, the checkpoint path or '') of the 'dit', 'vae' or
    't5' model. `spec`: '' (the checkpoint at `path` if there is one, else the demo's tiny model for
    a demo config, else the released model), 'mochi' (the released model), 'demo', a configs/dit.py
    preset, or a checkpoint path."""
    from mochi_jax import demo as demo_lib

    name = {"dit": "mochi_dit", "vae": "mochi_vae", "t5": "t5_encoder"}[kind]
    demo_arch = {"dit": demo_lib.DIT, "vae": demo_lib.VAE, "t5": demo_lib.T5}[kind]
    why = ""
    if not spec:
        meta = _metadata(path)
        if meta is not None and meta.get("model") == name:
            return dict(meta["config"]), f"the checkpoint {path}", path
        if demo:
            return dict(demo_arch), f"the demo's tiny model ({path} not made yet)", ""
        spec, why = "mochi", f" ({path} holds no converted checkpoint)"
    if spec == "mochi":
        if kind == "dit":
            from mochi_jax.configs import dit as dit_presets

            return dict(dit_presets.PRESETS["mochi"]), "the released model's shapes (configs/dit.py 'mochi')" + why, ""
        return {}, "the released model's shapes" + why, ""
    if spec == "demo":
        return dict(demo_arch), "the demo's tiny model", ""
    if kind == "dit":
        from mochi_jax.configs import dit as dit_presets

        if spec in dit_presets.PRESETS:
            return dict(dit_presets.PRESETS[spec]), f"configs/dit.py preset {spec!r}", ""
    meta = _metadata(spec)
    if meta is None or meta.get("model") != name:
        presets = "'mochi', 'small', 'tiny', 'demo'" if kind == "dit" else "'mochi', 'demo'"
        raise BadInput(f"aot.model={spec!r} is neither a converted {kind} checkpoint nor a preset ({presets})")
    return dict(meta["config"]), f"the checkpoint {spec}", spec


def _clip(aot, frames: int, height: int, width: int, source: str) -> tuple[tuple[int, int, int], str]:
    clip = (aot.num_frames or frames, aot.height or height, aot.width or width)
    given = (aot.num_frames, aot.height, aot.width) != (0, 0, 0)
    from mochi_jax.lib import sampling

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
    from mochi_jax.configs import prepare as prepare_config

    d = prepare_config.get_config()
    return (_longest(d.num_frames), *_largest_bucket(d.buckets), "configs/prepare.py defaults")


def check(cfg, what: str = "") -> Report:
    """Compile the program `what` (default cfg.aot.what, else the config's own command) of a
    configs/lora.py, sample.py or prepare.py config for cfg.aot.target and measure it."""
    aot = cfg.aot
    kind = config_kind(cfg)
    what = what or aot.what or {"lora": "train", "sample": "sample", "prepare": "vae_encode"}[kind]
    allowed = {"lora": ("train", "sample"), "sample": ("sample",), "prepare": ("vae_encode", "t5")}[kind]
    if what not in WHAT:
        raise BadInput(f"aot.what={what!r}: choose one of {', '.join(WHAT)}")
    if what not in allowed:
        raise BadInput(f"aot.what={what!r} needs " + ("a prepare config (configs/prepare.py)" if what in
                       ("vae_encode", "t5") else "a lora or sample config") + f"; this {kind} config offers "
                       + ", ".join(allowed))
    target = targets_lib.parse_target(aot.target, aot.gpus_per_host, aot.target_config)
    found = []

    def devices():  # made only once the config is checked: a bad clip is bad input with or without a compiler
        if not found:
            found.extend(targets_lib.compile_devices(target))
        return found

    build = {"lora": _lora_program, "sample": _sample_config_program, "prepare": _prepare_program}[kind]
    program = build(cfg, what, target, devices)
    if target.platform == "cuda":
        program.details.append("GPU      compiled with autotuning off (no GPU here): the kernels, not the memory, "
                               "may differ on the card")
    limit, source = memory_limit(aot, target, devices)
    return measure(program, target, limit, source)


def memory_limit(aot, target, devices) -> tuple[int, str]:
    """(bytes per device, where the figure comes from): --config.aot.memory_gib, else the target's."""
    if aot.memory_gib > 0:
        return int(aot.memory_gib * GIB), "--config.aot.memory_gib"
    return targets_lib.memory_limit(target, devices(), aot.gpu_memory_fraction)


def _is_demo(cfg) -> bool:
    return bool(cfg.get("demo"))  # only the :demo presets carry a demo block


def _lora_program(cfg, what, target, devices) -> Program:
    """configs/lora.py: the training step, or (what='sample') a validation video's sampler step with
    the weights sharded as in training."""
    from mochi_jax.models.dit import DiTConfig

    aot, m = cfg.aot, cfg.model
    arch, arch_src, _ = _arch("dit", aot.model, m.dit, _is_demo(cfg))
    dit_cfg = DiTConfig.from_dict({**arch, "param_dtype": m.param_dtype, "compute_dtype": m.compute_dtype,
                                   "attention": m.attention, "remat": m.remat, "remat_groups": m.remat_groups,
                                   "weights_on_host": bool(m.get("weights_on_host", False))})
    auto = ""
    if what == "train":
        f, h, w, src = _prepare_clip_defaults(cfg)
        clip, src = _clip(aot, f, h, w, src)
        if m.remat == "auto":
            limit, _ = memory_limit(aot, target, devices)
            budget = int(m.memory_budget_gb * GIB) if m.memory_budget_gb > 0 else limit

            def memory_of(remat: str, groups: str) -> int:
                c = dataclasses.replace(dit_cfg, remat=remat, remat_groups=groups)
                return measure(train_program(cfg, c, devices(), clip, aot.text_tokens, target.num_hosts), target,
                               limit, "").total_bytes

            choice = choose_remat(dit_cfg.depth - 1, memory_of, budget, dit_cfg.attention)
            dit_cfg = dataclasses.replace(dit_cfg, remat=choice.remat, remat_groups=choice.groups)
            auto = f"remat    auto -> {choice.describe()}"
        program = train_program(cfg, dit_cfg, devices(), clip, aot.text_tokens, target.num_hosts)
    else:
        from mochi_jax.models import sharding as sharding_lib
        from mochi_jax.lib import training
        from mochi_jax.models import lora as lora_lib
        from mochi_jax.models.dit import MochiDiT

        v, s = cfg.validation, cfg.validation.sampling
        dit_cfg = dataclasses.replace(dit_cfg, remat="none", remat_groups="")  # sampling keeps nothing for a backward
        clip, src = _clip(aot, s.num_frames, s.height, s.width, "config.validation.sampling")
        targets = lora_lib.targets_from_config(cfg.lora.to_dict())
        mesh = sharding_lib.make_mesh(cfg.mesh.to_dict(), devices())
        sh = training.train_shardings(MochiDiT(dit_cfg, targets), training.make_optimizer(cfg.optim), mesh)
        program = sample_program(dit_cfg, targets, devices(), max(1, len(v.prompts)), clip, s.guidance,
                                 aot.text_tokens, mesh, sh["params"], sh["state"]["lora"])
        program.details.append("         (the train state, resident meanwhile, is not counted)")
    program.details.insert(0, f"model    {arch_src}: depth {dit_cfg.depth}, width {dit_cfg.width}, {m.param_dtype} "
                              f"weights" + (" (blocks in pinned host memory)" if dit_cfg.weights_on_host else "")
                              + f", attention {m.attention}, remat {m.remat}"
                           + (f" ({m.remat_groups})" if m.remat_groups else ""))
    program.details.append(f"         (clip size from {src})")
    if auto:
        program.details.insert(1, auto)
    if what == "train":
        program.remat = dit_cfg.remat_groups or dit_cfg.remat
    return program


def _sample_config_program(cfg, what, target, devices) -> Program:
    """configs/sample.py: one sampler step on one device (the sampler does not shard its weights)."""
    from mochi_jax.models.dit import DiTConfig

    aot, m, s = cfg.aot, cfg.model, cfg.sampling
    arch, arch_src, _ = _arch("dit", aot.model, m.dit, _is_demo(cfg))
    dit_cfg = DiTConfig.from_dict({**arch, "param_dtype": m.param_dtype, "compute_dtype": m.compute_dtype,
                                   "attention": m.attention, "remat": "none"})
    targets = _sample_lora_targets(cfg, dit_cfg)
    clip, _ = _clip(aot, s.num_frames, s.height, s.width, "the config")
    program = sample_program(dit_cfg, targets, devices(), cfg.batch_size, clip, s.guidance, aot.text_tokens)
    program.details.insert(0, f"model    {arch_src}: depth {dit_cfg.depth}, width {dit_cfg.width}, "
                              f"{m.param_dtype} weights, attention {m.attention}"
                           + (f"; LoRAs {cfg.loras}" if targets else ""))
    if target.num_devices > 1:
        program.details.append(f"devices  1 of {target.num_devices} (the sampler runs on one device)")
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
        from mochi_jax.models.vae import VAEConfig

        arch, arch_src, ckpt = _arch("vae", aot.model, cfg.vae, demo)
        dtype = cfg.vae_dtype or (_stored_dtype(ckpt) if ckpt else VAEConfig.param_dtype)
        vae_cfg = VAEConfig.from_dict({**arch, "param_dtype": dtype, "tile_size": tuple(cfg.tile_size),
                                       "tile_overlap": tuple(cfg.tile_overlap)})
        h, w = _largest_bucket(cfg.buckets)
        clip, _ = _clip(aot, _longest(cfg.num_frames), h, w, "the config")
        program = vae_encode_program(vae_cfg, local_devices(), clip, bool(cfg.tiled))
        program.details.insert(0, f"model    {arch_src}: VAE, {dtype} weights")
    else:
        from mochi_jax.models.t5 import T5Config

        arch, arch_src, ckpt = _arch("t5", aot.model, cfg.t5, demo)
        dtype = cfg.t5_dtype or (_stored_dtype(ckpt) if ckpt else T5Config.param_dtype)
        t5_cfg = T5Config.from_dict({**arch, "param_dtype": dtype})
        sizes = cfg.get("mesh", None)
        sizes = dict(sizes.to_dict() if hasattr(sizes, "to_dict") else sizes or {"fsdp": -1})
        program = t5_program(t5_cfg, local_devices(), int(cfg.text_batch_size), int(cfg.max_length), sizes)
        program.details.insert(0, f"model    {arch_src}: T5 encoder, {dtype} weights")
    if len(local_devices()) < target.num_devices:
        program.details.append(f"devices  {len(local_devices())} of {target.num_devices}: one host's (prepare runs "
                               "on each host alone)")
    return program


def _stored_dtype(path) -> str:
    """The dtype of a converted checkpoint's weights (its first floating leaf)."""
    import orbax.checkpoint.experimental.v1 as ocp
    import jax
    import jax.numpy as jnp

    meta = ocp.metadata(Path(path).absolute()).metadata
    for leaf in jax.tree_util.tree_leaves(meta):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            return jnp.dtype(leaf.dtype).name
    return "bfloat16"


def _sample_lora_targets(cfg, dit_cfg):
    """The combined adapter's targets of a sample config's LoRAs (the files are read: they are small)."""
    if not cfg.loras:
        return ()
    from mochi_jax.checkpoints.runs import load_loras

    try:
        _, targets = load_loras(cfg.loras, dit_cfg)
    except (OSError, ValueError) as e:
        raise BadInput(f"loras={cfg.loras!r}: {e}") from e
    return tuple(targets)


def write_json(report: Report, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    return path
