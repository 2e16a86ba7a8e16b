"""Training teaches what sampling shows: a LoRA trained by the library's training step on two clips
with two captions makes the library's sampler move each caption's samples towards that caption's
clip, and the sampler's step evaluates the very velocity the loss trains. That needs the loss
(z_sigma = (1 - sigma) z + sigma eps, target z - eps, timestep 1000 (1 - sigma), in the normalised
latent space) and the sampler (sigma from 1 to 0, z <- z + (sigma - sigma_next) v, timestep
1000 (1 - sigma), in the same space) to agree: a change to either side that breaks that (a flipped
target or step sign, a reversed timestep, another space, a sampler that drops the LoRA) fails here.
Two controls show that the measurements do fail: a sampler stepping the wrong way, and a sampler
whose model sees timestep 1000 sigma.

Set-up (all deterministic):
  base     a tiny DiT (3 blocks, 2 heads x 32: width 64, so the frozen patch embedder and final
           layer can carry all 48 values of a 2x2x12 patch), random weights as the demo's models
  data     two "clips" in the DiT's latent space [12, 2, 4, 4] (a smooth pattern per channel),
           cached as the VAE-space posterior mean (`vae.dit_to_vae`) with a vanishing variance
           (logvar -100), so the loss sees the mean only; two captions of random T5 features
  LoRA     rank 32 on the attention (qkv, out) and the visual MLP of every block: layers the LoRA
           files can hold
  training `sweep.training_parts` (the trainer's way to build model, optimizer and step) with the
           LoRA config's defaults (loss formulation, AdamW) at lr 1e-2, 500 steps, both clips in
           every batch, no caption dropout
  sampling `sampling.denoise` with guidance 1 (the conditional branch alone), one video per
           (caption, noise seed)

Samples: f = 1 - |x_lora - clip| / |x_base - clip| after the default 64-step flow, x_base the sample
of the untrained LoRA (b = 0: exactly the base model) from the same noise. Measured (CPU, float32;
SEED 0-3, noise seeds 11-16): trained f 0.33-0.48, every sample nearer its own clip than the other
caption's (|x - own| 17-29, |x - other| 31-43); with the sampler's step sign flipped (control) f
-0.17 to -0.33; training against the flipped target eps - z instead (by hand) f -0.17 to -0.35
(SEED 0). Thresholds: f > 0.2 for every sample, f < 0 for every sample of the control.

One step: at sigma 0.1, 0.25, 0.75 and 0.9 (both sides of 0.5, where the two timestep conventions
meet), one step of `denoise` from z = (1 - sigma) clip + sigma eps to sigma 0 gives the sampler's
denoised estimate x0 = z + sigma v; `training.flow_loss` given x0 as the clip and the noise that
makes the same z has the target (x0 - z) / sigma = v, so it is the mean square of v_loss - v.
Measured (SEED 0-3, noise seeds 11-14), for every sample and sigma: |v_loss - v| / |v| <= 6e-7 for
the base and the trained LoRA; the trained x0 nearer the clip than the base's (|x0 - clip| ratio
0.54-0.70); with the sampler's model seeing timestep 1000 sigma (control) 0.27-0.55; with the step
sign flipped 2. Thresholds: < 1e-3, and > 0.1 for every sample and sigma of the control.

Why the samples alone cannot see the timestep: with one clip per caption the ideal velocity points at
the clip at every sigma, only its size depends on sigma, and a flow towards one point ends there
whatever the timing. Reversing the sampler's timestep leaves f within 0.01 of the trained f (0.32-0.43,
SEED 0-3; SEED 0 likewise with LoRA targets on the modulation layers mod_x, mod_y), and its x0 is
still nearer the clip than the base's (ratio <= 0.70): only the comparison with the loss shows it.
(By hand, on the demo models with a rank-32 LoRA trained 4000 steps, 71-75 % was closed. Guidance 6
with caption dropout 0.1 gives a similar f (SEED 0: 0.32-0.41), but base and LoRA samples both
overshoot (|x - own| ~40 instead of ~23), so the test samples without guidance.)

Not exercised here: the 'reference' loss formulation, and guidance > 1 (the unconditional branch).

Runs in ~25 s on 2 CPU cores (most of it compiling the train step, the sampler step and the loss).
"""

