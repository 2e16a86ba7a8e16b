"""The training step: the loss against a PyTorch re-computation (both formulations), LoRA-only
gradients and optimizer state, frozen base, skipped non-finite steps, overfitting two clips."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import dit_ref
from mochi_jax.lib import training
from mochi_jax.checkpoints import convert_dit
from mochi_jax.models import lora as lora_lib
from mochi_jax.models import vae as vae_lib
from mochi_jax.models.dit import MochiDiT
from mochi_jax.checkpoints import load_dit

ONE = jax.sharding.SingleDeviceSharding(jax.devices()[0])
TARGETS = lora_lib.targets_from_config({k: dict(v, rank=4, alpha=8.0) for k, v in lora_lib.REFERENCE_TARGETS.items()})


def _optim(**kw):
    o = dict(lr=1e-3, weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8, warmup_steps=0, schedule="constant",
             decay_steps=100, grad_clip=0.0, grad_accum=1)
    return ml_collections.ConfigDict({**o, **kw})


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    cfg = dit_ref.our_config("h2d16")
    ref = dit_ref.make_reference(cfg, seed=4)
    d = tmp_path_factory.mktemp("base")
    _, genmo = dit_ref.write_both_layouts(ref, d)
    convert_dit(genmo, d / "ours", dtype="float32", progress=False)
    cfg, params = load_dit(d / "ours", compute_dtype="float32", remat="none")
    return cfg, params, ref


def _batch(cfg, seed, b=2, t=2, h=4, w=6, L=8):
    rng = np.random.default_rng(seed)
    mask = np.zeros((b, L), bool)
    for i in range(b):
        mask[i, :2 + 3 * i] = True
    return {"mean": rng.standard_normal((b, 12, t, h, w)).astype(np.float32),
            "logvar": rng.uniform(-4.0, -1.0, (b, 12, t, h, w)).astype(np.float32),
            "t5_feats": rng.standard_normal((b, L, cfg.t5_dim)).astype(np.float32),
            "t5_mask": mask}


@pytest.mark.slow
@pytest.mark.parametrize("formulation", ["normalized", "reference"])
def test_loss_equals_pytorch_recomputation(base, formulation):
    cfg, params, ref = base
    model = MochiDiT(cfg, TARGETS)
    lora = training.init_lora(model, jax.random.PRNGKey(0))  # b = 0: the model is the reference's
    batch = _batch(cfg, seed=1)
    noise = training.draw_noise(jax.random.PRNGKey(7), batch, caption_dropout=0.5)
    noise["drop"] = jnp.array([True, False])  # one caption dropped, one kept
    ours = float(training.flow_loss(model, params, lora, batch, noise, formulation))

    n, eps, sigma = (np.asarray(noise[k], np.float64) for k in ("n", "eps", "sigma"))
    z = batch["mean"] + np.exp(batch["logvar"] / 2) * n
    M = vae_lib.LATENTS_MEAN.astype(np.float64).reshape(1, -1, 1, 1, 1)
    S = vae_lib.LATENTS_STD.astype(np.float64).reshape(1, -1, 1, 1, 1)
    if formulation == "normalized":
        z = (z - M) / S
    s = sigma.reshape(-1, 1, 1, 1, 1)
    z_sigma = (1 - s) * z + s * eps
    target = z - eps if formulation == "normalized" else (z - eps - M) / S
    feats, mask = batch["t5_feats"].copy(), batch["t5_mask"].copy()
    feats[0], mask[0] = 0.0, False
    pred = dit_ref.reference_forward(ref, z_sigma.astype(np.float32), feats, mask,
                                     (1000 * (1 - sigma)).astype(np.float32))
    theirs = float(np.mean((pred.astype(np.float64) - target) ** 2))
    assert abs(ours - theirs) / theirs < 1e-5, (ours, theirs)


def test_step_trains_only_the_lora(base):
    cfg, params, _ = base
    model = MochiDiT(cfg, TARGETS)
    opt = training.make_optimizer(_optim())
    state = training.init_state(model, opt, 0, ONE)
    lora = state["lora"]
    before = jax.tree_util.tree_map(np.array, params)
    lora0 = jax.tree_util.tree_map(np.array, lora)
    step = training.make_train_step(model, opt, "normalized", 0.1)
    for i in range(3):
        state, out = step(state, params, _batch(cfg, seed=i))
        assert bool(out["finite"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, before, jax.tree_util.tree_map(np.array, params))
    moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), state["lora"], lora0)
    assert all(v > 0 for v in jax.tree_util.tree_leaves(moved))
    lora_shapes = {x.shape for x in jax.tree_util.tree_leaves(lora)}
    big = [x.shape for x in jax.tree_util.tree_leaves(state["opt"]) if x.size > 1]
    assert big and all(s in lora_shapes for s in big)  # Adam moments of the LoRA factors only
    assert sum(x.size for x in jax.tree_util.tree_leaves(state["opt"]) if x.size > 1) == 2 * lora_lib.count(lora)
    assert int(state["step"]) == 3


def test_non_finite_step_is_not_applied(base):
    cfg, params, _ = base
    model = MochiDiT(cfg, TARGETS)
    opt = training.make_optimizer(_optim())
    state = training.init_state(model, opt, 0, ONE)
    snapshot = jax.tree_util.tree_map(np.array, state)
    batch = _batch(cfg, seed=0)
    batch["mean"][0, 0, 0, 0, 0] = np.nan
    state, out = training.make_train_step(model, opt, "normalized", 0.0)(state, params, batch)
    assert not bool(out["finite"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, snapshot["lora"], jax.tree_util.tree_map(np.array, state["lora"]))
    jax.tree_util.tree_map(np.testing.assert_array_equal, snapshot["opt"], jax.tree_util.tree_map(np.array, state["opt"]))
    assert int(state["step"]) == 1


def test_schedule_and_accumulation():
    o = _optim(warmup_steps=10, schedule="cosine", decay_steps=110, lr=2e-4)
    s = training.lr_schedule(o)
    assert float(s(0)) == 0.0 and abs(float(s(5)) - 1e-4) < 1e-10 and abs(float(s(10)) - 2e-4) < 1e-10
    assert abs(float(s(60)) - 1e-4) < 1e-9 and float(s(110)) < 1e-12
    # two micro-batches of one == one batch of two (the loss is a mean over the batch)
    g = {"w": jnp.ones((3,))}
    acc = training.make_optimizer(_optim(grad_accum=2))
    st = acc.init(g)
    u1, st = acc.update({"w": jnp.array([1.0, 2.0, 3.0])}, st, g)
    assert not np.any(np.asarray(u1["w"]))  # no update until the second micro-batch
    u2, st = acc.update({"w": jnp.array([3.0, 2.0, 1.0])}, st, g)
    one = training.make_optimizer(_optim())
    u, _ = one.update({"w": jnp.array([2.0, 2.0, 2.0])}, one.init(g), g)
    np.testing.assert_allclose(u2["w"], u["w"], rtol=1e-6)


@pytest.mark.slow
def test_overfits_two_clips(base):
    """LoRA alone, on a random base, halves the loss on two fixed clips (loss at fixed noise draws)."""
    cfg, params, _ = base
    targets = lora_lib.targets_from_config({
        "attn": dict(pattern=r"attn/(qkv|proj)_[xy]$", rank=8, alpha=8.0),
        "mlp": dict(pattern=r"mlp_x/w2$", rank=8, alpha=8.0),
        "final": dict(pattern=r"final_layer/linear$", rank=8, alpha=8.0)})
    model = MochiDiT(cfg, targets)
    opt = training.make_optimizer(_optim(lr=1e-2, weight_decay=0.0))
    state = training.init_state(model, opt, 0, ONE)
    clips = [_batch(cfg, seed=10 + i, b=1) for i in range(2)]
    for c in clips:
        c["logvar"][:] = -8.0  # a sharp posterior: the clip is (almost) one latent

    @jax.jit
    def eval_loss(lora):
        total = 0.0
        for i, c in enumerate(clips):
            for j in range(8):
                noise = training.draw_noise(jax.random.PRNGKey(100 * i + j), c)
                total += training.flow_loss(model, params, lora, c, noise)
        return total / 16

    start = float(eval_loss(state["lora"]))
    step = training.make_train_step(model, opt, "normalized", 0.0)
    for i in range(200):
        state, _ = step(state, params, clips[i % 2])
    end = float(eval_loss(state["lora"]))
    print(f"overfit: fixed-noise loss {start:.3f} -> {end:.3f}")
    assert end < 0.5 * start, (start, end)


def test_each_sigma_sampling_draws_its_distribution():
    def draw(**loss):
        cfg = ml_collections.ConfigDict(dict(sigma_sampling="uniform", logit_mean=0.0, logit_std=1.0, sigma_shift=3.0))
        cfg.update(loss)
        return np.asarray(training.sigma_sampler(cfg)(jax.random.PRNGKey(0), 200_000))

    u = draw()
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.005 and abs(np.median(u) - 0.5) < 0.005
    ln = draw(sigma_sampling="logit_normal", logit_mean=0.5, logit_std=1.2)
    logits = np.log(ln / (1 - ln))
    assert abs(logits.mean() - 0.5) < 0.01 and abs(logits.std() - 1.2) < 0.01
    sh = draw(sigma_sampling="shifted", sigma_shift=3.0)
    assert abs(np.median(sh) - 0.75) < 0.005  # 3 * 0.5 / (1 + 2 * 0.5)
    assert abs(np.mean(sh > 0.5) - 0.75) < 0.005  # P(sigma > 1/2) = P(u > 1/4)
    np.testing.assert_array_equal(draw(sigma_sampling="shifted", sigma_shift=1.0), u)  # shift 1 is uniform
    with pytest.raises(ValueError, match="--config.loss.sigma_sampling='cosine': choose one of uniform, logit_normal"):
        draw(sigma_sampling="cosine")
    # the trainer's default draws what draw_noise always drew
    batch = {"mean": np.zeros((4, 12, 1, 2, 2), np.float32)}
    np.testing.assert_array_equal(training.draw_noise(jax.random.PRNGKey(3), batch)["sigma"],
                                  jax.random.uniform(jax.random.split(jax.random.PRNGKey(3), 5)[2], (4,)))
