"""LoRA as a separate pytree: zero-B identity, parity with diffusers + PEFT, merge, gradients."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dit_ref import make_reference, our_config, random_inputs, reference_forward, rel_l2, write_both_layouts
from mochi_jax import checkpoints as convert
from mochi_jax.models import lora as lora_lib
from mochi_jax.models.dit import MochiDiT
from mochi_jax.checkpoints import load_dit


def _init(cfg, targets, inp, seed=0):
    v = MochiDiT(cfg, targets).init(jax.random.PRNGKey(seed), *inp)
    return v["params"], v.get("lora", {})


def test_reference_targets_cover_qkv_and_out_projections():
    cfg = our_config("h3d8")
    inp = random_inputs(cfg)
    targets = lora_lib.targets_from_config(lora_lib.REFERENCE_TARGETS)
    _, lora = _init(cfg, targets, inp)
    for group in ("blocks", "last_block"):
        assert set(lora[group]["attn"]) == ({"qkv_x", "qkv_y", "proj_x", "proj_y"} if group == "blocks"
                                            else {"qkv_x", "qkv_y", "proj_x"})
    a, b = lora["blocks"]["attn"]["qkv_x"]["a"], lora["blocks"]["attn"]["qkv_x"]["b"]
    assert a.shape == (cfg.depth - 1, cfg.width, 16) and b.shape == (cfg.depth - 1, 16, 3 * cfg.width)
    assert a.dtype == jnp.float32 and not np.any(b)


def test_zero_b_lora_equals_base_and_rank0_is_the_plain_model():
    cfg = our_config("h2d16")
    inp = random_inputs(cfg)
    targets = lora_lib.targets_from_config(lora_lib.REFERENCE_TARGETS)
    params, lora = _init(cfg, targets, inp)
    base = MochiDiT(cfg).apply({"params": params}, *inp)
    with_lora = MochiDiT(cfg, targets).apply({"params": params, "lora": lora}, *inp)
    np.testing.assert_array_equal(base, with_lora)

    rank0 = lora_lib.targets_from_config({k: dict(v, rank=0) for k, v in lora_lib.REFERENCE_TARGETS.items()})
    assert rank0 == ()
    assert "lora" not in MochiDiT(cfg, rank0).init(jax.random.PRNGKey(0), *inp)
    plain = jax.jit(lambda p: MochiDiT(cfg).apply({"params": p}, *inp)).lower(params).as_text()
    nomatch = (lora_lib.LoraTarget(pattern="no_such_layer$", rank=4, alpha=4.0),)
    unmatched = jax.jit(lambda p: MochiDiT(cfg, nomatch).apply({"params": p}, *inp)).lower(params).as_text()
    assert plain == unmatched


def _random_lora(lora, seed):
    leaves, tree = jax.tree_util.tree_flatten(lora)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


@pytest.mark.parametrize("name", ["h3d8", "h4d8"])
def test_lora_parity_with_diffusers_peft(name, tmp_path):
    """A PEFT adapter on the reference's visual to_q/to_k/to_v/to_out.0 equals our fused LoRA:
    qkv_x gets rank 3r with a = [A_q; A_k; A_v]^T and b = blockdiag(B_q, B_k, B_v)^T."""
    from peft import LoraConfig

    cfg = our_config(name)
    r, alpha = 2, 3.0
    model = make_reference(cfg, seed=3)
    diff_dir, _ = write_both_layouts(model, tmp_path)
    path, _ = convert.convert_dit(diff_dir, tmp_path / "ours", dtype="float32", progress=False)
    model.add_adapter(LoraConfig(r=r, lora_alpha=alpha, target_modules=r".*attn1\.(to_q|to_k|to_v|to_out\.0)$",
                                 init_lora_weights=True))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items() if "lora_" in k}

    def peft(n, mod, which):
        return sd[f"transformer_blocks.{n}.attn1.{mod}.lora_{which}.default.weight"]

    qkv, out = {"a": [], "b": []}, {"a": [], "b": []}
    w = cfg.width
    for n in range(cfg.depth):
        qkv["a"].append(np.concatenate([peft(n, f"to_{c}", "A") for c in "qkv"], axis=0).T)
        b = np.zeros((3 * r, 3 * w), np.float32)
        for i, c in enumerate("qkv"):
            b[i * r:(i + 1) * r, i * w:(i + 1) * w] = peft(n, f"to_{c}", "B").T
        qkv["b"].append(b)
        out["a"].append(peft(n, "to_out.0", "A").T)
        out["b"].append(peft(n, "to_out.0", "B").T)

    def split(d):  # first depth-1 stacked for the scan, the last separate
        return ({k: np.stack(v[:-1]) for k, v in d.items()}, {k: v[-1] for k, v in d.items()})

    (qs, ql), (os_, ol) = split(qkv), split(out)
    lora = {"blocks": {"attn": {"qkv_x": qs, "proj_x": os_}}, "last_block": {"attn": {"qkv_x": ql, "proj_x": ol}}}
    targets = (lora_lib.LoraTarget(r"attn/qkv_x$", rank=3 * r, alpha=3 * alpha),
               lora_lib.LoraTarget(r"attn/proj_x$", rank=r, alpha=alpha))
    c, params = load_dit(path, compute_dtype="float32", remat="none")
    inp = random_inputs(cfg, seed=5)
    ours = MochiDiT(c, targets).apply({"params": params, "lora": lora}, *inp)
    ref = reference_forward(model, *inp)
    base = MochiDiT(c).apply({"params": params}, *inp)
    assert rel_l2(base, ref) > 1e-2  # the adapter really changes the output
    assert rel_l2(ours, ref) <= 1e-5

    merged = lora_lib.merge(params, lora, targets)
    np.testing.assert_allclose(MochiDiT(c).apply({"params": merged}, *inp), ours, rtol=1e-5, atol=1e-5)
    restored = lora_lib.unmerge(merged, lora, targets)
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), restored, params)


@pytest.mark.slow
def test_gradients_only_for_lora_and_dropout_needs_an_rng():
    cfg = our_config("h3d8")
    inp = random_inputs(cfg)
    targets = lora_lib.targets_from_config(
        {"qkv": dict(pattern=r"attn/qkv_[xy]$", rank=4, alpha=8, dropout=0.5),
         "mlp": dict(pattern=r"mlp_x/w1$", rank=2, alpha=2)})
    params, lora = _init(cfg, targets, inp)
    lora = _random_lora(lora, 1)
    model = MochiDiT(cfg, targets)

    def loss(lo, rngs=None):
        return jnp.mean(model.apply({"params": params, "lora": lo}, *inp, rngs=rngs) ** 2)

    grads = jax.grad(loss)(lora)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(lora)
    assert set(grads["blocks"]) == {"attn", "mlp_x"}
    assert all(np.any(g) for g in jax.tree_util.tree_leaves(grads))
    # dropout only with a 'dropout' rng: deterministic without it, random with it
    assert loss(lora) == loss(lora)
    d1 = loss(lora, {"dropout": jax.random.PRNGKey(1)})
    d2 = loss(lora, {"dropout": jax.random.PRNGKey(2)})
    assert d1 != d2 and d1 != loss(lora)


def test_merge_rejects_mismatched_lora():
    cfg = our_config("h2d16")
    inp = random_inputs(cfg)
    targets = lora_lib.targets_from_config(lora_lib.REFERENCE_TARGETS)
    params, lora = _init(cfg, targets, inp)
    bad = jax.tree_util.tree_map(lambda x: x, lora)
    bad["last_block"]["attn"]["qkv_x"]["a"] = jnp.zeros((cfg.width + 1, 16))
    with pytest.raises(ValueError, match="last_block/attn/qkv_x"):
        lora_lib.merge(params, bad, targets)
    with pytest.raises(ValueError, match="matches no LoRA target"):
        lora_lib.merge(params, lora, (lora_lib.LoraTarget("qkv_x$", 16, 16),))