import functools
import time

import jax
import ml_collections
import numpy as np
import pytest

from mochi_jax.configs import common
from mochi_jax.configs import lora as lora_config
from mochi_jax.lib import sampling, sweep, training
from mochi_jax.models import lora as lora_lib
from mochi_jax.models import sharding as sharding_lib
from mochi_jax.models import vae as vae_lib
from mochi_jax.models.dit import DiTConfig, MochiDiT, abstract_variables

SEED = 0
STEPS = 500
RANK = 32
LATENT = sampling.latent_shape(7, 32, 32)  # [12, 2, 4, 4]: 7 frames of 32 x 32 pixels
TOKENS = 8
CAPTIONS = [0, 1, 0, 1]  # the sampled videos: caption A, B, A, B ...
NOISE_SEEDS = [11, 12, 13, 14]  # ... each from its own noise
MIN_CLOSED = 0.2  # measured 0.33-0.48 over set-up and noise seeds
SIGMAS = (0.1, 0.25, 0.75, 0.9)  # where the one-step check looks: not 0.5, where 1000 sigma = 1000 (1 - sigma)
MAX_APART = 1e-3  # |v_loss - v_sampler| / |v_sampler| at SIGMAS: measured <= 6e-7
MIN_REVERSED_APART = 0.1  # the same, the sampler's model seeing timestep 1000 sigma: measured 0.27-0.55


def _base_weights(cfg: DiTConfig, seed: int) -> dict:
    """Random frozen weights like the demo's DiT (mochi_jax/demo/models.py `random_like`), drawn with
    NumPy: normal / sqrt(fan in) kernels, unit norm weights, zero biases, small rope frequencies."""
    rng = np.random.default_rng(seed)

    def one(path, s):
        names = [k.key for k in path]
        if names == ["pos_frequencies"]:
            return 0.1 * rng.standard_normal(s.shape, np.float32)
        if len(s.shape) >= 2:
            fan_in = int(np.prod(s.shape[:-1])) // (s.shape[0] if names[0] == "blocks" else 1)
            return rng.standard_normal(s.shape, np.float32) / np.float32(np.sqrt(fan_in))
        return (np.ones if names[-1] in ("scale", "weight") else np.zeros)(s.shape, np.float32)

    return jax.tree_util.tree_map_with_path(one, abstract_variables(cfg)["params"])


def _clips_and_captions(cfg: DiTConfig, seed: int):
    """Two clips in DiT space [2, 12, t, h, w] (per channel: an offset plus a diagonal ramp, constant in
    time) and two captions (random T5 features [2, L, D], masks of 5 and 7 tokens)."""
    rng = np.random.default_rng(seed)
    c, t, h, w = LATENT
    ramp = np.add.outer(np.linspace(-1, 1, h), np.linspace(-1, 1, w))  # [h, w]
    amp = rng.standard_normal((2, c, 2, 1, 1, 1))
    clips = np.broadcast_to(amp[:, :, 0] + amp[:, :, 1] * ramp, (2, *LATENT)).astype(np.float32)
    feats = rng.standard_normal((2, TOKENS, cfg.t5_dim)).astype(np.float32)
    mask = np.arange(TOKENS)[None] < np.array([[5], [7]])
    return clips, (feats, mask)


def _config() -> ml_collections.ConfigDict:
    cfg = lora_config.get_config()
    cfg.seed = SEED
    cfg.lora = ml_collections.ConfigDict({
        **{k: dict(v, rank=RANK, alpha=float(RANK)) for k, v in lora_lib.REFERENCE_TARGETS.items()},
        "mlp": dict(pattern=r"mlp_x/w[12]$", rank=RANK, alpha=float(RANK), dropout=0.0)})
    cfg.loss.caption_dropout = 0.0  # sampled with guidance 1: the unconditional branch is not used
    cfg.optim.update(dict(lr=1e-2, warmup_steps=10, decay_steps=STEPS))
    return cfg


