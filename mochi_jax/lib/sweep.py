"""Several LoRAs trained together on one frozen base: the `sweep` block of configs/lora.py.

Each variant is the run's config with its own `lora` (targets, ranks, alpha, dropout), `optim` and
`seed` (checkpoints/runs.py `sweep_variants`). Their LoRAs share one stacked structure with a leading
variant axis K: the union of the layers any variant adapts, each at the largest rank among the
variants adapting it, zero-padded (exact: a zero column of `a` and the matching zero row of `b`
have zero gradients, so AdamW and its weight decay leave them zero), as evaluation stacks LoRAs
(mochi_jax/lib/variants.py). One step vmaps the loss and its gradient over K: the frozen base is
one argument read once for all variants (its memory does not grow with K; activations do), and
every variant takes its own AdamW step with its own settings and state.

What the variants share and what is their own:
  shared  the batch, its posterior and flow noise, sigma and caption dropout, all drawn from the
          run's seed: the comparison is paired, so two variants differ by their settings, not by
          the luck of their noise
  own     the LoRA's initialisation and LoRA-dropout keys (from the variant's seed), the optimizer
With its seed equal to the run's, a variant trained in a sweep equals its config trained alone.

The variant's alpha / rank is applied to `a` (`effective`: a * scale, the same product by the
chain rule), so the stacked model runs with scale 1 on every layer.

The train state: {step, lora [K, ...], opt [one AdamW state per variant], rng [K] (the variants'
keys), noise_rng (the run's)}.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mochi_jax.checkpoints.runs import sweep_variants
from mochi_jax.lib import training
from mochi_jax.lib.program import Program, abstract, mesh_layout
from mochi_jax.lib.sampling import per_variant_mask
from mochi_jax.models import lora as lora_lib
from mochi_jax.models import sharding as sharding_lib
from mochi_jax.models.dit import DiTConfig, MochiDiT, abstract_variables


@dataclasses.dataclass(frozen=True)
class Sweep:
    names: tuple  # the variants' names, in config order
    configs: tuple  # each variant's own training config (ml_collections)
    targets: tuple  # each variant's LoRA targets
    layers: tuple  # the adapted layers' paths (tuples of keys), sorted
    ranks: tuple  # ranks[k][i]: variant k's rank on layers[i] (0: not adapted)
    scales: tuple  # scales[k][i]: variant k's alpha / rank on layers[i] (0: not adapted)
    union: tuple  # the stacked structure's targets: one per layer, its largest rank, scale 1

    @property
    def size(self) -> int:
        return len(self.names)

    def seed(self, k: int) -> int:
        return int(self.configs[k].seed)


def from_config(cfg, dit_cfg: DiTConfig) -> Sweep | None:
    """The sweep of training config `cfg` on a DiT of `dit_cfg`, or None when it trains one LoRA."""
    variants = sweep_variants(cfg)
    if not variants:
        return None
    names = tuple(n for n, _ in variants)
    targets, adapted = [], []
    for name, vcfg in variants:
        ts = lora_lib.targets_from_config(vcfg.lora.to_dict())
        if not ts:
            raise ValueError(f"sweep variant {name!r} has no LoRA target with rank > 0")
        targets.append(ts)
        tree = abstract_variables(dit_cfg, ts)["lora"]
        adapted.append({path: lora_lib.find_target(ts, "/".join(path)) for path, _ in lora_lib.layers_of(tree)})
    layers = tuple(sorted({p for a in adapted for p in a}))
    union = []
    for path in layers:
        used = [(names[k], a[path]) for k, a in enumerate(adapted) if path in a]
        dropouts = {t.dropout for _, t in used}
        if len(dropouts) > 1:
            who = ", ".join(f"{n} {t.dropout:g}" for n, t in used)
            raise ValueError(f"sweep: the variants adapting {'/'.join(path)} differ in LoRA dropout ({who}); the "
                             f"variants of one sweep must share the dropout of a layer")
        rank = max(t.rank for _, t in used)
        union.append(lora_lib.LoraTarget(f"^{'/'.join(path)}$", rank=rank, alpha=float(rank), dropout=dropouts.pop()))
    ranks = tuple(tuple(a[p].rank if p in a else 0 for p in layers) for a in adapted)
    scales = tuple(tuple(a[p].scale if p in a else 0.0 for p in layers) for a in adapted)
    return Sweep(names, tuple(c for _, c in variants), tuple(targets), layers, ranks, scales, tuple(union))


# ----------------------------------------------------------------------------- the stacked structure

def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def unpad(sweep: Sweep, k: int, stacked) -> dict:
    """Variant k's own LoRA tree (its layers, its ranks) out of the stacked tree [K, ...]."""
    return lora_lib.variant_of(stacked, k, sweep.targets[k])


