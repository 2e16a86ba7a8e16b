"""Mochi VAE: parity with diffusers' AutoencoderKLMochi, both checkpoint layouts, tiling, input checks.

Tolerances (fp32): parity and temporal chunking, relative L2 <= 1e-5. Spatial tiling is an
approximation (GroupNorm statistics per tile, receptive field cut at tile borders): on these
tiny random models with tiles of 32 px overlapping by 16 px it stays within TILE_TOL relative L2
and never worse than 1.1x diffusers' own tiled encode/decode at the same tile settings.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mochi_jax.checkpoints.orbax_io import read_metadata
from mochi_jax.checkpoints.safetensors_io import ConversionError
from mochi_jax.checkpoints.vae import convert_vae, load_vae, read_vae
from mochi_jax.models import vae as V
from vae_ref import (make_reference, our_config, params_from_state_dict, rel_l2, state_dict_np, write_diffusers,
                     write_genmo)

PARITY_TOL = 1e-5
TILE_TOL = 0.45

encode = jax.jit(V.encode, static_argnames=("cfg", "tiled"))
decode = jax.jit(V.decode, static_argnames=("cfg", "tiled"))


@functools.lru_cache(maxsize=None)
def reference(name):
    cfg = our_config(name)
    model = make_reference(cfg, seed=len(name))
    return cfg, model, state_dict_np(model)


def _same_tree(a, b):
    la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (p, x), (_, y) in zip(la, lb):
        assert x.shape == y.shape and np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(p)


def _np(tree):  # one jit cache entry whatever produced the arrays
    return jax.tree_util.tree_map(np.asarray, tree)


# Both layouts of both configs go through an orbax checkpoint (convert_vae + load_vae); read_vae
# (the same validation and leaves, straight into memory) must give the same tree.
@pytest.mark.parametrize("name", ["c32", "c64"])
def test_parity_both_layouts(tmp_path, name):
    cfg, model, sd = reference(name)
    write_diffusers(sd, tmp_path / "hf", shards=2 if name == "c32" else 1)  # sharded, with an index
    write_genmo(sd, cfg.layers_per_block, tmp_path / "genmo")
    loaded = {}
    for layout, src in (("diffusers", tmp_path / "hf"), ("genmo", tmp_path / "genmo")):
        out, conv_cfg = convert_vae(src, tmp_path / f"out_{layout}", dtype="float32", progress=False)
        assert conv_cfg.arch_dict() == cfg.arch_dict()  # inferred from shapes, layer counts, attention flags
        meta = read_metadata(out)
        assert (meta["model"], meta["source_layout"]) == ("mochi_vae", layout)
        loaded[layout] = load_vae(out)
    cfg_d, params_d = loaded["diffusers"]
    cfg_g, params_g = loaded["genmo"]
    assert cfg_d == cfg_g == cfg
    _same_tree(_np(read_vae(tmp_path / "genmo")[1]), _np(params_g))
    params_d, params_g = _np(params_d), _np(params_g)
    _same_tree(params_d, params_g)

    g = torch.Generator().manual_seed(3)
    for frames, h, w in ((7, 16, 24), (13, 24, 16)):  # non-square, both frame counts
        x = torch.rand(2, 3, frames, h, w, generator=g) * 2 - 1
        z = torch.randn(1, 12, (frames - 1) // 6 + 1, h // 8, w // 8, generator=g)
        with torch.no_grad():
            post = model.encode(x).latent_dist
            ref_pix = model.decode(z).sample.numpy()
        for layout, params in (("diffusers", params_d), ("genmo", params_g)):
            mean, logvar = encode(params, jnp.asarray(x.numpy()), cfg=cfg)
            pix = decode(params, jnp.asarray(z.numpy()), cfg=cfg)
            assert mean.shape == logvar.shape == tuple(post.mean.shape)
            assert pix.shape == ref_pix.shape == (1, 3, frames, h, w)
            errs = (rel_l2(mean, post.mean.numpy()), rel_l2(logvar, post.logvar.numpy()), rel_l2(pix, ref_pix))
            print(f"{name} from {layout}, T={frames} {h}x{w}: mean {errs[0]:.2e} logvar {errs[1]:.2e} "
                  f"decode {errs[2]:.2e}")
            assert max(errs) <= PARITY_TOL, errs


def test_tiled_decode():
    cfg, model, sd = reference("c32")
    params = params_from_state_dict(cfg, sd)
    z = np.random.default_rng(0).standard_normal((1, 12, 3, 6, 7)).astype(np.float32)  # 13 x 48 x 56 pixels
    full = decode(params, z, cfg=cfg)

    # time only (one spatial tile, chunks of 2 + padding): exact
    time_only = dataclasses.replace(cfg, tile_size=(64, 64), tile_overlap=(16, 16), chunk_frames=2)
    chunked = decode(params, z, cfg=time_only, tiled=True)
    assert rel_l2(chunked, full) <= PARITY_TOL

    # 2 x 3 spatial tiles of 32 px (overlap >= 16 px) and 2 temporal chunks: approximate
    tiled_cfg = dataclasses.replace(cfg, tile_size=(32, 32), tile_overlap=(16, 16), chunk_frames=2)
    tiled = decode(params, z, cfg=tiled_cfg, tiled=True)
    model.enable_tiling(32, 32, 16, 16)
    with torch.no_grad():
        ref_tiled = model.decode(torch.from_numpy(z)).sample.numpy()
    model.disable_tiling()
    err, ref_err = rel_l2(tiled, full), rel_l2(ref_tiled, full)
    print(f"tiled decode rel L2 {err:.3f} (diffusers' tiling: {ref_err:.3f})")
    assert tiled.shape == full.shape
    assert err <= TILE_TOL and err <= 1.1 * ref_err


def test_tiled_encode():
    cfg, model, sd = reference("c32")
    params = params_from_state_dict(cfg, sd)
    x = np.random.default_rng(1).uniform(-1, 1, (1, 3, 7, 48, 56)).astype(np.float32)
    mean, logvar = encode(params, x, cfg=cfg)
    tiled_cfg = dataclasses.replace(cfg, tile_size=(32, 32), tile_overlap=(16, 16))
    tmean, tlogvar = encode(params, x, cfg=tiled_cfg, tiled=True)
    model.enable_tiling(32, 32, 16, 16)
    with torch.no_grad():
        ref = model.encode(torch.from_numpy(x)).latent_dist
    model.disable_tiling()
    err = max(rel_l2(tmean, mean), rel_l2(tlogvar, logvar))
    ref_err = max(rel_l2(ref.mean.numpy(), mean), rel_l2(ref.logvar.numpy(), logvar))
    print(f"tiled encode rel L2 {err:.3f} (diffusers' tiling: {ref_err:.3f})")
    assert err <= TILE_TOL and err <= 1.1 * ref_err


def test_tile_layout():
    for size, tile, overlap in ((6, 4, 2), (7, 4, 2), (60, 32, 8), (106, 32, 8), (84, 32, 8), (33, 32, 0)):
        starts = V.tile_starts(size, tile, overlap)
        assert starts[0] == 0 and starts[-1] + tile == size
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))  # overlaps >= overlap
        w = V.tile_weights(starts, tile, 8)
        assert (w > 0).all() and w.max() == 1
    assert (len(V.tile_starts(6, 4, 2)), len(V.tile_starts(7, 4, 2))) == (2, 3)  # the tiled tests' grid


def test_bad_input_says_what_is_expected():
    cfg = our_config("c32")
    params = {"encoder": {}, "decoder": {}}  # never reached: shapes are checked first
    bad_pixels = {
        (1, 3, 8, 16, 16): r"T = 6k\+1 frames.*got T = 8",
        (1, 4, 7, 16, 16): r"got 4 channels.*expected 3",
        (1, 3, 7, 20, 16): r"H, W divisible by 8.*20 x 16",
        (1, 3, 7, 16): r"\[B, 3, T, H, W\]",
    }
    for shape, msg in bad_pixels.items():
        with pytest.raises(ValueError, match=msg):
            V.encode(params, jnp.zeros(shape), cfg=cfg)
    with pytest.raises(ValueError, match=r"\[B, 12, t, h, w\].*got 11 channels"):
        V.decode(params, jnp.zeros((1, 11, 2, 2, 2)), cfg=cfg)
    with pytest.raises(ValueError, match=r"6k\+1"):
        V.latent_frames(8)


def test_conversion_refuses_missing_and_misshaped_keys(tmp_path):
    from safetensors.numpy import save_file

    cfg, _, sd = reference("c32")
    missing_key = "decoder.up_blocks.1.resnets.0.conv2.conv.bias"
    bad_key = "encoder.down_blocks.0.attentions.0.to_k.weight"
    anchor_key = "decoder.conv_in.weight"  # read to infer the architecture
    for case in ("missing", "misshaped", "anchor"):
        broken = dict(sd)
        if case == "missing":
            del broken[missing_key]
        elif case == "misshaped":
            broken[bad_key] = np.zeros((32, 31), np.float32)
        else:
            broken[anchor_key] = np.zeros((64, 12), np.float32)
        write_diffusers(broken, tmp_path / case)
        with pytest.raises(ConversionError) as e:
            convert_vae(tmp_path / case, tmp_path / f"{case}_out", dtype="float32", progress=False)
        msg = str(e.value)
        if case == "missing":
            assert missing_key in msg
        elif case == "anchor":
            assert anchor_key in msg and "(64, 12)" in msg
        else:
            assert bad_key in msg and "(32, 31)" in msg and "(32, 32)" in msg and "diffusion_pytorch_model" in msg
        assert not (tmp_path / f"{case}_out").exists()  # nothing written

    # genmo layout: a key of decoder.safetensors misnamed -> missing and unexpected, both named
    write_genmo(sd, cfg.layers_per_block, tmp_path / "g")
    from safetensors.numpy import load_file

    dec = load_file(str(tmp_path / "g" / "decoder.safetensors"))
    dec["blocks.2.blocks.0.stack.5.biass"] = dec.pop("blocks.2.blocks.0.stack.5.bias")
    save_file(dec, str(tmp_path / "g" / "decoder.safetensors"))
    with pytest.raises(ConversionError, match=r"missing.*'decoder\.blocks\.2\.blocks\.0\.stack\.5\.bias'.*\n"
                                              r".*unexpected.*stack\.5\.biass' in \S*decoder\.safetensors"):
        convert_vae(tmp_path / "g", tmp_path / "g_out", progress=False)
    assert not (tmp_path / "g_out").exists()


def test_released_defaults_and_latent_normalisation():
    from diffusers import AutoencoderKLMochi

    defaults = {k: p.default for k, p in inspect.signature(AutoencoderKLMochi.__init__).parameters.items()}
    cfg = V.VAEConfig()
    assert cfg.encoder_channels == tuple(defaults["encoder_block_out_channels"])
    assert cfg.decoder_channels == tuple(defaults["decoder_block_out_channels"])
    assert cfg.layers_per_block == tuple(defaults["layers_per_block"])
    assert cfg.temporal_expansions == tuple(defaults["temporal_expansions"])
    assert cfg.spatial_expansions == tuple(defaults["spatial_expansions"])
    assert cfg.encoder_attention == tuple(defaults["add_attention_block"])
    assert cfg.latent_channels == defaults["latent_channels"] and cfg.in_channels == defaults["in_channels"]
    np.testing.assert_array_equal(V.LATENTS_MEAN, np.float32(defaults["latents_mean"]))
    np.testing.assert_array_equal(V.LATENTS_STD, np.float32(defaults["latents_std"]))

    shapes = jax.eval_shape(lambda: V.init(jax.random.PRNGKey(0), cfg))  # no memory used
    assert round(V.param_count(shapes["encoder"]) / 1e6, 1) == 97.2
    assert round(V.param_count(shapes["decoder"]) / 1e6, 1) == 362.5

    assert [V.latent_frames(n) for n in (1, 7, 13, 37, 85, 163)] == [1, 2, 3, 7, 15, 28]
    assert [V.pixel_frames(n) for n in (1, 2, 3, 7, 15, 28)] == [1, 7, 13, 37, 85, 163]

    z = jax.random.normal(jax.random.PRNGKey(0), (2, 12, 3, 4, 5))
    d = V.vae_to_dit(z)
    np.testing.assert_allclose(np.asarray(d[:, 7]), (np.asarray(z[:, 7]) - V.LATENTS_MEAN[7]) / V.LATENTS_STD[7],
                               rtol=1e-6)
    np.testing.assert_allclose(np.asarray(V.dit_to_vae(d)), np.asarray(z), atol=1e-6)