@pytest.fixture(scope="module")
def trained():
    """Train the LoRA (as the trainer builds its step, on a one-device mesh) and return what sampling needs."""
    t0 = time.time()
    dit_cfg = DiTConfig(**dict(common.DEMO_DIT, head_dim=32), param_dtype="float32", compute_dtype="float32",
                        remat="none")
    cfg = _config()
    parts = sweep.training_parts(cfg, dit_cfg, sharding_lib.make_mesh({}, jax.devices()[:1]))
    params = jax.device_put(_base_weights(dit_cfg, SEED), parts.shardings["params"])
    clips, (feats, mask) = _clips_and_captions(dit_cfg, SEED)
    batch = {"mean": np.asarray(vae_lib.dit_to_vae(clips)),  # what prepare caches: the VAE-space posterior
             "logvar": np.full(clips.shape, -100.0, np.float32),  # std e^-50: z is the mean, to float32 precision
             "t5_feats": feats, "t5_mask": mask}
    batch = jax.device_put(batch, parts.shardings["batch"])
    state = training.init_state(parts.model, parts.optimizer, cfg.seed, parts.shardings["state"])
    untrained = jax.device_get(state["lora"])  # b = 0: the base model exactly
    losses = []
    for _ in range(STEPS):
        state, out = parts.step(state, params, batch)
        losses.append(out["loss"])
    losses = np.asarray(jax.device_get(losses))
    assert np.all(np.isfinite(losses))
    print(f"\ntrained {STEPS} steps in {time.time() - t0:.1f}s: loss {losses[:10].mean():.3f} -> "
          f"{losses[-20:].mean():.3f}")
    return dict(dit_cfg=dit_cfg, params=params, targets=parts.targets, lora=state["lora"], untrained=untrained,
                clips=clips, feats=feats, mask=mask,
                loss=jax.jit(functools.partial(training.flow_loss, parts.model, formulation=cfg.loss.formulation)))


def _sample(run, lora) -> np.ndarray:
    """One video per (caption, noise seed) of CAPTIONS / NOISE_SEEDS: the library's sampler, default
    schedule, conditional branch alone."""
    rows = np.asarray(CAPTIONS)
    noise = sampling.initial_noise(NOISE_SEEDS, LATENT)
    z = sampling.denoise(run["dit_cfg"], run["params"], noise, (run["feats"][rows], run["mask"][rows]), None,
                         sampling.sigma_schedule(), guidance=1.0, lora=(lora, run["targets"]))
    return np.asarray(z)


def _distances(x, clips):
    """|x_i - clip_j| for every sample i and clip j: [samples, 2]."""
    return np.linalg.norm((x[:, None] - clips[None]).reshape(len(x), len(clips), -1), axis=-1)


def _closed(run):
    """f per sample, and the distances of the trained samples to both clips."""
    own = np.asarray(CAPTIONS)
    d_lora = _distances(_sample(run, run["lora"]), run["clips"])
    d_base = _distances(_sample(run, run["untrained"]), run["clips"])
    idx = np.arange(len(own))
    return 1.0 - d_lora[idx, own] / d_base[idx, own], d_lora[idx, own], d_lora[idx, 1 - own]


def test_samples_move_to_the_captions_clip(trained):
    f, own, other = _closed(trained)
    print(f"closed f {np.round(f, 3)}; |x - own clip| {np.round(own, 1)}, |x - other clip| {np.round(other, 1)}")
    assert np.all(f > MIN_CLOSED), f
    assert np.all(own < other), (own, other)


def test_flipped_sampler_moves_away(trained, monkeypatch):
    """The control: the same measurement through a sampler whose step has the wrong sign, z - (sigma -
    sigma_next) v (denoise's real compiled step, its result reflected about z), fails the test above."""
    real = sampling.jitted_step

    def flipped(params, lora, z, *args, **kwargs):
        return 2.0 * z - real(params, lora, z, *args, **kwargs)

    monkeypatch.setattr(sampling, "jitted_step", flipped)
    f, _, _ = _closed(trained)
    print(f"flipped sampler: closed f {np.round(f, 3)}")
    assert np.all(f < 0.0), f


