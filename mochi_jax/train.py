"""LoRA fine-tuning of the Mochi DiT: `python -m mochi_jax.train --config=configs/lora.py[:demo]`.

Read top to bottom: the loss (`flow_loss`), the optimizer (`make_optimizer`), one training step
(`make_train_step`), then the loop (`train`): load the frozen base, initialise or restore the LoRA
state, and for every step take a batch, update, log, checkpoint, render validation videos.

The train state is one pytree {step, lora, opt, rng}; the base weights are a separate, frozen
input of the step, so no gradient, optimizer slot or fp32 copy of them ever exists. A checkpoint
(orbax, atomic, keep-last-K) holds the state and the data loader's position; a run killed at
any point and restarted continues bit for bit where its last checkpoint left off.
"""

from __future__ import annotations

import functools
import json
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mochi_jax import sharding as sharding_lib
from mochi_jax.models import lora as lora_lib
from mochi_jax.models import vae as vae_lib
from mochi_jax.models.dit import MochiDiT, abstract_variables, dummy_inputs

# ----------------------------------------------------------------------------- loss


def draw_noise(rng, batch, caption_dropout: float = 0.0) -> dict:
    """The step's randomness: posterior noise n, flow noise eps, sigma ~ U(0, 1) per sample, which
    captions to drop, and the key of LoRA dropout."""
    k_post, k_eps, k_sigma, k_drop, k_lora = jax.random.split(rng, 5)
    shape = batch["mean"].shape
    return {"n": jax.random.normal(k_post, shape, jnp.float32),
            "eps": jax.random.normal(k_eps, shape, jnp.float32),
            "sigma": jax.random.uniform(k_sigma, shape[:1], jnp.float32),
            "drop": jax.random.uniform(k_drop, shape[:1]) < caption_dropout,
            "lora_rng": k_lora}


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

    drop = noise["drop"]
    feats = jnp.where(drop[:, None, None], 0.0, batch["t5_feats"].astype(jnp.float32))
    mask = batch["t5_mask"].astype(bool) & ~drop[:, None]
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