def effective(sweep: Sweep, stacked) -> dict:
    """The stacked tree with each variant's alpha / rank folded into `a` (what the scale-1 stacked
    model adds is then each variant's own adapter); the scales are constants of the trace."""
    out = {}
    for i, path in enumerate(sweep.layers):
        node = _get(stacked, path)
        s = jnp.asarray([sc[i] for sc in sweep.scales], jnp.float32)
        a = node["a"]
        _set(out, path, {"a": a * s.reshape((-1,) + (1,) * (a.ndim - 1)).astype(a.dtype), "b": node["b"]})
    return out


def stack(sweep: Sweep, loras) -> dict:
    """The K variants' own LoRA trees -> one stacked tree [K, ...], zero-padded to the structure
    (models/lora.py `stack_padded`, as evaluation stacks LoRAs)."""
    out = {}
    for i, path in enumerate(sweep.layers):
        own = [(_get(lo, path)["a"], _get(lo, path)["b"]) if sweep.ranks[k][i] else None for k, lo in enumerate(loras)]
        a, b = lora_lib.stack_padded(own, sweep.union[i].rank)
        _set(out, path, {"a": a, "b": b})
    return out


# ----------------------------------------------------------------------------- training

def model_of(sweep: Sweep, dit_cfg: DiTConfig) -> MochiDiT:
    """The DiT carrying the stacked structure (scale 1 per layer; applied per variant under vmap)."""
    return MochiDiT(dit_cfg, sweep.union)


def optimizers(sweep: Sweep) -> list:
    return [training.make_optimizer(c.optim) for c in sweep.configs]


def init_state(sweep: Sweep, dit_cfg: DiTConfig, opts, run_seed: int, sharding) -> dict:
    """The initial sweep state, each variant's LoRA initialised exactly as a run of it alone would
    (training.init_state with its seed), then padded and stacked."""
    own, keys = [], []
    for k in range(sweep.size):
        key = jax.random.PRNGKey(sweep.seed(k))
        own.append(training.init_lora(MochiDiT(dit_cfg, sweep.targets[k]), jax.random.fold_in(key, 1)))
        keys.append(jax.random.fold_in(key, 2))
    lora = stack(sweep, own)
    opt = [opts[k].init(jax.tree_util.tree_map(lambda x: x[k], lora)) for k in range(sweep.size)]
    state = {"step": jnp.zeros((), jnp.int32), "lora": lora, "opt": opt, "rng": jnp.stack(keys),
             "noise_rng": jax.random.fold_in(jax.random.PRNGKey(run_seed), 2)}
    return jax.device_put(state, sharding)


def abstract_state(sweep: Sweep, model: MochiDiT, opts) -> dict:
    """The sweep's train state as ShapeDtypeStructs (nothing allocated), as `init_state` makes it."""
    one = abstract_variables(model.cfg, model.lora_targets)["lora"]
    key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    return {"step": jax.ShapeDtypeStruct((), jnp.int32),
            "lora": jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct((sweep.size, *x.shape), x.dtype), one),
            "opt": [jax.eval_shape(o.init, one) for o in opts],
            "rng": jax.ShapeDtypeStruct((sweep.size, *key.shape), key.dtype), "noise_rng": key}


