"""The pieces of LoRA training, as pure functions: the loss, the optimizer, one training step and
where everything it touches lives on a mesh. The loop that drives them is mochi_jax/lib/trainer.py.

    loss       `draw_noise` (the step's randomness) and `flow_loss` (the official fine-tuner's
               rectified-flow loss, in the DiT's normalised latent space or the reference's exact form)
    optimizer  `make_optimizer`: AdamW on the LoRA factors with warmup + cosine, clipping, accumulation
    step       `make_train_step`: step(state, params, batch) -> (state, metrics), one jit (one SPMD
               program on a mesh); gradients of the LoRA only; non-finite steps are skipped
    placement  `train_shardings`, `init_state`
    held out   `validation_loss`: the flow loss of held-out clips at fixed sigmas with fixed noise

The train state is one pytree {step, lora, opt, rng}; the base weights are a separate, frozen input
of the step, so no gradient, optimizer slot or fp32 copy of them ever exists.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from mochi_jax.models import sharding as sharding_lib
from mochi_jax.models import vae as vae_lib
from mochi_jax.models.dit import abstract_variables, dummy_inputs, variable_shardings


# ----------------------------------------------------------------------------- loss


SIGMA_SAMPLINGS = ("uniform", "logit_normal", "shifted")


def uniform_sigma(key, n: int):
    """n noise levels ~ U(0, 1) (sigma_sampling='uniform')."""
    return jax.random.uniform(key, (n,), jnp.float32)


def sigma_sampler(loss) -> Callable:
    """draw(key, n) -> n noise levels sigma in (0, 1), as the loss block (configs/lora.py `loss`) says:
      uniform       sigma ~ U(0, 1), the official fine-tuner's
      logit_normal  sigma = sigmoid(logit_mean + logit_std * N(0, 1)): more steps at middle sigmas
      shifted       u ~ U(0, 1), sigma = shift u / (1 + (shift - 1) u): shift > 1 puts more steps at
                    high noise (as the samplers of SD3 and Flux shift their schedules)"""
    kind = loss.get("sigma_sampling", "uniform")
    if kind == "uniform":
        return uniform_sigma
    if kind == "logit_normal":
        mean, std = float(loss.logit_mean), float(loss.logit_std)
        return lambda key, n: jax.nn.sigmoid(mean + std * jax.random.normal(key, (n,), jnp.float32))
    if kind == "shifted":
        shift = float(loss.sigma_shift)
        if shift <= 0:
            raise ValueError(f"--config.loss.sigma_shift={shift}: must be > 0 (1 = uniform)")
        return lambda key, n: (lambda u: shift * u / (1 + (shift - 1) * u))(jax.random.uniform(key, (n,), jnp.float32))
    raise ValueError(f"--config.loss.sigma_sampling={kind!r}: choose one of {', '.join(SIGMA_SAMPLINGS)}")


def draw_noise(rng, batch, caption_dropout: float = 0.0, draw_sigma: Callable = uniform_sigma) -> dict:
    """The step's randomness: posterior noise n, flow noise eps, sigma per sample (`draw_sigma`, from
    `sigma_sampler`; default U(0, 1)), which captions to drop, and the key of LoRA dropout."""
    k_post, k_eps, k_sigma, k_drop, k_lora = jax.random.split(rng, 5)
    shape = batch["mean"].shape
    return {"n": jax.random.normal(k_post, shape, jnp.float32),
            "eps": jax.random.normal(k_eps, shape, jnp.float32),
            "sigma": draw_sigma(k_sigma, shape[0]),
            "drop": jax.random.uniform(k_drop, shape[:1]) < caption_dropout,
            "lora_rng": k_lora}


def condition(batch, drop):
    """The text the DiT is given: the batch's T5 features and mask, with dropped captions (`drop`
    [B] bool) zeroed, features and mask, as genmo's fine-tuner does. This is the unconditional
    branch a LoRA learns, and what the sampler's empty negative prompt is by default
    (sampling.zero_empty_negative)."""
    feats = jnp.where(drop[:, None, None], 0.0, batch["t5_feats"].astype(jnp.float32))
    return feats, batch["t5_mask"].astype(bool) & ~drop[:, None]


def flow_loss(model, params, lora, batch, noise, formulation: str = "normalized"):
    """The official fine-tuner's rectified-flow loss for one batch (noise from `draw_noise`).

    z = mean + exp(logvar / 2) * n (the cached posterior, resampled every step), z_sigma =
    (1 - sigma) * z + sigma * eps, target u = z - eps, MSE in float32 against the DiT's prediction
    at timestep 1000 * (1 - sigma). Dropped captions have their features and mask zeroed.
      'normalized': z is moved to the DiT's normalised latent space first, where sampling runs.
      'reference':  the official script exactly: z_sigma from the raw VAE latents and the target
                    normalised, (u - latents_mean) / latents_std.
    """
    mean, logvar = batch["mean"].astype(jnp.float32), batch["logvar"].astype(jnp.float32)
    z = mean + jnp.exp(0.5 * logvar) * noise["n"]
    if formulation == "normalized":
        z = vae_lib.vae_to_dit(z)
    elif formulation != "reference":
        raise ValueError(f"loss.formulation must be 'normalized' or 'reference', got {formulation!r}")
    sigma, eps = noise["sigma"], noise["eps"]
    s = sigma.reshape(-1, 1, 1, 1, 1)
    z_sigma = (1.0 - s) * z + s * eps
    target = z - eps
    if formulation == "reference":
        target = vae_lib.vae_to_dit(target)  # (u - latents_mean) / latents_std

    feats, mask = condition(batch, noise["drop"])
    cdt = jnp.dtype(model.cfg.compute_dtype)
    pred = model.apply({"params": params, "lora": lora}, z_sigma.astype(cdt), feats.astype(cdt), mask,
                       1000.0 * (1.0 - sigma),
                       rngs={} if noise.get("lora_rng") is None else {"dropout": noise["lora_rng"]})
    return jnp.mean(jnp.square(pred.astype(jnp.float32) - target))


# ----------------------------------------------------------------------------- optimizer


def lr_schedule(o):
    """Linear warmup from 0 over `warmup_steps`, then cosine to 0 at `decay_steps` (or constant)."""
    if o.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, o.lr, o.warmup_steps, max(o.decay_steps, o.warmup_steps + 1))
    if o.schedule == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, o.lr, o.warmup_steps), optax.constant_schedule(o.lr)],
                                    [o.warmup_steps])
    raise ValueError(f"optim.schedule must be 'cosine' or 'constant', got {o.schedule!r}")


def make_optimizer(o):
    """AdamW on the LoRA factors (fp32), optional global-norm clipping and gradient accumulation."""
    chain = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
    chain.append(optax.adamw(lr_schedule(o), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay))
    opt = optax.chain(*chain)
    return optax.MultiSteps(opt, every_k_schedule=o.grad_accum) if o.grad_accum > 1 else opt


# ----------------------------------------------------------------------------- one step


def make_train_step(model, optimizer, formulation: str, caption_dropout: float, mesh=None, shardings=None,
                    draw_sigma: Callable = uniform_sigma):
    """step(state, params, batch) -> (state, metrics), jitted. A step whose loss or gradients are not
    finite is not applied (state unchanged except the step counter) and reported in metrics['finite'].

    With a `mesh` and `shardings` (from `train_shardings`), the step is one SPMD program over the
    mesh: its inputs and outputs keep their shardings and the model's activation annotations
    apply. `step.jitted` is the underlying jax.jit (lower it inside `sharding.activate(mesh)`)."""

    def step(state, params, batch):
        noise = draw_noise(jax.random.fold_in(state["rng"], state["step"]), batch, caption_dropout, draw_sigma)
        loss, grads = jax.value_and_grad(lambda lo: flow_loss(model, params, lo, batch, noise, formulation))(
            state["lora"])
        gnorm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)

        def apply(_):
            updates, opt = optimizer.update(grads, state["opt"], state["lora"])
            return optax.apply_updates(state["lora"], updates), opt

        lora, opt = jax.lax.cond(finite, apply, lambda _: (state["lora"], state["opt"]), None)
        new = {"step": state["step"] + 1, "lora": lora, "opt": opt, "rng": state["rng"]}
        return new, {"loss": loss, "grad_norm": gnorm, "finite": finite}

    return jit_step(step, mesh, shardings)


def jit_step(step, mesh=None, shardings=None):
    """`step(state, params, batch)` jitted with the state donated; with a mesh, one SPMD program whose
    inputs and outputs keep `shardings` (train_shardings') and whose trace sees the mesh, so the
    model's activation annotations apply. The result's `.jitted` is the underlying jax.jit (lower
    it inside `sharding.activate(mesh)`)."""
    if mesh is None:
        return jax.jit(step, donate_argnums=(0,))
    sh = shardings
    jitted = jax.jit(step, in_shardings=(sh["state"], sh["params"], sh["batch"]),
                     out_shardings=(sh["state"], sh["replicated"]), donate_argnums=(0,))

    def sharded_step(state, params, batch):
        with sharding_lib.activate(mesh):
            return jitted(state, params, batch)

    sharded_step.jitted = jitted
    return sharded_step


def train_shardings(model, optimizer, mesh) -> dict:
    """NamedShardings of everything the step touches: 'params' (frozen base: FSDP over 'embed'; with
    model.cfg.weights_on_host the stacked 'blocks' in pinned host memory),
    'state' (LoRA factors like the kernels they adapt, optimizer moments like the LoRA, step and rng
    replicated), 'batch' (leading axis over data x fsdp) and 'replicated'."""
    rep = NamedSharding(mesh, PartitionSpec())
    sh = variable_shardings(model.cfg, model.lora_targets, mesh)
    params_sh, lora_sh = sh["params"], sh["lora"]
    lora = abstract_variables(model.cfg, model.lora_targets)["lora"]
    opt = jax.eval_shape(optimizer.init, lora)
    return {
        "params": params_sh,
        "state": {"step": rep, "lora": lora_sh, "opt": sharding_lib.like_tree_shardings(opt, lora, lora_sh, rep),
                  "rng": rep},
        "batch": {k: sharding_lib.batch_sharding(mesh, n) for k, n in
                  (("mean", 5), ("logvar", 5), ("t5_feats", 3), ("t5_mask", 2))},
        "replicated": rep,
    }


def init_lora(model, key):
    """Fresh LoRA factors (a: PEFT's uniform init, b: zeros) without materialising the base weights:
    the jitted init returns only the 'lora' collection, so XLA drops everything else."""
    args = dummy_inputs(model.cfg)
    return jax.jit(lambda k: model.init(k, *args).get("lora", {}))(key)


def init_state(model, optimizer, seed: int, sharding) -> dict:
    """The initial train state {step, lora, opt, rng}, committed to `sharding` (one sharding, or a
    tree like the state, e.g. train_shardings(...)['state']): the step's outputs are committed, and
    an uncommitted first input would compile the step a second time."""
    key = jax.random.PRNGKey(seed)
    lora = init_lora(model, jax.random.fold_in(key, 1))
    state = {"step": jnp.zeros((), jnp.int32), "lora": lora, "opt": optimizer.init(lora),
             "rng": jax.random.fold_in(key, 2)}
    return jax.device_put(state, sharding)


# ----------------------------------------------------------------------------- held out


def validation_loss(loss_fn, params, lora, clips, sigmas, seed: int) -> dict:
    """The flow loss of held-out clips at fixed sigmas with fixed noise (the posterior noise too) and
    no caption dropout: a deterministic curve that tells learning from overfitting. `loss_fn(params,
    lora, batch, noise)`: the jitted `flow_loss`, built once per run. Returns {'val_loss': mean,
    'val_loss/sigma_0.1': ..., ...}: floats, or arrays [K] when `loss_fn` returns one loss per
    variant (a sweep, mochi_jax/lib/sweep.py)."""
    per_sigma = {float(s): [] for s in sigmas}
    for i, clip in enumerate(clips):
        batch = {k: np.asarray(v)[None] for k, v in clip.items()}
        key = jax.random.fold_in(jax.random.PRNGKey(seed), i)
        base = draw_noise(key, batch)  # the same n and eps at every sigma and every validation round
        for s in per_sigma:
            noise = {"n": base["n"], "eps": base["eps"], "sigma": jnp.full((1,), s, jnp.float32),
                     "drop": jnp.zeros((1,), bool), "lora_rng": None}
            per_sigma[s].append(np.asarray(loss_fn(params, lora, batch, noise), np.float64))

    def value(x):
        return float(x) if np.ndim(x) == 0 else x

    means = {f"val_loss/sigma_{s:g}": np.mean(v, axis=0) for s, v in per_sigma.items()}
    out = {k: value(v) for k, v in means.items()}
    out["val_loss"] = value(np.mean(list(means.values()), axis=0))
    return out