def make_train_step(model, optimizer, formulation: str, caption_dropout: float, mesh=None, shardings=None):
    """step(state, params, batch) -> (state, metrics), jitted. A step whose loss or gradients are not
    finite is not applied (state unchanged except the step counter) and reported in metrics['finite'].

    With a `mesh` and `shardings` (from `train_shardings`), the step is one SPMD program over the
    mesh: its inputs and outputs keep their shardings and the model's activation annotations
    apply. `step.jitted` is the underlying jax.jit (lower it inside `sharding.activate(mesh)`)."""

    def step(state, params, batch):
        noise = draw_noise(jax.random.fold_in(state["rng"], state["step"]), batch, caption_dropout)
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
    """NamedShardings of everything the step touches: 'params' (frozen base: FSDP over 'embed'),
    'state' (LoRA factors like the kernels they adapt, optimizer moments like the LoRA, step and rng
    replicated), 'batch' (leading axis over data x fsdp) and 'replicated'."""
    from jax.sharding import NamedSharding, PartitionSpec

    rep = NamedSharding(mesh, PartitionSpec())
    abstract = abstract_variables(model.cfg, model.lora_targets)
    params, lora = abstract["params"], abstract["lora"]
    lora_sh = sharding_lib.param_shardings(sharding_lib.dit_logical_axes(lora, lora=True), lora, mesh)
    opt = jax.eval_shape(optimizer.init, lora)
    return {
        "params": sharding_lib.param_shardings(sharding_lib.dit_logical_axes(params), params, mesh),
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


# ----------------------------------------------------------------------------- the loop


class _Metrics:
    """metrics.jsonl (one JSON object per line) and tensorboard event files in the run directory."""

    def __init__(self, run_dir: Path, main: bool = True):
        self.file = self.tb = None
        if not main:  # multi-host: process 0 writes
            return
        self.file = open(run_dir / "metrics.jsonl", "a")
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:  # pragma: no cover - tensorboardX is a dependency
            self.tb = None

    def write(self, step: int, values: dict):
        if self.file is None:
            return
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def close(self):
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def _log(msg: str):
    if jax.process_index() == 0:  # multi-host: one voice
        print(f"[mochi_jax.train {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _prepare_demo(cfg):
    """The demo makes its own tiny models, clips and cache on first use."""
    from mochi_jax import prepare

    if (Path(cfg.cache) / "manifest.json").exists():
        return
    _log(f"demo: making tiny random models, synthetic clips and the cache under {cfg.demo_root}")
    prepare.prepare(cfg.prepare)


def _validation_inputs(cfg):
    """T5 features of the validation prompts and the negative prompt, computed once (T5 is then freed)."""
    from mochi_jax.text import TextEncoder

    v = cfg.validation
    text = TextEncoder.load(v.t5, v.tokenizer)
    n = len(v.prompts)
    feats, mask = text(list(v.prompts) + [v.negative_prompt] * n)
    return (feats[:n], mask[:n]), (feats[n:], mask[n:])


def _render_validation(cfg, dit_cfg, params, lora, targets, vae, text, step: int, run_dir: Path):
    """Render the validation prompts with fixed seeds; returns [(path, uint8 frames)]."""
    from mochi_jax import sampling
    from mochi_jax.video import write_mp4

    v = cfg.validation
    cond, uncond = text
    seeds = [v.seed + i for i in range(len(v.prompts))]
    noise = sampling.initial_noise(seeds, sampling.latent_shape(v.num_frames, v.height, v.width))
    z = sampling.denoise(dit_cfg, params, noise, cond, uncond, sampling.sigma_schedule(v.steps), v.guidance,
                         lora=(lora, targets))
    frames = sampling.decode_frames(vae[0], vae[1], z, tiled=v.tiled_decode)
    out = []
    for i, clip in enumerate(frames):
        path = run_dir / "samples" / f"step{step:06d}_prompt{i}_seed{seeds[i]}.mp4"
        if jax.process_index() == 0:
            write_mp4(path, clip, fps=v.fps)
        out.append((str(path), clip))
    return out


def validation_loss(loss_fn, params, lora, clips, sigmas, seed: int) -> dict:
    """The flow loss of held-out clips at fixed sigmas with fixed noise (the posterior noise too) and
    no caption dropout: a deterministic curve that tells learning from overfitting. `loss_fn(params,
    lora, batch, noise)`: the jitted `flow_loss`, built once per run. Returns {'val_loss': mean,
    'val_loss/sigma_0.1': ..., ...}."""
    per_sigma = {float(s): [] for s in sigmas}
    for i, clip in enumerate(clips):
        batch = {k: np.asarray(v)[None] for k, v in clip.items()}
        key = jax.random.fold_in(jax.random.PRNGKey(seed), i)
        base = draw_noise(key, batch)  # the same n and eps at every sigma and every validation round
        for s in per_sigma:
            noise = {"n": base["n"], "eps": base["eps"], "sigma": jnp.full((1,), s, jnp.float32),
                     "drop": jnp.zeros((1,), bool), "lora_rng": None}
            per_sigma[s].append(float(loss_fn(params, lora, batch, noise)))
    out = {f"val_loss/sigma_{s:g}": float(np.mean(v)) for s, v in per_sigma.items()}
    out["val_loss"] = float(np.mean(list(out.values())))
    return out


def _abstract(tree):
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def train(cfg) -> Path:
    """Run (or resume) the training described by `cfg` (configs/lora.py); returns the run directory."""
    import orbax.checkpoint as ocp

    from mochi_jax.cache import Cache
    from mochi_jax.data import make_loader
    from mochi_jax.lora_io import save_diffusers, save_genmo
    from mochi_jax.weights import dit_config, load_dit

    if cfg.distributed.enabled:
        d = cfg.distributed
        jax.distributed.initialize(coordinator_address=d.coordinator or None,
                                   num_processes=d.num_processes or None,
                                   process_id=d.process_id if d.process_id >= 0 else None)
    if cfg.demo_root:
        _prepare_demo(cfg)
    run_dir = Path(cfg.run_dir).absolute()
    run_dir.mkdir(parents=True, exist_ok=True)
    main = jax.process_index() == 0
    if main:
        (run_dir / "config.json").write_text(cfg.to_json(indent=2))

    mesh = sharding_lib.make_mesh(cfg.mesh.to_dict())
    n_proc, n_batch = jax.process_count(), mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.batch_size % n_batch or cfg.batch_size % n_proc:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by data x fsdp = {n_batch} (mesh "
                         f"{dict(mesh.shape)}) and by the {n_proc} processes; change --config.batch_size or "
                         f"--config.mesh.*")
    cache = Cache(cfg.cache)
    v = cfg.validation
    if not 0 <= v.holdout < len(cache):
        raise ValueError(f"validation.holdout = {v.holdout} must leave training clips (the cache has {len(cache)})")
    n_train = len(cache) - v.holdout  # the last `holdout` clips (by name) are held out
    loader = make_loader(cache, cfg.batch_size // n_proc, cfg.seed, num_clips=n_train)
    heldout = [cache[i] for i in range(n_train, len(cache))]

    m = cfg.model
    targets = lora_lib.targets_from_config(cfg.lora.to_dict())
    if not targets:
        raise ValueError("no LoRA targets with rank > 0 in config.lora")
    overrides = dict(compute_dtype=m.compute_dtype, attention=m.attention, remat=m.remat, remat_groups=m.remat_groups)
    # the config first (from the checkpoint's metadata), so the weights load straight into their shards
    dit_cfg = dit_config(m.dit, param_dtype=m.param_dtype, **overrides)
    model = MochiDiT(dit_cfg, targets)
    optimizer = make_optimizer(cfg.optim)
    shardings = train_shardings(model, optimizer, mesh)
    render = v.every > 0 and len(v.prompts) > 0
    text = _validation_inputs(cfg) if render else None  # T5 comes and goes before the DiT is loaded
    _, params = load_dit(m.dit, dtype=m.param_dtype, shardings=shardings["params"], **overrides)
    state = init_state(model, optimizer, cfg.seed, shardings["state"])
    _log(f"mesh {dict(mesh.shape)} over {mesh.devices.size} devices, {n_proc} process(es); base: {m.dit} "
         f"(depth {dit_cfg.depth}, width {dit_cfg.width}, {m.param_dtype}); LoRA: "
         f"{lora_lib.count(state['lora']):,} trainable parameters on "
         + ", ".join(f"{t.pattern} r{t.rank} a{t.alpha:g}" for t in targets))

    mngr = ocp.CheckpointManager(run_dir / "checkpoints", options=ocp.CheckpointManagerOptions(
        max_to_keep=cfg.checkpoint.keep, create=True))
    latest = mngr.latest_step() if cfg.resume else None
    if latest is not None:
        restored = mngr.restore(latest, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(state)), data=ocp.args.JsonRestore()))
        state = restored["state"]
        loader.set_state(restored["data"])
        _log(f"resumed from {run_dir / 'checkpoints'} at step {latest}")
    elif mngr.latest_step() is not None:
        raise ValueError(f"{run_dir / 'checkpoints'} already holds checkpoints; set --config.resume=True "
                         f"to continue them or choose another run_dir")

    step_fn = make_train_step(model, optimizer, cfg.loss.formulation, cfg.loss.caption_dropout, mesh, shardings)
    schedule = lr_schedule(cfg.optim)
    metrics = _Metrics(run_dir, main)
    if render:
        from mochi_jax.convert import load_vae

        vae = load_vae(v.vae, compute_dtype=m.compute_dtype)
        scorer = None
        if v.clip_checkpoint:
            from mochi_jax.evaluate import Scorer

            scorer = Scorer(v.clip_checkpoint, v.clip_tokenizer)
            prompt_emb = scorer.text(list(v.prompts))

    val_loss_fn = jax.jit(functools.partial(flow_loss, model, formulation=cfg.loss.formulation))

    def validate(step):
        vals = {}
        if heldout:
            vals.update(validation_loss(val_loss_fn, params, state["lora"], heldout, v.loss_sigmas, cfg.seed))
        if render:
            videos = _render_validation(cfg, dit_cfg, params, state["lora"], targets, vae, text, step, run_dir)
            _log(f"step {step}: validation videos {', '.join(p for p, _ in videos)}")
            if scorer is not None:
                from mochi_jax.evaluate import video_metrics

                per = [video_metrics(f, scorer.images(f), prompt_emb[i]) for i, (_, f) in enumerate(videos)]
                vals.update({f"val/{k}": float(np.mean([p[k] for p in per])) for k in per[0]})
        if vals:
            metrics.write(step, vals)
            _log(f"step {step}: " + ", ".join(f"{k} {x:.4f}" for k, x in vals.items()))

    def save(step):
        # every process has taken the same number of batches, so process 0's loader position
        # (the one orbax writes) is every process's position
        mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               data=ocp.args.JsonSave(loader.get_state())), force=True)

    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    old_handler = signal.signal(signal.SIGTERM, on_signal)
    step = int(state["step"])
    bad, t_last, s_last = 0, time.time(), step
    try:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc="training", unit="step", dynamic_ncols=True,
                   disable=not main)
        while step < cfg.steps:
            batch = {k: jax.make_array_from_process_local_data(shardings["batch"][k], x)
                     for k, x in next(loader).items()}
            state, out = step_fn(state, params, batch)
            step += 1
            bar.update(1)
            if not bool(out["finite"]):
                bad += 1
                _log(f"step {step}: non-finite loss {float(out['loss'])} / grad norm {float(out['grad_norm'])}; "
                     f"update skipped ({bad} in a row)")
                metrics.write(step, {"nonfinite": 1})
                if bad >= cfg.max_bad_steps:
                    raise FloatingPointError(
                        f"{bad} non-finite losses in a row up to step {step}; stopping. The last checkpoint "
                        f"({mngr.latest_step()}) is intact; lower optim.lr or check the data.")
            else:
                bad = 0
            if step % cfg.log_every == 0 or step == cfg.steps:
                now = time.time()
                rate = (step - s_last) / max(now - t_last, 1e-9)
                t_last, s_last = now, step
                vals = {"loss": float(out["loss"]), "grad_norm": float(out["grad_norm"]),
                        "lr": float(schedule(max(step - 1, 0) // cfg.optim.grad_accum)),
                        "steps_per_s": rate, "examples_per_s": rate * cfg.batch_size}
                metrics.write(step, vals)
                bar.set_postfix(loss=f"{vals['loss']:.4f}", lr=f"{vals['lr']:.2e}")
            if step % cfg.checkpoint.every == 0 or step == cfg.steps or stop["signal"] is not None:
                save(step)
            if v.every > 0 and (step % v.every == 0 or step == cfg.steps):
                validate(step)
            if stop["signal"] is not None:
                mngr.wait_until_finished()
                _log(f"signal {stop['signal']}: saved step {step}; resume with the same command")
                return run_dir
        bar.close()
    finally:
        mngr.wait_until_finished()
        metrics.close()
        signal.signal(signal.SIGTERM, old_handler)

    from jax.experimental import multihost_utils

    lora = multihost_utils.process_allgather(state["lora"], tiled=True)  # whole factors on every host
    if main:
        save_genmo(run_dir / "lora.safetensors", lora, targets)
        save_diffusers(run_dir / "lora_diffusers.safetensors", lora, targets)
    _log(f"done: {step} steps; LoRA written to {run_dir / 'lora.safetensors'} (genmo / ComfyUI) and "
         f"{run_dir / 'lora_diffusers.safetensors'} (diffusers)")
    return run_dir


def load_run_lora(run_dir, step: int | None = None):
    """(factors, targets) of a training run: the LoRA of checkpoint `step` (default: the latest one),
    with the targets of the run's config.json."""
    import orbax.checkpoint as ocp

    run_dir = Path(run_dir).absolute()
    config = run_dir / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{run_dir} is not a training run directory (no config.json)")
    targets = lora_lib.targets_from_config(json.loads(config.read_text())["lora"])
    mngr = ocp.CheckpointManager(run_dir / "checkpoints", item_handlers={"state": ocp.StandardCheckpointHandler()})
    step = mngr.latest_step() if step is None else step
    if step is None or step not in mngr.all_steps():
        raise FileNotFoundError(f"{run_dir / 'checkpoints'}: no checkpoint"
                                + (f" at step {step}; have {mngr.all_steps()}" if step is not None else ""))
    # onto this process's first device, whatever mesh (or hosts) wrote it
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                                    mngr.item_metadata(step)["state"])
    state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    return jax.tree_util.tree_map(np.asarray, state["lora"]), targets


def main():
    from mochi_jax import cli

    cli.run("configs/lora.py", train, "training configuration: configs/lora.py[:preset]")


if __name__ == "__main__":
    main()
