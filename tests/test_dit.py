"""DiT parity with diffusers.MochiTransformer3DModel, scan vs unrolled, remat, dtypes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_ref import (PARITY_CONFIGS, make_reference, our_config, random_inputs, reference_forward, rel_l2,
                     write_both_layouts)
from mochi_jax import checkpoints as convert
from mochi_jax.models.dit import MochiDiT, stack_unrolled
from mochi_jax.checkpoints import load_dit


@pytest.fixture(scope="module", params=sorted(PARITY_CONFIGS))
def converted(request, tmp_path_factory):
    """A random reference model of one config, converted from both layouts."""
    cfg = our_config(request.param)
    model = make_reference(cfg, seed=len(request.param))
    root = tmp_path_factory.mktemp(request.param)
    diff_dir, genmo_file = write_both_layouts(model, root)
    out = {}
    for layout, src in (("diffusers", diff_dir), ("genmo", genmo_file)):
        path, _ = convert.convert_dit(src, root / f"ours_{layout}", dtype="float32", progress=False)
        out[layout] = path
    return request.param, cfg, model, out


@pytest.mark.parametrize("layout", ["diffusers", "genmo"])
def test_parity_with_diffusers(converted, layout):
    name, cfg, model, paths = converted
    loaded_cfg, params = load_dit(paths[layout], compute_dtype="float32", remat="none")
    assert loaded_cfg.depth == cfg.depth and loaded_cfg.width == cfg.width
    assert loaded_cfg.text_width == cfg.text_width and loaded_cfg.num_heads == cfg.num_heads
    # batch 2 with different numbers of valid text tokens; non-square latents; 2 and 3 latent frames
    for frames, h, w, valid in ((2, 6, 10, (3, 8)), (3, 8, 4, (1, 5))):
        inp = random_inputs(cfg, frames=frames, h=h, w=w, valid=valid, seed=frames)
        ours = MochiDiT(loaded_cfg).apply({"params": params}, *inp)
        ref = reference_forward(model, *inp)
        assert ours.shape == ref.shape
        assert rel_l2(ours, ref) <= 1e-5, (name, layout, frames)


def test_both_layouts_convert_identically(converted):
    _, _, _, paths = converted
    _, a = load_dit(paths["diffusers"])
    _, b = load_dit(paths["genmo"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_scan_equals_unrolled():
    cfg = our_config("h3d8")
    inp = random_inputs(cfg)
    unrolled = dataclasses.replace(cfg, scan_layers=False)
    params = MochiDiT(unrolled).init(jax.random.PRNGKey(0), *inp)["params"]
    assert "blocks_0" in params and "blocks" not in params
    stacked = stack_unrolled(params, cfg.depth)
    assert stacked["blocks"]["attn"]["qkv_x"]["kernel"].shape[0] == cfg.depth - 1
    a = MochiDiT(unrolled).apply({"params": params}, *inp)
    b = MochiDiT(cfg).apply({"params": stacked}, *inp)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch", "offload_dots"])
def test_remat_policies_change_nothing(policy):
    cfg = our_config("h2d16")
    inp = random_inputs(cfg)
    params = MochiDiT(cfg).init(jax.random.PRNGKey(1), *inp)["params"]

    def loss(p, c):
        return jnp.mean(MochiDiT(c).apply({"params": p}, *inp) ** 2)

    step = jax.jit(jax.value_and_grad(loss), static_argnums=1)  # one compile per config, not one per op
    v0, g0 = step(params, cfg)
    v1, g1 = step(params, dataclasses.replace(cfg, remat=policy))
    np.testing.assert_allclose(v0, v1, rtol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g0, g1)


def test_unknown_remat_policy_and_attention_are_errors():
    cfg = our_config("h2d16")
    inp = random_inputs(cfg)
    with pytest.raises(ValueError, match="remat policy"):
        MochiDiT(dataclasses.replace(cfg, remat="sometimes")).init(jax.random.PRNGKey(0), *inp)
    with pytest.raises(ValueError, match="attention implementation"):
        MochiDiT(dataclasses.replace(cfg, attention="magic")).init(jax.random.PRNGKey(0), *inp)


@pytest.mark.slow
def test_bf16_weights_and_compute_track_fp32(converted):
    name, cfg, model, paths = converted
    c32, p32 = load_dit(paths["genmo"], compute_dtype="float32", remat="none")
    c16, p16 = load_dit(paths["genmo"], dtype="bfloat16", compute_dtype="bfloat16", remat="full")
    assert c16.param_dtype == "bfloat16"
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(p16))
    inp = random_inputs(cfg)
    a = MochiDiT(c32).apply({"params": p32}, *inp)
    b = MochiDiT(c16).apply({"params": p16}, *inp)
    assert b.dtype == jnp.float32
    assert rel_l2(b, a) < 5e-2, name


def test_bad_latent_shape_is_a_clear_error():
    cfg = our_config("h2d16")
    lat, feats, mask, t = random_inputs(cfg, h=5)
    with pytest.raises(ValueError, match="divisible by 2"):
        MochiDiT(cfg).init(jax.random.PRNGKey(0), lat, feats, mask, t)


@pytest.mark.slow
def test_remat_groups_equal_one_policy_for_params_and_lora():
    from mochi_jax.models import lora as lora_lib

    cfg = our_config("h3d8")  # depth 4: three stacked blocks
    inp = random_inputs(cfg)
    targets = lora_lib.targets_from_config(lora_lib.REFERENCE_TARGETS)
    v = MochiDiT(cfg, targets).init(jax.random.PRNGKey(1), *inp)
    lora = jax.tree_util.tree_map(lambda x: x + 0.1, v["lora"])

    def loss(p, lo, c):
        return jnp.mean(MochiDiT(c, targets).apply({"params": p, "lora": lo}, *inp) ** 2)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
    v0, g0 = step(v["params"], lora, cfg)
    grouped = dataclasses.replace(cfg, remat="full", remat_groups="dots:1,full:1,offload_dots:1")
    v1, g1 = step(v["params"], lora, grouped)
    np.testing.assert_allclose(v0, v1, rtol=1e-5)
    errs = jax.tree_util.tree_leaves(jax.tree_util.tree_map(rel_l2, g1, g0))
    assert max(errs) < 1e-5, max(errs)
    with pytest.raises(ValueError, match="sum to 2"):
        MochiDiT(dataclasses.replace(cfg, remat_groups="full:2"), targets).apply(
            {"params": v["params"], "lora": lora}, *inp)
    with pytest.raises(ValueError, match="unknown remat policy 'fast'"):
        MochiDiT(dataclasses.replace(cfg, remat_groups="fast:3"), targets).apply(
            {"params": v["params"], "lora": lora}, *inp)
    with pytest.raises(ValueError, match="policy:count"):
        MochiDiT(dataclasses.replace(cfg, remat_groups="full"), targets).apply(
            {"params": v["params"], "lora": lora}, *inp)
    # name-based policies (checkpoint names on the block's activations) compute the same numbers
    for policy, groups in [("save:qkv+proj", ""), ("save:attn+mlp_in+mlp_out", ""), ("full", "save:qkv:2,dots:1")]:
        named = dataclasses.replace(cfg, remat=policy, remat_groups=groups)
        v2, g2 = step(v["params"], lora, named)
        np.testing.assert_allclose(v0, v2, rtol=1e-5)
        errs = jax.tree_util.tree_leaves(jax.tree_util.tree_map(rel_l2, g2, g0))
        assert max(errs) < 1e-5, (policy, groups, max(errs))
    with pytest.raises(ValueError, match="save:<names>"):
        MochiDiT(dataclasses.replace(cfg, remat="save:everything"), targets).apply(
            {"params": v["params"], "lora": lora}, *inp)


@pytest.mark.slow
def test_remat_groups_trade_memory_between_policies():
    """Compiled temp memory of the LoRA gradient: full < dots:2,full:2 < dots, and the name-based
    save:qkv+proj between full and dots; splitting the blocks into groups of one policy costs no copy of
    their weights (each scan step reads its block from the whole stack)."""
    from mochi_jax.models import lora as lora_lib
    from mochi_jax.models.dit import DiTConfig, abstract_variables

    cfg = DiTConfig(depth=5, num_heads=4, head_dim=16, text_width=32, t5_dim=32, time_embed_dim=32,
                    param_dtype="float32", compute_dtype="float32")
    targets = lora_lib.targets_from_config(lora_lib.REFERENCE_TARGETS)
    v = abstract_variables(cfg, targets)
    args = (jax.ShapeDtypeStruct((1, 12, 4, 16, 16), jnp.float32), jax.ShapeDtypeStruct((1, 16, 32), jnp.float32),
            jax.ShapeDtypeStruct((1, 16), bool), jax.ShapeDtypeStruct((1,), jnp.float32))
    temp = {}
    for name, kw in [("full", dict(remat="full")), ("dots", dict(remat="dots")),
                     ("groups", dict(remat="full", remat_groups="dots:2,full:2")),
                     ("named", dict(remat="save:qkv+proj")), ("split", dict(remat="full", remat_groups="full:2,full:2"))]:
        c = dataclasses.replace(cfg, **kw)
        grad = jax.jit(jax.grad(lambda lo, p, *a: jnp.mean(MochiDiT(c, targets).apply({"params": p, "lora": lo}, *a) ** 2)))
        temp[name] = grad.lower(v["lora"], v["params"], *args).compile().memory_analysis().temp_size_in_bytes
    assert temp["full"] < temp["groups"] < temp["dots"], temp
    assert temp["full"] < temp["named"] < temp["dots"], temp
    stacked = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(v["params"]["blocks"]))
    assert temp["split"] - temp["full"] < stacked / 4, (temp, stacked)
