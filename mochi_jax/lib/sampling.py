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

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from mochi_jax.lib.program import Program, abstract
from mochi_jax.models import vae as vae_lib
from mochi_jax.models.dit import DiTConfig, MochiDiT, abstract_variables
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


def euler_step(cfg: DiTConfig, targets: tuple[LoraTarget, ...], guided: bool):
    """step(params, lora, z, feats, mask, sigma, sigma_next, guidance) -> z at sigma_next (not jitted):
    with `guided`, feats / mask hold [uncond; cond] and z runs through the model twice in one batch."""
    model = MochiDiT(cfg, targets)

    def step(params, lora, z, feats, mask, sigma, sigma_next, guidance):
        variables = {"params": params, **({"lora": lora} if targets else {})}
        zin = jnp.concatenate([z, z]) if guided else z
        t = jnp.full((zin.shape[0],), 1000.0 * (1.0 - sigma), jnp.float32)
        v = model.apply(variables, zin.astype(jnp.dtype(cfg.compute_dtype)), feats, mask, t)
        if guided:
            v_u, v_c = jnp.split(v, 2)
            v = v_u + guidance * (v_c - v_u)
        return (z.astype(jnp.float32) + (sigma - sigma_next) * v).astype(z.dtype)

    return step


@functools.partial(jax.jit, static_argnames=("cfg", "targets", "guided"))
def jitted_step(params, lora, z, feats, mask, sigma, sigma_next, guidance, *, cfg: DiTConfig,
                targets: tuple[LoraTarget, ...], guided: bool):
    """`euler_step` compiled once per (cfg, targets, guided) and input shapes (jax.jit's own cache)."""
    return euler_step(cfg, targets, guided)(params, lora, z, feats, mask, sigma, sigma_next, guidance)


def sampler_program(cfg: DiTConfig, targets: Sequence[LoraTarget], batch: int, latent: Sequence[int], text_tokens: int,
                    guided: bool, param_shardings, lora_shardings, replicated) -> Program:
    """One step of `denoise` (`jitted_step`, the function it calls per step) as a Program
    (lib/program.py) for `batch` videos of latent shape `latent` [12, t, h, w] and `text_tokens` T5
    tokens; with `guided` both branches run in one DiT batch of 2 x batch. The weights and LoRA
    factors in their shardings (one sharding or a tree each), latents and text in `replicated`."""
    targets = tuple(targets)
    variables = abstract_variables(cfg, targets)
    params = abstract(variables["params"], param_shardings)
    lora = abstract(variables["lora"], lora_shardings) if targets else {}
    rows = 2 * batch if guided else batch
    f32 = jnp.float32
    z = jax.ShapeDtypeStruct((batch, *latent), f32, sharding=replicated)
    feats = jax.ShapeDtypeStruct((rows, text_tokens, cfg.t5_dim), f32, sharding=replicated)
    mask = jax.ShapeDtypeStruct((rows, text_tokens), jnp.bool_, sharding=replicated)
    scalar = jax.ShapeDtypeStruct((), f32, sharding=replicated)
    return Program("sampler step", jitted_step, (params, lora, z, feats, mask, scalar, scalar, scalar),
                   {"weights": params, "LoRA": lora, "latents and text": (z, feats, mask)},
                   kwargs=dict(cfg=cfg, targets=targets, guided=guided))


def denoise(cfg: DiTConfig, params, noise, cond, uncond=None, sigmas=None, guidance: float = 6.0,
            lora=None, progress: bool = False):
    """Run the Euler flow from `noise` [B, 12, t, h, w] (DiT space, sigma = sigmas[0]) to sigmas[-1].

    cond / uncond: (t5 features [B, L, D], mask [B, L]) for the prompts and negative prompts; with
    guidance > 1 and `uncond` given both run in one batch, otherwise the conditional branch alone.
    lora: None or (factors, targets) (see mochi_jax.models.lora; several LoRAs: combine them first).
    Returns float32 latents in DiT space."""
    sigmas = sigma_schedule() if sigmas is None else np.asarray(sigmas, np.float32)
    factors, targets = lora if lora is not None else ({}, ())
    guided = uncond is not None and guidance > 1.0
    feats, mask = cond
    if guided:
        feats = jnp.concatenate([uncond[0], feats])
        mask = jnp.concatenate([uncond[1], mask])
    step = functools.partial(jitted_step, cfg=cfg, targets=tuple(targets), guided=guided)
    # every input committed like the weights (as sampler_program places them), so the first step
    # compiles the same program as the later ones and as the fit check
    rep = replicated_like(jax.tree_util.tree_leaves(params)[0])
    z, feats, mask, g = jax.device_put((jnp.asarray(noise, jnp.float32), feats, mask, np.float32(guidance)), rep)
    sig = jax.device_put([np.float32(s) for s in sigmas], rep)
    it = range(len(sigmas) - 1)
    if progress:
        it = tqdm(it, desc="sampling", unit="step")
    for i in it:
        z = step(params, factors, z, feats, mask, sig[i], sig[i + 1], g)
    return z


@functools.partial(jax.jit, static_argnames=("cfg", "tiled"))
def _decode(params, latents, cfg, tiled):
    x = vae_lib.decode(params, vae_lib.dit_to_vae(latents), cfg, tiled=tiled)
    return to_uint8(jnp.transpose(x, (0, 2, 3, 4, 1)))


def to_uint8(x):
    """Pixels in [-1, 1] -> uint8 [0, 255] (round to nearest, clipped)."""
    return jnp.round(jnp.clip((x + 1.0) * 127.5, 0.0, 255.0)).astype(jnp.uint8)


def decode_frames(vae_cfg, vae_params, latents, tiled: bool = True) -> np.ndarray:
    """DiT-space latents [B, 12, t, h, w] -> uint8 frames [B, 6(t-1)+1, 8h, 8w, 3]."""
    return np.asarray(_decode(vae_params, jnp.asarray(latents, jnp.float32), vae_cfg, tiled))