def make_step(sweep: Sweep, model: MochiDiT, opts, formulation: str, caption_dropout: float, mesh=None,
              shardings=None, draw_sigma=training.uniform_sigma):
    """step(state, params, batch) -> (state, metrics with a leading K axis: loss, grad_norm, finite),
    jitted like training.make_train_step. A variant whose loss or gradients are not finite keeps its
    LoRA and optimizer state for this step; the others step on."""
    def step(state, params, batch):
        t = state["step"]
        noise = training.draw_noise(jax.random.fold_in(state["noise_rng"], t), batch, caption_dropout, draw_sigma)
        # each variant's LoRA-dropout key, as training.draw_noise derives it from the variant's own rng
        lora_keys = jax.vmap(lambda r: training.draw_noise(jax.random.fold_in(r, t), batch)["lora_rng"])(
            state["rng"])

        def loss_of(stacked, keys):  # the sum of independent losses: each variant's gradient is its own
            per = jax.vmap(lambda lo, key, mask: training.flow_loss(
                model, params, lo, {**batch, "t5_mask": mask}, {**noise, "lora_rng": key}, formulation))(
                effective(sweep, stacked), keys, per_variant_mask(batch["t5_mask"], sweep.size))
            return jnp.sum(per), per

        (_, losses), grads = jax.value_and_grad(loss_of, has_aux=True)(state["lora"], lora_keys)
        new_lora, new_opt, norms, finite = [], [], [], []
        for k, opt in enumerate(opts):
            lo = jax.tree_util.tree_map(lambda x: x[k], state["lora"])
            g = jax.tree_util.tree_map(lambda x: x[k], grads)
            gnorm = optax.tree.norm(g)
            ok = jnp.isfinite(losses[k]) & jnp.isfinite(gnorm)

            def apply(_, lo=lo, g=g, opt=opt, o=state["opt"][k]):
                updates, o = opt.update(g, o, lo)
                return optax.apply_updates(lo, updates), o

            lo, o = jax.lax.cond(ok, apply, lambda _, lo=lo, o=state["opt"][k]: (lo, o), None)
            new_lora.append(lo)
            new_opt.append(o)
            norms.append(gnorm)
            finite.append(ok)
        lora = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *new_lora)
        new = {"step": t + 1, "lora": lora, "opt": new_opt, "rng": state["rng"], "noise_rng": state["noise_rng"]}
        return new, {"loss": losses, "grad_norm": jnp.stack(norms), "finite": jnp.stack(finite)}

    return training.jit_step(step, mesh, shardings)


def shardings(sweep: Sweep, model: MochiDiT, opts, mesh) -> dict:
    """training.train_shardings for the sweep: the base, batch and replicated ones as for one LoRA; the
    stacked factors like the kernels they adapt with the variant axis replicated (every device holds
    every variant's slice of a factor), each optimizer state like one variant's factors."""
    base = training.train_shardings(model, opts[0], mesh)
    one = base["state"]["lora"]
    rep = base["replicated"]
    stacked = sharding_lib.stacked(one)
    lora_one = abstract_variables(model.cfg, model.lora_targets)["lora"]
    opt = [sharding_lib.like_tree_shardings(jax.eval_shape(o.init, lora_one), lora_one, one, rep) for o in opts]
    return {**base, "state": {"step": rep, "lora": stacked, "opt": opt, "rng": rep, "noise_rng": rep}}


def validation_loss_fn(sweep: Sweep, model: MochiDiT, formulation: str):
    """loss_fn(params, stacked, batch, noise) -> [K] held-out losses (training.validation_loss's
    argument), jitted."""
    def loss_fn(params, stacked, batch, noise):
        return jax.vmap(lambda lo, mask: training.flow_loss(model, params, lo, {**batch, "t5_mask": mask}, noise,
                                                            formulation))(
            effective(sweep, stacked), per_variant_mask(batch["t5_mask"], sweep.size))
    return jax.jit(loss_fn)