def _one_step(run, lora):
    """One step of the sampler against the loss, per sigma of SIGMAS and sample of CAPTIONS / NOISE_SEEDS
    (noise eps): from z = (1 - sigma) clip + sigma eps, one step of `denoise` to sigma 0 gives the sampler's
    denoised estimate x0 = z + sigma v. Given x0 as the clip and eps' = (z - (1 - sigma) x0) / sigma as the
    noise, `training.flow_loss` (jitted as validation builds it) noises to the same z and its target
    x0 - eps' is (x0 - z) / sigma = v: it is the mean square difference between the loss's velocity
    and the sampler's. Returns (|x0 - clip|, |v_loss - v| / |v|), each [len(SIGMAS), samples]."""
    rows = np.asarray(CAPTIONS)
    eps = np.asarray(sampling.initial_noise(NOISE_SEEDS, LATENT), np.float64)
    clips = run["clips"][rows].astype(np.float64)
    miss, apart = [], []
    for s in SIGMAS:
        z = ((1.0 - s) * clips + s * eps).astype(np.float32)
        x0 = np.asarray(sampling.denoise(run["dit_cfg"], run["params"], z, (run["feats"][rows], run["mask"][rows]),
                                         None, np.array([s, 0.0], np.float32), guidance=1.0,
                                         lora=(lora, run["targets"])), np.float64)
        miss.append(np.linalg.norm((x0 - clips).reshape(len(rows), -1), axis=-1))
        v = (x0 - z) / s
        row = []
        for i, c in enumerate(rows):
            batch = {"mean": np.asarray(vae_lib.dit_to_vae(x0[i:i + 1].astype(np.float32))),
                     "logvar": np.full((1, *LATENT), -100.0, np.float32),
                     "t5_feats": run["feats"][c:c + 1], "t5_mask": run["mask"][c:c + 1]}
            noise = {"n": np.zeros((1, *LATENT), np.float32),
                     "eps": ((z[i:i + 1] - (1.0 - s) * x0[i:i + 1]) / s).astype(np.float32),
                     "sigma": np.full((1,), s, np.float32), "drop": np.zeros((1,), bool), "lora_rng": None}
            row.append(np.sqrt(float(run["loss"](run["params"], lora, batch, noise)) / np.mean(np.square(v[i]))))
        apart.append(row)
    return np.asarray(miss), np.asarray(apart)


def test_sampler_step_is_what_the_loss_trained(trained):
    """At sigmas on both sides of 0.5, the sampler's step uses the velocity the loss trains (the same
    model call: same timestep, same space, same sign), for the base and the trained LoRA; and training
    brought the sampler's denoised estimate nearer the clip at every sigma."""
    miss, apart = _one_step(trained, trained["lora"])
    base_miss, base_apart = _one_step(trained, trained["untrained"])
    print(f"one-step |x0 - clip| trained {np.round(miss, 1).tolist()}, base {np.round(base_miss, 1).tolist()}; "
          f"|v_loss - v| / |v| <= {max(apart.max(), base_apart.max()):.1e}")
    assert apart.max() < MAX_APART and base_apart.max() < MAX_APART, (apart, base_apart)
    assert np.all(miss < base_miss), (miss, base_miss)


class _ReversedTimestep:
    """MochiDiT as the sampler would call it with the timestep convention reversed: timestep 1000 sigma
    (it passes 1000 (1 - sigma), as the loss does)."""

    def __init__(self, cfg, targets):
        self.model = MochiDiT(cfg, targets)

    def apply(self, variables, latents, feats, mask, timestep, **kwargs):
        return self.model.apply(variables, latents, feats, mask, 1000.0 - timestep, **kwargs)


def _reversed_step(params, lora, z, feats, mask, sigma, sigma_next, guidance, *, cfg, targets, guided):
    return sampling.euler_step(cfg, targets, guided)(params, lora, z, feats, mask, sigma, sigma_next, guidance)


def test_reversed_timestep_sampler_breaks_it(trained, monkeypatch):
    """The second control: denoise's real step (sampling.euler_step, traced afresh: jitted_step's cache holds
    the real one) whose model sees timestep 1000 sigma. Its one-step estimates no longer match the loss."""
    monkeypatch.setattr(sampling, "MochiDiT", _ReversedTimestep)
    monkeypatch.setattr(sampling, "jitted_step", jax.jit(_reversed_step, static_argnames=("cfg", "targets", "guided")))
    _, apart = _one_step(trained, trained["lora"])
    print(f"reversed timestep: |v_loss - v| / |v| {np.round(apart, 3).tolist()}")
    assert apart.min() > MIN_REVERSED_APART, apart
