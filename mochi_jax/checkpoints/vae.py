"""Mochi VAE weights: diffusers (`vae/`, AutoencoderKLMochi) or genmo original
(`encoder.safetensors` + `decoder.safetensors`) -> our pytree (mochi_jax.models.vae).

`weight_table(cfg)` lists every leaf of our tree with the tensor(s) it comes from in both
layouts and how to transform them (PyTorch [out, in] -> [in, out], conv [out, in, kt, kh, kw]
-> [kt, kh, kw, in, out], diffusers' separate q/k/v concatenated into genmo's fused qkv).

Layouts, seen through one resnet / attention of the encoder's second down block:

    ours                               diffusers (prefix encoder.)            genmo (prefix encoder.)
    encoder/down_1/conv_in             down_blocks.1.conv_in.conv              layers.{n0+2}.layers.0
    encoder/down_1/res_0/norm1         down_blocks.1.resnets.0.norm1.norm_layer layers.{n0+2}.layers.1.stack.0
    encoder/down_1/res_0/conv1         down_blocks.1.resnets.0.conv1.conv      layers.{n0+2}.layers.1.stack.2
    encoder/down_1/res_0/norm2, conv2  ...norm2.norm_layer, ...conv2.conv      ...stack.3, ...stack.5
    encoder/down_1/attn_0/norm         down_blocks.1.norms.0.norm_layer        layers.{n0+2}.layers.1.attn_block.norm
    encoder/down_1/attn_0/qkv          down_blocks.1.attentions.0.to_{q,k,v}   ...attn_block.attn.qkv (fused q|k|v)
    encoder/down_1/attn_0/out          down_blocks.1.attentions.0.to_out.0     ...attn_block.attn.out

genmo's encoder is one Sequential `layers`: 0 = proj_in (a Linear), 1..n0 = block_in resnets,
then one DownsampleBlock per down block (`layers.0` its strided conv, `layers.{1..}` resnets),
then the block_out resnets; `output_norm`, `output_proj`. Its decoder is `blocks`: `blocks.0.0`
= conv_in (1x1x1 Conv3d), `blocks.0.{1..}` = block_in resnets, `blocks.{1..3}.blocks.i` = up
block resnets with `blocks.{1..3}.proj`, `blocks.4.i` = block_out resnets; `output_proj`.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Callable

import numpy as np
import jax.numpy as jnp

from mochi_jax.checkpoints.orbax_io import Leaf, block_settings, load_model, nest, settings_config, validate, write
from mochi_jax.checkpoints.safetensors_io import ConversionError, TensorSource, need_shape
from mochi_jax.models.vae import VAEConfig


# ----------------------------------------------------------------------------- opening a source

class PrefixedSources:
    """Several TensorSources seen as one, each under a key prefix (genmo's encoder.safetensors
    and decoder.safetensors both hold e.g. `output_proj.weight`). Same interface as TensorSource."""

    def __init__(self, parts: dict[str, TensorSource], path):
        self.path = Path(path)
        self._parts = parts
        self.files = [f for s in parts.values() for f in s.files]

    def _split(self, key: str) -> tuple[TensorSource, str]:
        for prefix, src in self._parts.items():
            if key.startswith(prefix) and key[len(prefix):] in src.keys():
                return src, key[len(prefix):]
        raise KeyError(key)

    def keys(self) -> set[str]:
        return {p + k for p, s in self._parts.items() for k in s.keys()}

    def shape(self, key: str) -> tuple[int, ...]:
        src, k = self._split(key)
        return src.shape(k)

    def file_of(self, key: str) -> Path:
        src, k = self._split(key)
        return src.file_of(k)

    def get(self, key: str) -> np.ndarray:
        src, k = self._split(key)
        return src.get(k)


GENMO_FILES = ("encoder.safetensors", "decoder.safetensors")


def open_vae(path):
    """Open `path`: a diffusers repo root (uses vae/), a diffusers vae/ folder (sharded or not), a
    folder with genmo's encoder.safetensors + decoder.safetensors, or one safetensors file whose
    keys start with encoder. / decoder. (either layout). Returns (source, layout)."""
    path = Path(path)
    if path.is_dir() and (path / "vae").is_dir():
        path = path / "vae"
    if path.is_dir() and all((path / f).exists() for f in GENMO_FILES):
        src = PrefixedSources({"encoder.": TensorSource(path / GENMO_FILES[0]),
                               "decoder.": TensorSource(path / GENMO_FILES[1])}, path)
    elif path.is_file() and path.name in GENMO_FILES:
        raise ConversionError(f"{path}: a genmo VAE is converted from the folder holding both "
                              f"{GENMO_FILES[0]} and {GENMO_FILES[1]}; pass {path.parent}")
    else:
        src = TensorSource(path)
    return src, detect_layout(src)


def detect_layout(src) -> str:
    keys = src.keys()
    if any(k.startswith(("encoder.block_in.", "decoder.block_in.", "encoder.down_blocks.")) for k in keys):
        return "diffusers"
    if any(k.startswith(("encoder.layers.", "decoder.blocks.")) for k in keys):
        return "genmo"
    raise ConversionError(f"{src.path}: not a Mochi VAE checkpoint (expected diffusers keys encoder.block_in.* / "
                          f"decoder.block_in.* or genmo keys encoder.layers.* / decoder.blocks.*); "
                          f"first keys: {sorted(keys)[:5]}")


# ----------------------------------------------------------------------------- the weight table

@dataclasses.dataclass(frozen=True)
class Weight:
    """One leaf of our tree and where it comes from."""

    path: tuple[str, ...]
    kind: str  # 'vec' | 'linear' | 'conv' | 'conv1x1'
    shape: tuple[int, ...]  # PyTorch shape of the (fused) tensor
    diffusers: tuple[str, ...]  # one key, or q/k/v keys concatenated along rows
    genmo: str


def _resnet(out, path, d, g, c):
    """A resnet block: norm1, conv1, norm2, conv2 (genmo's Sequential stack.0/2/3/5)."""
    for ours, dk, gk in (("norm1", "norm1.norm_layer", "stack.0"), ("conv1", "conv1.conv", "stack.2"),
                         ("norm2", "norm2.norm_layer", "stack.3"), ("conv2", "conv2.conv", "stack.5")):
        if ours.startswith("norm"):
            out.append(Weight((*path, ours, "scale"), "vec", (c,), (f"{d}.{dk}.weight",), f"{g}.{gk}.weight"))
        else:
            out.append(Weight((*path, ours, "kernel"), "conv", (c, c, 3, 3, 3), (f"{d}.{dk}.weight",),
                              f"{g}.{gk}.weight"))
        out.append(Weight((*path, ours, "bias"), "vec", (c,), (f"{d}.{dk}.bias",), f"{g}.{gk}.bias"))


def _attention(out, path, d_block, i, g, c):
    """Norm + attention after resnet i of a diffusers block (norms.i / attentions.i), genmo g.attn_block."""
    a = f"{d_block}.attentions.{i}"
    out += [
        Weight((*path, "norm", "scale"), "vec", (c,), (f"{d_block}.norms.{i}.norm_layer.weight",),
               f"{g}.attn_block.norm.weight"),
        Weight((*path, "norm", "bias"), "vec", (c,), (f"{d_block}.norms.{i}.norm_layer.bias",),
               f"{g}.attn_block.norm.bias"),
        Weight((*path, "qkv", "kernel"), "linear", (3 * c, c), tuple(f"{a}.to_{x}.weight" for x in "qkv"),
               f"{g}.attn_block.attn.qkv.weight"),
        Weight((*path, "out", "kernel"), "linear", (c, c), (f"{a}.to_out.0.weight",),
               f"{g}.attn_block.attn.out.weight"),
        Weight((*path, "out", "bias"), "vec", (c,), (f"{a}.to_out.0.bias",), f"{g}.attn_block.attn.out.bias"),
    ]


def _stage(out, path, d, g_of, n, c, attention):
    """n resnets (+ attention) of a diffusers block `d`; g_of(i) is genmo's prefix of resnet i."""
    for i in range(n):
        _resnet(out, (*path, f"res_{i}"), f"{d}.resnets.{i}", g_of(i), c)
        if attention:
            _attention(out, (*path, f"attn_{i}"), d, i, g_of(i), c)


def weight_table(cfg: VAEConfig) -> list[Weight]:
    """Every leaf of our {'encoder', 'decoder'} tree, in a fixed order."""
    out: list[Weight] = []
    ec, dc, n, lat = cfg.encoder_channels, cfg.decoder_channels, cfg.layers_per_block, cfg.latent_channels
    nd = len(ec) - 1
    E, D = "encoder", "decoder"

    # Encoder: genmo layers.0 = proj_in, 1..n0 = block_in, then nd down blocks, then block_out.
    out += [Weight((E, "proj_in", "kernel"), "linear", (ec[0], cfg.in_channels), ("encoder.proj_in.weight",),
                   "encoder.layers.0.weight"),
            Weight((E, "proj_in", "bias"), "vec", (ec[0],), ("encoder.proj_in.bias",), "encoder.layers.0.bias")]
    _stage(out, (E, "block_in"), "encoder.block_in", lambda i: f"encoder.layers.{1 + i}", n[0], ec[0],
           cfg.encoder_attention[0])
    for j in range(nd):
        g = f"encoder.layers.{1 + n[0] + j}.layers"
        d = f"encoder.down_blocks.{j}"
        st, ss = cfg.temporal_expansions[j], cfg.spatial_expansions[j]
        out += [Weight((E, f"down_{j}", "conv_in", "kernel"), "conv", (ec[j + 1], ec[j], st, ss, ss),
                       (f"{d}.conv_in.conv.weight",), f"{g}.0.weight"),
                Weight((E, f"down_{j}", "conv_in", "bias"), "vec", (ec[j + 1],), (f"{d}.conv_in.conv.bias",),
                       f"{g}.0.bias")]
        _stage(out, (E, f"down_{j}"), d, lambda i, g=g: f"{g}.{1 + i}", n[j + 1], ec[j + 1],
               cfg.encoder_attention[j + 1])
    first_out = 1 + n[0] + nd
    _stage(out, (E, "block_out"), "encoder.block_out", lambda i: f"encoder.layers.{first_out + i}", n[-1], ec[-1],
           cfg.encoder_attention[-1])
    out += [Weight((E, "norm_out", "scale"), "vec", (ec[-1],), ("encoder.norm_out.norm_layer.weight",),
                   "encoder.output_norm.weight"),
            Weight((E, "norm_out", "bias"), "vec", (ec[-1],), ("encoder.norm_out.norm_layer.bias",),
                   "encoder.output_norm.bias"),
            Weight((E, "proj_out", "kernel"), "linear", (2 * lat, ec[-1]), ("encoder.proj_out.weight",),
                   "encoder.output_proj.weight")]

    # Decoder: genmo blocks.0 = [conv_in, block_in resnets], blocks.1..nd = up blocks, blocks.nd+1 = block_out.
    out += [Weight((D, "conv_in", "kernel"), "conv1x1", (dc[-1], lat, 1, 1, 1), ("decoder.conv_in.weight",),
                   "decoder.blocks.0.0.weight"),
            Weight((D, "conv_in", "bias"), "vec", (dc[-1],), ("decoder.conv_in.bias",), "decoder.blocks.0.0.bias")]
    _stage(out, (D, "block_in"), "decoder.block_in", lambda i: f"decoder.blocks.0.{1 + i}", n[-1], dc[-1], False)
    for j in range(nd):
        d, g = f"decoder.up_blocks.{j}", f"decoder.blocks.{1 + j}"
        cin, cout = dc[-j - 1], dc[-j - 2]
        rows = cout * cfg.temporal_expansions[-j - 1] * cfg.spatial_expansions[-j - 1] ** 2
        _stage(out, (D, f"up_{j}"), d, lambda i, g=g: f"{g}.blocks.{i}", n[-j - 2], cin, False)
        out += [Weight((D, f"up_{j}", "proj", "kernel"), "linear", (rows, cin), (f"{d}.proj.weight",),
                       f"{g}.proj.weight"),
                Weight((D, f"up_{j}", "proj", "bias"), "vec", (rows,), (f"{d}.proj.bias",), f"{g}.proj.bias")]
    _stage(out, (D, "block_out"), "decoder.block_out", lambda i: f"decoder.blocks.{nd + 1}.{i}", n[0], dc[0], False)
    out += [Weight((D, "proj_out", "kernel"), "linear", (3, dc[0]), ("decoder.proj_out.weight",),
                   "decoder.output_proj.weight"),
            Weight((D, "proj_out", "bias"), "vec", (3,), ("decoder.proj_out.bias",), "decoder.output_proj.bias")]
    return out


def source_shapes(cfg: VAEConfig, layout: str) -> dict[str, tuple[int, ...]]:
    """Every key the source must hold, with its PyTorch shape, in the source's own names."""
    out = {}
    for w in weight_table(cfg):
        if layout == "genmo":
            out[w.genmo] = w.shape
        else:
            for k in w.diffusers:  # q/k/v: row thirds of the fused tensor
                out[k] = (w.shape[0] // len(w.diffusers),) + w.shape[1:]
    return out


_TO_OURS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "vec": lambda x: x,
    "linear": lambda x: x.T,  # [out, in] -> [in, out]
    "conv": lambda x: x.transpose(2, 3, 4, 1, 0),  # [out, in, kt, kh, kw] -> [kt, kh, kw, in, out]
    "conv1x1": lambda x: x.reshape(x.shape[:2]).T,  # [out, in, 1, 1, 1] -> [in, out]
}


def our_shape(w: Weight) -> tuple[int, ...]:
    return _TO_OURS[w.kind](np.broadcast_to(np.float32(0), w.shape)).shape


def plan(cfg: VAEConfig, layout: str) -> list[Leaf]:
    leaves = []
    for w in weight_table(cfg):
        keys = (w.genmo,) if layout == "genmo" else w.diffusers

        def build(src, w=w, keys=keys):
            parts = [src.get(k) for k in keys]
            x = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
            return _TO_OURS[w.kind](x)

        leaves.append(Leaf(path=w.path, shape=our_shape(w), keys=keys, build=build))
    return leaves


# ----------------------------------------------------------------------------- architecture

def _count(keys, pattern: str) -> int:
    """1 + the largest index matched by the regex `pattern` (one group), 0 if none."""
    rx = re.compile(pattern)
    return 1 + max((int(m.group(1)) for k in keys if (m := rx.fullmatch(k))), default=-1)


def infer_config(src, layout: str) -> VAEConfig:
    """The architecture, from tensor shapes and counts of blocks; `check` then validates every key."""
    keys = src.keys()
    if layout == "diffusers":
        nd = _count(keys, r"encoder\.down_blocks\.(\d+)\..*")
        c0, cin = need_shape(src, "encoder.proj_in.weight", 2)
        downs = [need_shape(src, f"encoder.down_blocks.{j}.conv_in.conv.weight", 5) for j in range(nd)]
        stages = ["encoder.block_in"] + [f"encoder.down_blocks.{j}" for j in range(nd)] + ["encoder.block_out"]
        layers = [_count(keys, re.escape(s) + r"\.resnets\.(\d+)\..*") for s in stages]
        attention = [f"{s}.attentions.0.to_q.weight" in keys for s in stages]
        two_lat = need_shape(src, "encoder.proj_out.weight", 2)[0]
        dec_last, lat = need_shape(src, "decoder.conv_in.weight", 5)[:2]
        ups = [need_shape(src, f"decoder.up_blocks.{j}.proj.weight", 2) for j in range(nd)]
        dec_first = need_shape(src, "decoder.proj_out.weight", 2)[1]
    else:
        # encoder.layers.i is a resnet (has .stack.) or a down block (has .layers.0.weight).
        n_layers = _count(keys, r"encoder\.layers\.(\d+)\..*")
        kinds = []
        for i in range(1, n_layers):
            if f"encoder.layers.{i}.layers.0.weight" in keys:
                kinds.append("down")
            elif any(k.startswith(f"encoder.layers.{i}.stack.") for k in keys):
                kinds.append("res")
            else:
                raise ConversionError(f"{src.path}: encoder.layers.{i} is neither a resnet (stack.*) nor a down "
                                      f"block (layers.0.weight)")
        n0 = kinds.index("down") if "down" in kinds else len(kinds)
        nd = kinds[n0:].count("down")
        if kinds[n0:n0 + nd] != ["down"] * nd:
            raise ConversionError(f"{src.path}: encoder down blocks are not consecutive: {kinds}")
        c0, cin = need_shape(src, "encoder.layers.0.weight", 2)
        downs = [need_shape(src, f"encoder.layers.{1 + n0 + j}.layers.0.weight", 5) for j in range(nd)]
        layers = ([n0] + [_count(keys, rf"encoder\.layers\.{1 + n0 + j}\.layers\.(\d+)\..*") - 1 for j in range(nd)]
                  + [len(kinds) - n0 - nd])
        firsts = (["encoder.layers.1"] + [f"encoder.layers.{1 + n0 + j}.layers.1" for j in range(nd)]
                  + [f"encoder.layers.{1 + n0 + nd}"])
        attention = [f"{p}.attn_block.attn.qkv.weight" in keys for p in firsts]
        two_lat = need_shape(src, "encoder.output_proj.weight", 2)[0]
        dec_last, lat = need_shape(src, "decoder.blocks.0.0.weight", 5)[:2]
        ups = [need_shape(src, f"decoder.blocks.{1 + j}.proj.weight", 2) for j in range(nd)]
        dec_first = need_shape(src, "decoder.output_proj.weight", 2)[1]
    if nd < 1:
        raise ConversionError(f"{src.path}: could not find the encoder's down-sampling convolutions")
    enc_ch = (c0, *(s[0] for s in downs))
    # up block j takes decoder_channels[-1 - j]; the last entry is also conv_in's width.
    dec_ch = (dec_first, *(ups[j][1] for j in reversed(range(1, nd))), dec_last)
    te = tuple(s[2] for s in downs)
    se = tuple(s[3] for s in downs)
    fields = dict(latent_channels=lat, encoder_channels=enc_ch, decoder_channels=dec_ch, layers_per_block=tuple(layers),
                  temporal_expansions=te, spatial_expansions=se, encoder_attention=tuple(attention))
    if two_lat != 2 * lat:
        raise ConversionError(f"{src.path}: encoder output has {two_lat} channels, decoder input {lat} "
                              f"(expected 2 x latent channels)")
    try:
        cfg = VAEConfig(**fields)
    except ValueError as e:
        raise ConversionError(f"{src.path}: unsupported VAE architecture {fields}: {e}") from e
    if cin != cfg.in_channels:
        raise ConversionError(f"{src.path}: the encoder's input projection takes {cin} channels, expected "
                              f"{cfg.in_channels} (RGB + its Fourier features)")
    return cfg


def check(src, layout: str) -> VAEConfig:
    """Infer the architecture and validate every key and shape; raises ConversionError."""
    cfg = infer_config(src, layout)
    validate(src, source_shapes(cfg, layout))
    return cfg


# ----------------------------------------------------------------------------- entry points

def convert_vae(src_path, out_dir, dtype="bfloat16", overwrite=False, progress=True):
    """Convert a diffusers or genmo Mochi VAE into our orbax layout; returns (out_dir, VAEConfig).

    Every key and shape is checked before anything is written; the output appears only when complete.
    """
    src, layout = open_vae(src_path)
    cfg = check(src, layout)
    meta = {"model": "mochi_vae", "source": str(src_path), "source_layout": layout, "config": cfg.arch_dict()}
    out = write(plan(cfg, layout), src, out_dir, np.dtype(jnp.dtype(dtype)), meta,
                overwrite=overwrite, progress=progress)
    return out, cfg


def load_vae(path, dtype=None, shardings=None, **overrides) -> tuple[VAEConfig, dict]:
    """(VAEConfig, params) from a converted VAE checkpoint. `overrides` set non-architecture fields
    (compute_dtype, tile_size, chunk_frames, ...); param_dtype follows the stored (or cast) dtype."""
    return load_model(path, "mochi_vae", VAEConfig, dtype, shardings, overrides)


# how the VAE runs, as every command's config names it: config key -> load_vae keyword (VAEConfig field)
VAE_SETTINGS = {"vae_compute_dtype": "compute_dtype", "tile_size": "tile_size", "tile_overlap": "tile_overlap"}


def vae_settings(block) -> dict:
    """The keywords of `load_vae(path, **vae_settings(block))` from a command's config block (the `model`
    block of configs/common.py, or prepare's flat config): `vae_dtype` -> dtype (the weights cast on
    load; '' keeps the stored dtype), `vae_compute_dtype` -> compute_dtype, `tile_size`, `tile_overlap`.
    A key the block lacks is left to VAEConfig's default."""
    return block_settings(block, "vae_dtype", VAE_SETTINGS)


def vae_config(block, arch: dict, stored_dtype: str) -> VAEConfig:
    """The VAEConfig `load_vae(path, **vae_settings(block))` returns, without reading a weight: the
    architecture `arch` (a checkpoint's metadata config) and the block's settings; the weights are
    `stored_dtype` (the checkpoint's) unless the block's `vae_dtype` casts them."""
    return settings_config(VAEConfig, vae_settings(block), arch, stored_dtype)


def read_vae(src_path, dtype="float32") -> tuple[VAEConfig, dict]:
    """Convert straight into memory, no checkpoint written (tests, quick experiments):
    the same validation and leaves as `convert_vae`, returned as (VAEConfig, params)."""
    src, layout = open_vae(src_path)
    cfg = check(src, layout)
    dt = np.dtype(jnp.dtype(dtype))
    params = nest({leaf.path: jnp.asarray(leaf.build(src).astype(dt)) for leaf in plan(cfg, layout)})
    return dataclasses.replace(cfg, param_dtype=jnp.dtype(dtype).name), params