def per_variant(sweep: Sweep, values: dict) -> dict:
    """{name: [K] values} -> {'variant/<variant>/<name>': value}."""
    out = {}
    for k, variant in enumerate(sweep.names):
        for name, v in values.items():
            out[f"variant/{variant}/{name}"] = float(np.asarray(v)[k])
    return out


# ----------------------------------------------------------------------------- one LoRA or a sweep

@dataclasses.dataclass
class Parts:
    """What a training config trains on a mesh: one LoRA (lib/training.py) or a sweep (`sweep` set)."""
    sweep: Sweep | None
    targets: tuple  # the model's LoRA targets (a sweep's: its stacked structure's)
    model: MochiDiT
    optimizer: object  # an optax optimizer; a sweep's: one per variant
    shardings: dict  # training.train_shardings' layout
    step: object  # step(state, params, batch) -> (state, metrics), `.jitted` on a mesh
    mesh: object = None

    def abstract_state(self) -> dict:
        """The train state as ShapeDtypeStructs (nothing allocated)."""
        if self.sweep is not None:
            return abstract_state(self.sweep, self.model, self.optimizer)
        lora = abstract_variables(self.model.cfg, self.targets)["lora"]
        return {"step": jax.ShapeDtypeStruct((), jnp.int32), "lora": lora,
                "opt": jax.eval_shape(self.optimizer.init, lora), "rng": jax.eval_shape(lambda: jax.random.PRNGKey(0))}

    def program(self, batch_size: int, latent, text_tokens: int) -> Program:
        """The training step as the trainer runs it (lib/program.py): the jitted step on the train
        state (donated), the frozen weights and a batch of `batch_size` cached clips of latent shape
        `latent` [12, t, h, w] with `text_tokens` T5 tokens, each in the trainer's shardings."""
        cfg, sh, f32 = self.model.cfg, self.shardings, jnp.float32
        state = abstract(self.abstract_state(), sh["state"])
        params = abstract(abstract_variables(cfg, self.targets)["params"], sh["params"])
        b = batch_size
        batch = abstract({"mean": jax.ShapeDtypeStruct((b, *latent), f32),
                          "logvar": jax.ShapeDtypeStruct((b, *latent), f32),
                          "t5_feats": jax.ShapeDtypeStruct((b, text_tokens, cfg.t5_dim), f32),
                          "t5_mask": jax.ShapeDtypeStruct((b, text_tokens), jnp.bool_)}, sh["batch"])
        return Program("train step", self.step.jitted, (state, params, batch),
                       {"frozen weights": params, "train state (donated)": state, "batch": batch},
                       mesh=self.mesh, layout=mesh_layout(self.mesh), remat=cfg.remat_groups or cfg.remat)


def training_parts(cfg, dit_cfg: DiTConfig, mesh) -> Parts:
    """The model, optimizer(s), shardings and jitted step of training config `cfg` (configs/lora.py)
    for a DiT of `dit_cfg` on `mesh`: the trainer's and the fit check's one way to build them."""
    sweep = from_config(cfg, dit_cfg)
    if sweep is None:
        targets = lora_lib.targets_from_config(cfg.lora.to_dict())
        if not targets:
            raise ValueError("no LoRA targets with rank > 0 in config.lora")
        model, optimizer = MochiDiT(dit_cfg, targets), training.make_optimizer(cfg.optim)
        sh = training.train_shardings(model, optimizer, mesh)
        step = training.make_train_step(model, optimizer, cfg.loss.formulation, cfg.loss.caption_dropout, mesh, sh,
                                        training.sigma_sampler(cfg.loss))
    else:
        targets, model, optimizer = sweep.union, model_of(sweep, dit_cfg), optimizers(sweep)
        sh = shardings(sweep, model, optimizer, mesh)
        step = make_step(sweep, model, optimizer, cfg.loss.formulation, cfg.loss.caption_dropout, mesh, sh,
                         training.sigma_sampler(cfg.loss))
    return Parts(sweep, targets, model, optimizer, sh, step, mesh)
