"""Text-to-video sampling: the reference's sigma schedule, Euler flow steps with classifier-free
guidance, and decoding to uint8 frames.

    sigmas = sigma_schedule(64)                                   # 65 values, 1.0 ... ~0.059, 0.0
    z = initial_noise(seeds, latent_shape(37, 480, 848))           # DiT space, one key per seed
    z = denoise(cfg, params, z, cond, uncond, sigmas, guidance=6.0, lora=(factors, targets))
    frames = decode_frames(vae_cfg, vae_params, z)                 # uint8 [B, 37, 480, 848, 3]

The model sees timestep = 1000 * (1 - sigma); one step is z <- z + (sigma - sigma_next) * v with
v = v_uncond + g * (v_cond - v_uncond), the conditional and unconditional branches in one batch
(unconditional first, as diffusers). Everything runs in the normalised (DiT) latent space; the VAE
gets `dit_to_vae(z)`. Each step is one compiled call (`jitted_step`, static in config, LoRA targets
and guidance on), so new prompts, seeds, LoRA values or schedules never recompile.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from mochi_jax.lib.placement import PIXELS, spatial_mesh
from mochi_jax.lib.program import Program, abstract, mesh_layout
from mochi_jax.models import sharding as sharding_lib
from mochi_jax.models import vae as vae_lib
from mochi_jax.models.dit import DiTConfig, MochiDiT, abstract_variables, variable_shardings
from mochi_jax.models.lora import LoraTarget
from mochi_jax.models.sharding import replicated_like


def sigma_schedule(num_steps: int = 64, threshold: float = 0.025, linear_steps: int | None = None) -> np.ndarray:
    """The reference's linear-then-quadratic schedule as sigmas (1 = noise), with a final 0 appended:
    float32 [num_steps + 1]. For i < L = linear_steps (default num_steps // 2) the time 1 - sigma
    grows linearly, i * threshold / L; then it follows the quadratic through (L, threshold) with the
    same slope that would reach 1 at i = num_steps."""
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2 (the schedule has a linear and a quadratic part), got {num_steps}")
    n = num_steps
    lin = n // 2 if linear_steps is None else linear_steps
    if not 0 < lin <= n:
        raise ValueError(f"linear_steps must be in 1..{n}, got {lin}")
    quad = n - lin
    i = np.arange(n, dtype=np.float64)
    times = i * threshold / lin
    if quad:
        diff = lin - threshold * n
        a = diff / (lin * quad ** 2)
        b = threshold / lin - 2 * diff / quad ** 2
        c = a * lin ** 2
        times = np.where(i < lin, times, a * i ** 2 + b * i + c)
    return np.append(1.0 - times, 0.0).astype(np.float32)


def latent_shape(num_frames: int, height: int, width: int, channels: int = 12) -> tuple[int, ...]:
    """[12, (F-1)/6 + 1, H/8, W/8] for a video of F = 6k+1 frames of H x W pixels (H, W multiples of 16)."""
    if num_frames < 1 or (num_frames - 1) % 6:
        raise ValueError(f"num_frames must be 6k+1 (7, 13, 19, 25, 31, 37, ...), got {num_frames}")
    if height % 16 or width % 16:
        raise ValueError(f"height and width must be multiples of 16 (VAE x8, patch x2), got {height}x{width}")
    return (channels, vae_lib.latent_frames(num_frames), height // 8, width // 8)


def initial_noise(seeds: Sequence[int], shape: Sequence[int]) -> jax.Array:
    """N(0, I) noise [len(seeds), *shape], float32; sample i depends only on seeds[i], so a video
    is the same whether rendered alone or in a batch."""
    return jnp.stack([jax.random.normal(jax.random.PRNGKey(int(s)), tuple(shape), jnp.float32) for s in seeds])


# ----------------------------------------------------------------------------- where the sampler runs

@dataclasses.dataclass(frozen=True)
class Placement:
    """Where the sampler runs: a device mesh (models/sharding.py) and the shardings of what the step
    reads: the DiT's weights and LoRA factors by the logical-axis rules, as training places them
    (dit.variable_shardings), latents, text and scalars whole on every device."""
    mesh: Mesh
    params: object
    lora: object
    replicated: NamedSharding


def placement(cfg: DiTConfig, targets: Sequence[LoraTarget], mesh: Mesh, variants: bool = False) -> Placement:
    """The sampler's placement on `mesh`; with `variants` the LoRA factors carry a leading variant
    axis (several LoRAs stacked, `denoise(..., variants=K)`): each factor sharded as one LoRA's, every
    device holding all K variants of its slice."""
    check_mesh(cfg, mesh)
    sh = variable_shardings(cfg, tuple(targets), mesh)
    lora = sharding_lib.stacked(sh["lora"]) if variants else sh["lora"]
    return Placement(mesh, sh["params"], lora, NamedSharding(mesh, PartitionSpec()))


def check_mesh(cfg: DiTConfig, mesh: Mesh) -> None:
    """Raise ValueError unless the DiT's heads divide the mesh's sequence x tensor axes (attention
    switches from tokens split to heads split over them)."""
    n = mesh.shape["sequence"] * mesh.shape["tensor"]
    if cfg.num_heads % n:
        raise ValueError(f"mesh sequence {mesh.shape['sequence']} x tensor {mesh.shape['tensor']} = {n} does not "
                         f"divide the DiT's {cfg.num_heads} attention heads; change --config.mesh.sequence or "
                         "--config.mesh.tensor")


def sampler_rules(mesh: Mesh, rows: int, heads: int) -> tuple:
    """The logical-axis rules of a sampler step on `mesh` for a DiT batch of `rows` (videos, both
    guidance branches) and `heads` attention heads. As training's (models/sharding.py RULES), except
    that the data and fsdp axes go where they help: each splits the batch when it divides it
    (guidance branches, seeds, prompts), else the visual tokens when the heads allow it (then, as
    the sequence axis, attention switches to heads split with an all-to-all), else it computes
    copies. The weights stay FSDP-sharded over 'fsdp' either way. A function of the mesh, the
    shapes and the config only, so jax.jit's cache, keyed on those, never mixes two rules."""
    batch, tokens, used = [], [], mesh.shape["sequence"] * mesh.shape["tensor"]
    rows_used = 1
    for axis in ("data", "fsdp"):
        n = mesh.shape[axis]
        if n == 1:
            continue
        if rows % (rows_used * n) == 0:
            batch.append(axis)
            rows_used *= n
        elif heads % (used * n) == 0:
            tokens.append(axis)
            used *= n
    table = dict(sharding_lib.RULES)
    table.update(batch=tuple(batch), seq=("sequence", *tokens), act_heads=("sequence", *tokens, "tensor"))
    return tuple(table.items())


def idle_note(mesh: Mesh, rows: int, heads: int) -> str:
    """'' when every data / fsdp device splits the batch or the tokens (`sampler_rules`), else a line
    saying which axes compute copies and a mesh of the same devices that splits both."""
    table = dict(sampler_rules(mesh, rows, heads))
    busy = set(table["batch"]) | set(table["seq"])
    idle = {a: mesh.shape[a] for a in ("data", "fsdp") if mesh.shape[a] > 1 and a not in busy}
    if not idle:
        return ""
    n, rest = mesh.devices.size, mesh.shape["sequence"] * mesh.shape["tensor"]
    best = max(((d, n // rest // d) for d in range(1, n // rest + 1) if (n // rest) % d == 0 and rows % d == 0),
               key=lambda df: df[0] * (df[1] if heads % (rest * df[1]) == 0 else 1))
    return (f"mesh {', '.join(f'{a} {k}' for a, k in idle.items())} divides neither the DiT batch ({rows} rows) nor "
            f"the {heads} heads: those devices compute copies; --config.mesh.data={best[0]} "
            f"--config.mesh.fsdp={best[1]} splits {'both' if best[0] > 1 else 'the tokens'}")


def dit_rows(videos: int, guidance: float) -> int:
    """The DiT batch that renders `videos` at a time: both guidance branches when guidance > 1."""
    return 2 * videos if guidance > 1.0 else videos


def describe_mesh(mesh: Mesh, rows: int, heads: int) -> str:
    """'N device(s), mesh {axis: size}' for the commands' start line, with `idle_note`'s line after it
    when an axis only computes copies."""
    layout = {k: v for k, v in mesh.shape.items() if v > 1}
    note = idle_note(mesh, rows, heads)
    return (f"{mesh.devices.size} device(s)" + (f", mesh {layout}" if layout else "")
            + (f"\nnote: {note}" if note else ""))


def mesh_of(tree) -> Mesh | None:
    """The mesh a tree of arrays is placed on (NamedSharding), or None (one device, uncommitted)."""
    leaves = jax.tree_util.tree_leaves(tree)
    s = getattr(leaves[0], "sharding", None) if leaves else None
    return s.mesh if isinstance(s, NamedSharding) and isinstance(s.mesh, Mesh) else None


# ----------------------------------------------------------------------------- the step

def euler_step(cfg: DiTConfig, targets: tuple[LoraTarget, ...], guided: bool):
    """step(params, lora, z, feats, mask, sigma, sigma_next, guidance) -> z at sigma_next (not jitted):
    with `guided`, feats / mask hold [uncond; cond] and z runs through the model twice in one batch.
    The new latents are whole on every device (on a mesh), as the step's inputs are."""
    model = MochiDiT(cfg, targets)

    def step(params, lora, z, feats, mask, sigma, sigma_next, guidance):
        variables = {"params": params, **({"lora": lora} if targets else {})}
        zin = jnp.concatenate([z, z]) if guided else z
        t = jnp.full((zin.shape[0],), 1000.0 * (1.0 - sigma), jnp.float32)
        v = model.apply(variables, zin.astype(jnp.dtype(cfg.compute_dtype)), feats, mask, t)
        if guided:
            v_u, v_c = jnp.split(v, 2)
            v = v_u + guidance * (v_c - v_u)
        out = (z.astype(jnp.float32) + (sigma - sigma_next) * v).astype(z.dtype)
        return sharding_lib.constrain(out, (None,) * out.ndim)

    return step


@functools.partial(jax.jit, static_argnames=("cfg", "targets", "guided"))
def jitted_step(params, lora, z, feats, mask, sigma, sigma_next, guidance, *, cfg: DiTConfig,
                targets: tuple[LoraTarget, ...], guided: bool):
    """`euler_step` compiled once per (cfg, targets, guided) and input shapes (jax.jit's own cache)."""
    return euler_step(cfg, targets, guided)(params, lora, z, feats, mask, sigma, sigma_next, guidance)


@functools.partial(jax.jit, static_argnames=("cfg", "targets", "guided"))
def batched_step(params, loras, z, feats, mask, sigma, sigma_next, guidance, *, cfg: DiTConfig,
                 targets: tuple[LoraTarget, ...], guided: bool):
    """One Euler step of K variants at once (several LoRAs on one base, lib/variants.py): z [K, B, ...],
    adapters with a leading K axis; the DiT vmapped over them."""
    one = euler_step(cfg, targets, guided)
    return jax.vmap(one, in_axes=(None, 0, 0, None, 0, None, None, None))(
        params, loras, z, feats, per_variant_mask(mask, z.shape[0]), sigma, sigma_next, guidance)


def per_variant_mask(mask, k: int):
    """The text mask once per variant, for a DiT vmapped over variants (here, and a sweep's step): cuDNN
    attention's batching rule reshapes the key lengths with the queries, so they must be batched too."""
    return jnp.broadcast_to(mask, (k, *mask.shape))


def sampler_program(cfg: DiTConfig, targets: Sequence[LoraTarget], batch: int, latent: Sequence[int], text_tokens: int,
                    guided: bool, place: Placement, variants: int = 0) -> Program:
    """One step of `denoise` (the jitted step it calls) as a Program (lib/program.py) for `batch`
    videos of latent shape `latent` [12, t, h, w] and `text_tokens` T5 tokens, placed by `place`;
    with `guided` both branches run in one DiT batch of 2 x batch; with `variants` = K, K LoRAs
    stacked on one base (`batched_step`)."""
    targets = tuple(targets)
    variables = abstract_variables(cfg, targets)
    params = abstract(variables["params"], place.params)
    lora = {}
    if targets:
        lora = variables["lora"]
        if variants:
            lora = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct((variants, *x.shape), x.dtype), lora)
        lora = abstract(lora, place.lora)
    rows = 2 * batch if guided else batch
    f32, rep = jnp.float32, place.replicated
    lead = (variants,) if variants else ()
    z = jax.ShapeDtypeStruct((*lead, batch, *latent), f32, sharding=rep)
    feats = jax.ShapeDtypeStruct((rows, text_tokens, cfg.t5_dim), f32, sharding=rep)
    mask = jax.ShapeDtypeStruct((rows, text_tokens), jnp.bool_, sharding=rep)
    scalar = jax.ShapeDtypeStruct((), f32, sharding=rep)
    return Program("sampler step", batched_step if variants else jitted_step,
                   (params, lora, z, feats, mask, scalar, scalar, scalar),
                   {"weights": params, "LoRA": lora, "latents and text": (z, feats, mask)},
                   kwargs=dict(cfg=cfg, targets=targets, guided=guided), mesh=place.mesh,
                   rules=sampler_rules(place.mesh, rows, cfg.num_heads), layout=mesh_layout(place.mesh))


def denoise(cfg: DiTConfig, params, noise, cond, uncond=None, sigmas=None, guidance: float = 6.0,
            lora=None, progress: bool = False, variants: int = 0):
    """Run the Euler flow from `noise` [B, 12, t, h, w] (DiT space, sigma = sigmas[0]) to sigmas[-1].

    cond / uncond: (t5 features [B, L, D], mask [B, L]) for the prompts and negative prompts; with
    guidance > 1 and `uncond` given both run in one batch, otherwise the conditional branch alone.
    lora: None or (factors, targets) (see mochi_jax.models.lora; several LoRAs: combine them first);
    with `variants` = K the factors carry a leading axis of K LoRAs (lib/variants.py), all rendered
    from the same noise, and the result is [K, B, ...].
    Runs where `params` are: on their mesh (`placement`), with the batch and the visual tokens split
    as `sampler_rules` says; uncommitted or on one device, on that device.
    Returns float32 latents in DiT space, whole on every device."""
    sigmas = sigma_schedule() if sigmas is None else np.asarray(sigmas, np.float32)
    factors, targets = lora if lora is not None else ({}, ())
    guided = uncond is not None and guidance > 1.0
    feats, mask = cond
    if guided:
        feats = jnp.concatenate([uncond[0], feats])
        mask = jnp.concatenate([uncond[1], mask])
    z = jnp.asarray(noise, jnp.float32)
    if variants:
        z = jnp.broadcast_to(z, (variants, *z.shape))
    step = functools.partial(batched_step if variants else jitted_step, cfg=cfg, targets=tuple(targets),
                             guided=guided)
    mesh = mesh_of(params)
    if mesh is None:
        rep, ctx = replicated_like(jax.tree_util.tree_leaves(params)[0]), contextlib.nullcontext()
    else:
        rows = feats.shape[0]
        rep, ctx = NamedSharding(mesh, PartitionSpec()), sharding_lib.activate(mesh, sampler_rules(mesh, rows,
                                                                                                    cfg.num_heads))
    # every input committed like the weights (as sampler_program places them), so the first step
    # compiles the same program as the later ones and as the fit check
    z, feats, mask, g = jax.device_put((z, feats, mask, np.float32(guidance)), rep)
    factors = jax.tree_util.tree_map(lambda x: x if isinstance(x, jax.Array) else jax.device_put(x, rep), factors)
    sig = jax.device_put([np.float32(s) for s in sigmas], rep)
    it = range(len(sigmas) - 1)
    if progress:
        it = tqdm(it, desc="sampling", unit="step")
    with ctx:
        for i in it:
            z = step(params, factors, z, feats, mask, sig[i], sig[i + 1], g)
    return z


def to_uint8(x):
    """Pixels in [-1, 1] -> uint8 [0, 255] (round to nearest, clipped)."""
    return jnp.round(jnp.clip((x + 1.0) * 127.5, 0.0, 255.0)).astype(jnp.uint8)


@functools.lru_cache(maxsize=None)
def decoder(split: NamedSharding | None = None):
    """The jitted decode of DiT-space latents to uint8 frames [B, F, H, W, 3] (cfg and tiled static);
    with `split`, the latents' spatial sharding (`placement.PIXELS` on a `placement.spatial_mesh`),
    the frames gathered whole on every device at the end."""
    def decode(params, latents, cfg, tiled):
        x = vae_lib.decode(params, vae_lib.dit_to_vae(latents), cfg, tiled=tiled)
        return to_uint8(jnp.transpose(x, (0, 2, 3, 4, 1)))

    if split is None:
        return jax.jit(decode, static_argnames=("cfg", "tiled"))
    return jax.jit(decode, static_argnames=("cfg", "tiled"), out_shardings=NamedSharding(split.mesh, PartitionSpec()))


@functools.lru_cache(maxsize=None)
def tiled_decoder(mesh: Mesh):
    """The jitted tiled decode (cfg static) spread over the devices of a one-axis mesh ('tiles'): each
    device decodes every n-th tile (vae.decode's `share`), the blended parts are summed over the
    devices, and the uint8 frames are whole on every device."""
    n = mesh.size

    def part(params, latents, cfg):
        x = vae_lib.decode(params, vae_lib.dit_to_vae(latents), cfg, tiled=True,
                           share=(jax.lax.axis_index("tiles"), n))
        return jax.lax.psum(x, "tiles")

    def decode(params, latents, cfg):
        x = jax.shard_map(functools.partial(part, cfg=cfg), mesh=mesh, in_specs=(PartitionSpec(), PartitionSpec()),
                          out_specs=PartitionSpec(), check_vma=False)(params, latents)
        return to_uint8(jnp.transpose(x, (0, 2, 3, 4, 1)))

    return jax.jit(decode, static_argnames=("cfg",), out_shardings=NamedSharding(mesh, PartitionSpec()))


def decode_frames(vae_cfg, vae_params, latents, tiled: bool = True) -> np.ndarray:
    """DiT-space latents [B, 12, t, h, w] -> uint8 frames [B, 6(t-1)+1, 8h, 8w, 3].

    With the VAE's weights whole on each of several devices (a NamedSharding, as the sample and
    evaluate commands load them), an untiled decode splits each video spatially over those devices
    (latent width, then height, as prepare's encode; XLA exchanges the convolution halos and
    all-reduces the GroupNorm statistics); a tiled decode shares its tiles out between the devices
    (`tiled_decoder`; the blend adds the same terms in another order)."""
    leaf = jax.tree_util.tree_leaves(vae_params)[0]
    s = getattr(leaf, "sharding", None)
    several = isinstance(s, NamedSharding) and s.mesh.size > 1
    if several and not tiled:
        split = NamedSharding(spatial_mesh(s.mesh.devices, *np.shape(latents)[-2:]), PIXELS)
        frames = decoder(split)(vae_params, jax.device_put(latents, split), cfg=vae_cfg, tiled=False)
    elif several:
        mesh = Mesh(s.mesh.devices.reshape(-1), ("tiles",))
        frames = tiled_decoder(mesh)(vae_params, jax.device_put(latents, NamedSharding(mesh, PartitionSpec())),
                                     cfg=vae_cfg)
    else:  # the latents where the weights are (e.g. a training mesh's latents, the VAE on one device)
        latents = jnp.asarray(latents, jnp.float32)
        frames = decoder(None)(vae_params, jax.device_put(latents, replicated_like(leaf)), cfg=vae_cfg, tiled=tiled)
    return to_host(frames)


def to_host(x) -> np.ndarray:
    """A NumPy copy of an array that is whole on every device (with several processes, this
    process's copy)."""
    return np.asarray(x if x.is_fully_addressable else x.addressable_data(0))
