"""CLIP weights: the transformers layout (`CLIPModel.save_pretrained`) or OpenAI's / open_clip's
layout (safetensors) -> our pytree (models/clip.py). Kernels become [in, out]; the layers of each
tower stay unrolled on disk (vision/blocks_N, text/blocks_N) and `load_clip` stacks them.

    ours                       transformers                              OpenAI / open_clip
    vision/patch_embed         vision_model.embeddings.patch_embedding   visual.conv1      [W, 3, p, p] -> [p, p, 3, W]
    vision/class_embedding     vision_model.embeddings.class_embedding   visual.class_embedding
    vision/position_embedding  vision_model.embeddings.position_embedding  visual.positional_embedding
    vision/ln_pre, ln_post     vision_model.pre_layrnorm, post_layernorm visual.ln_pre, visual.ln_post
    vision/proj/kernel         visual_projection (transposed)            visual.proj (as is, [W, D])
    text/token_embedding       text_model.embeddings.token_embedding     token_embedding
    text/position_embedding    text_model.embeddings.position_embedding  positional_embedding
    text/ln_final              text_model.final_layer_norm               ln_final
    text/proj/kernel           text_projection (transposed)              text_projection (as is, [Wt, D])
    logit_scale                logit_scale                               logit_scale
  layer N: transformers {vision,text}_model.encoder.layers.N.*, OpenAI visual.transformer.resblocks.N.*
  and transformer.resblocks.N.*:
    ln_1, ln_2                 layer_norm1, layer_norm2                  ln_1, ln_2
    attn/{q,k,v}               self_attn.{q,k,v}_proj                    attn.in_proj_weight / _bias, thirds q | k | v
    attn/o                     self_attn.out_proj                        attn.out_proj
    mlp/fc1, mlp/fc2           mlp.fc1, mlp.fc2                          mlp.c_fc, mlp.c_proj

Ignored when present: `*.position_ids` (transformers) and the scalars `input_resolution`,
`context_length`, `vocab_size` (OpenAI's original state dict); anything else unexpected is an error.

The architecture comes from the tensor shapes, except what they cannot show:
  * heads: the transformers folder's config.json (num_attention_heads of vision_config /
    text_config); for the OpenAI layout open_clip_config.json (vision head_width, default 64;
    text heads, default 8); with neither, width // 64 (OpenAI's rule for all its ViTs).
  * activation: config.json's hidden_act; open_clip_config.json's quick_gelu (open_clip's
    default is exact GELU); with neither, quick_gelu (OpenAI's models).
  * layer_norm_eps (config.json, else 1e-5) and eos_token_id (config.json's text eos_token_id;
    2, the old transformers value, and no config at all mean argmax pooling).
Keyword overrides to `convert_clip` (vision_heads=, text_heads=, activation=, ...) take precedence.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Callable

import numpy as np
from flax import traverse_util
import jax.numpy as jnp

from mochi_jax.checkpoints.orbax_io import Leaf, load_model, read_metadata, validate, write
from mochi_jax.checkpoints.safetensors_io import ConversionError, TensorSource, json_beside, need_shape
from mochi_jax.models.clip import CLIPConfig, abstract_params
from mochi_jax.models.layers import stack_layers, unstack_shardings

HF, OPENAI = "transformers", "openai"
IGNORED = {HF: re.compile(r"^(vision|text)_model\.embeddings\.position_ids$"),
           OPENAI: re.compile(r"^(input_resolution|context_length|vocab_size)$")}
OVERRIDABLE = ("vision_heads", "text_heads", "activation", "layer_norm_eps", "eos_token_id")

_SAME = lambda x: x  # noqa: E731
_T = lambda x: x.T  # noqa: E731  Linear [out, in] -> kernel [in, out]
_CONV = lambda x: x.transpose(2, 3, 1, 0)  # noqa: E731  [W, 3, p, p] -> [p, p, 3, W]

_V, _X = "vision_model.", "text_model."
TOP_KEYS = {  # our path -> source key of every tensor outside the layers
    HF: {("vision", "patch_embed"): _V + "embeddings.patch_embedding.weight",
         ("vision", "class_embedding"): _V + "embeddings.class_embedding",
         ("vision", "position_embedding"): _V + "embeddings.position_embedding.weight",
         ("vision", "ln_pre", "scale"): _V + "pre_layrnorm.weight",
         ("vision", "ln_pre", "bias"): _V + "pre_layrnorm.bias",
         ("vision", "ln_post", "scale"): _V + "post_layernorm.weight",
         ("vision", "ln_post", "bias"): _V + "post_layernorm.bias",
         ("vision", "proj", "kernel"): "visual_projection.weight",
         ("text", "token_embedding"): _X + "embeddings.token_embedding.weight",
         ("text", "position_embedding"): _X + "embeddings.position_embedding.weight",
         ("text", "ln_final", "scale"): _X + "final_layer_norm.weight",
         ("text", "ln_final", "bias"): _X + "final_layer_norm.bias",
         ("text", "proj", "kernel"): "text_projection.weight", ("logit_scale",): "logit_scale"},
    OPENAI: {("vision", "patch_embed"): "visual.conv1.weight", ("vision", "class_embedding"): "visual.class_embedding",
             ("vision", "position_embedding"): "visual.positional_embedding",
             ("vision", "ln_pre", "scale"): "visual.ln_pre.weight", ("vision", "ln_pre", "bias"): "visual.ln_pre.bias",
             ("vision", "ln_post", "scale"): "visual.ln_post.weight",
             ("vision", "ln_post", "bias"): "visual.ln_post.bias",
             ("vision", "proj", "kernel"): "visual.proj", ("text", "token_embedding"): "token_embedding.weight",
             ("text", "position_embedding"): "positional_embedding", ("text", "ln_final", "scale"): "ln_final.weight",
             ("text", "ln_final", "bias"): "ln_final.bias", ("text", "proj", "kernel"): "text_projection",
             ("logit_scale",): "logit_scale"},
}


def layer_prefix(layout: str, tower: str, n: int | None = None) -> str:
    """'text_model.encoder.layers.3.' and the like; without n, the part before the number."""
    base = f"{tower}_model.encoder.layers." if layout == HF else \
        ("visual." if tower == "vision" else "") + "transformer.resblocks."
    return base if n is None else f"{base}{n}."


def _third(i: int, transpose: bool) -> Callable:
    """Part i of OpenAI's fused q | k | v projection."""
    def f(x):
        part = np.split(x, 3, axis=0)[i]
        return part.T if transpose else part
    return f


def _layer(layout: str, p: str, width: int, mlp: int) -> list[tuple[tuple[str, ...], str, tuple, Callable]]:
    """(our path below blocks_N, source key, source shape, transform) of the layer with key prefix p."""
    sq, vec = (width, width), (width,)
    hf = layout == HF
    out = []
    for ln, theirs in (("ln_1", "layer_norm1" if hf else "ln_1"), ("ln_2", "layer_norm2" if hf else "ln_2")):
        out += [((ln, "scale"), p + theirs + ".weight", vec, _SAME), ((ln, "bias"), p + theirs + ".bias", vec, _SAME)]
    if hf:
        for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "out_proj")):
            out += [(("attn", ours, "kernel"), p + f"self_attn.{theirs}.weight", sq, _T),
                    (("attn", ours, "bias"), p + f"self_attn.{theirs}.bias", vec, _SAME)]
    else:
        for i, c in enumerate("qkv"):
            out += [(("attn", c, "kernel"), p + "attn.in_proj_weight", (3 * width, width), _third(i, True)),
                    (("attn", c, "bias"), p + "attn.in_proj_bias", (3 * width,), _third(i, False))]
        out += [(("attn", "o", "kernel"), p + "attn.out_proj.weight", sq, _T),
                (("attn", "o", "bias"), p + "attn.out_proj.bias", vec, _SAME)]
    fc1, fc2 = ("mlp.fc1", "mlp.fc2") if hf else ("mlp.c_fc", "mlp.c_proj")
    return out + [(("mlp", "fc1", "kernel"), p + fc1 + ".weight", (mlp, width), _T),
                  (("mlp", "fc1", "bias"), p + fc1 + ".bias", (mlp,), _SAME),
                  (("mlp", "fc2", "kernel"), p + fc2 + ".weight", (width, mlp), _T),
                  (("mlp", "fc2", "bias"), p + fc2 + ".bias", vec, _SAME)]


def key_map(cfg: CLIPConfig, layout: str) -> list[tuple[tuple[str, ...], str, tuple, Callable]]:
    """(our path, source key, source shape, transform) of every leaf of the on-disk tree (layers unrolled)."""
    w, wt, d, p = cfg.vision_width, cfg.text_width, cfg.projection_dim, cfg.patch_size
    proj = (lambda width: ((d, width), _T)) if layout == HF else (lambda width: ((width, d), _SAME))
    top = {("vision", "patch_embed"): ((w, 3, p, p), _CONV), ("vision", "class_embedding"): ((w,), _SAME),
           ("vision", "position_embedding"): ((cfg.num_patches + 1, w), _SAME), ("vision", "proj", "kernel"): proj(w),
           ("text", "token_embedding"): ((cfg.vocab_size, wt), _SAME),
           ("text", "position_embedding"): ((cfg.context_length, wt), _SAME), ("text", "proj", "kernel"): proj(wt),
           ("logit_scale",): ((), _SAME)}
    out = [(path, key, *top.get(path, ((w if path[0] == "vision" else wt,), _SAME)))  # the rest are norms
           for path, key in TOP_KEYS[layout].items()]
    for tower, width, mlp, n in (("vision", w, cfg.vision_mlp, cfg.vision_layers),
                                 ("text", wt, cfg.text_mlp, cfg.text_layers)):
        for i in range(n):
            out += [((tower, f"blocks_{i}", *path), key, shape, fn)
                    for path, key, shape, fn in _layer(layout, layer_prefix(layout, tower, i), width, mlp)]
    return out


def source_shapes(cfg: CLIPConfig, layout: str) -> dict[str, tuple[int, ...]]:
    """Every key the checkpoint must hold, with its shape in that layout."""
    return {key: shape for _, key, shape, _ in key_map(cfg, layout)}


# ----------------------------------------------------------------------------- sources

def detect_layout(src: TensorSource) -> str:
    keys = src.keys()
    if any(k.startswith("vision_model.") for k in keys):
        return HF
    if any(k.startswith("visual.") for k in keys):
        return OPENAI
    raise ConversionError(f"{src.path}: neither a transformers CLIPModel (vision_model.*, text_model.*) nor an "
                          f"OpenAI / open_clip CLIP (visual.*); first keys: {sorted(keys)[:5]}")


def open_source(path) -> tuple[TensorSource, str]:
    """A safetensors file or a folder of them; the layout is detected from the keys."""
    src = TensorSource(path)
    return src, detect_layout(src)


def _num_layers(src: TensorSource, prefix: str) -> int:
    layer_re = re.compile("^" + re.escape(prefix) + r"(\d+)\.")
    return 1 + max((int(m.group(1)) for k in src.keys() if (m := layer_re.match(k))), default=-1)


def infer_config(src: TensorSource, layout: str, **overrides) -> CLIPConfig:
    hf = layout == HF
    top = TOP_KEYS[layout]
    w, _, p, _ = need_shape(src, top[("vision", "patch_embed")])
    positions = need_shape(src, top[("vision", "position_embedding")])[0]
    vocab, wt = need_shape(src, top[("text", "token_embedding")])
    context = need_shape(src, top[("text", "position_embedding")])[0]
    proj = need_shape(src, top[("vision", "proj", "kernel")])
    grid = math.isqrt(positions - 1)
    if grid * grid != positions - 1:
        raise ConversionError(f"{src.path}: {top[('vision', 'position_embedding')]!r} has {positions} rows, "
                              f"not 1 + a square number of patches")
    fields = dict(image_size=grid * p, patch_size=p, vision_width=w, vocab_size=vocab, context_length=context,
                  text_width=wt, projection_dim=proj[0] if hf else proj[-1])
    for tower in ("vision", "text"):
        prefix = layer_prefix(layout, tower)
        fields[f"{tower}_layers"] = n = _num_layers(src, prefix)
        if n == 0:
            raise ConversionError(f"{src.path}: no {prefix}N.* keys")
        fc1 = layer_prefix(layout, tower, 0) + ("mlp.fc1" if hf else "mlp.c_fc") + ".weight"
        fields[f"{tower}_mlp"] = need_shape(src, fc1)[0]
    fields.update(_config_files(src, layout, fields))
    unknown = set(overrides) - set(OVERRIDABLE)
    if unknown:
        raise TypeError(f"convert_clip: unknown overrides {sorted(unknown)}; allowed: {OVERRIDABLE}")
    fields.update(overrides)
    try:
        return CLIPConfig(**fields)
    except ValueError as e:
        hint = ("" if hf or "heads" not in str(e) else
                " (heads come from open_clip_config.json or width // 64; pass vision_heads= / text_heads=)")
        raise ConversionError(f"{src.path}: {e}{hint}") from e


def _config_files(src: TensorSource, layout: str, fields: dict) -> dict:
    """heads, activation, layer_norm_eps, eos_token_id from config.json / open_clip_config.json."""
    out = dict(vision_heads=fields["vision_width"] // 64, text_heads=fields["text_width"] // 64)
    if layout == HF:
        f, cfg = json_beside(src, "config.json")
        if f is None:
            return out
        vis, txt = cfg.get("vision_config", {}), cfg.get("text_config", {})
        names = dict(vision_width=(vis, "hidden_size"), vision_layers=(vis, "num_hidden_layers"),
                     vision_mlp=(vis, "intermediate_size"), patch_size=(vis, "patch_size"),
                     image_size=(vis, "image_size"), text_width=(txt, "hidden_size"),
                     text_layers=(txt, "num_hidden_layers"), text_mlp=(txt, "intermediate_size"),
                     vocab_size=(txt, "vocab_size"), context_length=(txt, "max_position_embeddings"),
                     projection_dim=(cfg, "projection_dim"))
        clash = {k: (d[n], fields[k]) for k, (d, n) in names.items() if n in d and d[n] != fields[k]}
        if clash:
            raise ConversionError(f"{f} disagrees with the tensor shapes in {src.path}: "
                                  + ", ".join(f"{k}: config {a}, tensors {b}" for k, (a, b) in clash.items()))
        acts = {vis.get("hidden_act", "quick_gelu"), txt.get("hidden_act", "quick_gelu")}
        epss = {vis.get("layer_norm_eps", 1e-5), txt.get("layer_norm_eps", 1e-5)}
        if len(acts) > 1 or len(epss) > 1:
            raise ConversionError(f"{f}: the towers differ in hidden_act {acts} or layer_norm_eps {epss}; "
                                  f"one value for both is supported")
        eos = txt.get("eos_token_id", 49407)  # CLIPTextConfig's default
        out.update(vision_heads=vis.get("num_attention_heads", out["vision_heads"]),
                   text_heads=txt.get("num_attention_heads", out["text_heads"]),
                   activation=acts.pop(), layer_norm_eps=float(epss.pop()),
                   eos_token_id=None if eos == 2 else int(eos))
        return out
    f, cfg = json_beside(src, "open_clip_config.json")
    if f is None:
        return out
    model = cfg.get("model_cfg", cfg)
    vis, txt = model.get("vision_cfg", {}), model.get("text_cfg", {})
    unsupported = [k for k, d, ok in (
        ("vision_cfg.attentional_pool", vis, False), ("vision_cfg.global_average_pool", vis, False),
        ("vision_cfg.no_ln_pre", vis, False), ("vision_cfg.final_ln_after_pool", vis, False),
        ("vision_cfg.ls_init_value", vis, None), ("text_cfg.no_causal_mask", txt, False),
        ("text_cfg.final_ln_after_pool", txt, False), ("text_cfg.embed_cls", txt, False),
        ("text_cfg.ls_init_value", txt, None)) if d.get(k.split(".")[1], ok) != ok]
    if txt.get("pool_type", "argmax") != "argmax" or vis.get("pool_type", "tok") != "tok":
        unsupported.append("pool_type")
    if unsupported:
        raise ConversionError(f"{f}: open_clip options {unsupported} are not supported (plain OpenAI-style ViT "
                              f"CLIP only)")
    out.update(vision_heads=fields["vision_width"] // vis.get("head_width", 64), text_heads=txt.get("heads", 8),
               activation="quick_gelu" if model.get("quick_gelu", False) else "gelu")
    return out


def check(src: TensorSource, layout: str, **overrides) -> CLIPConfig:
    """Infer the architecture and validate every key and shape; raises ConversionError."""
    cfg = infer_config(src, layout, **overrides)
    expected = source_shapes(cfg, layout)
    expected.update({k: src.shape(k) for k in src.keys() if IGNORED[layout].match(k)})
    validate(src, expected)
    return cfg


# ----------------------------------------------------------------------------- our leaves

def plan(cfg: CLIPConfig, layout: str) -> list[Leaf]:
    """One leaf per parameter of the on-disk tree; shapes are the model's own (models/clip.py)."""

    model = traverse_util.flatten_dict(abstract_params(cfg))
    shapes = {}
    for path, x in model.items():
        if path[1:2] == ("blocks",):
            for i in range(x.shape[0]):
                shapes[(path[0], f"blocks_{i}", *path[2:])] = tuple(x.shape[1:])
        else:
            shapes[path] = tuple(x.shape)
    mapping = key_map(cfg, layout)
    differ = set(shapes) ^ {path for path, *_ in mapping}
    if differ:  # the map and the model must agree
        raise AssertionError(f"internal: key map and model differ at {sorted(differ)}")
    return [Leaf(path, shapes[path], (key,), lambda s, key=key, fn=fn: fn(s.get(key)))
            for path, key, _, fn in mapping]


# ----------------------------------------------------------------------------- entry points

def convert_clip(src_path, out_dir, dtype="bfloat16", overwrite=False, progress=True,
                 **overrides) -> tuple[Path, CLIPConfig]:
    """Convert a CLIP checkpoint (transformers or OpenAI / open_clip safetensors, a file or a
    folder) into our orbax layout; returns (out_dir, CLIPConfig). `overrides`: vision_heads,
    text_heads, activation, layer_norm_eps, eos_token_id (what the shapes cannot show).

    Every key and shape is checked before anything is written; the output appears only when complete.
    """
    np_dtype = np.dtype(jnp.dtype(dtype))
    src, layout = open_source(src_path)
    cfg = dataclasses.replace(check(src, layout, **overrides), param_dtype=np_dtype.name)
    meta = {"model": "clip", "source": str(src_path), "source_layout": layout, "config": cfg.arch()}
    out = write(plan(cfg, layout), src, out_dir, np_dtype, meta, overwrite=overwrite, progress=progress)
    return out, cfg


def load_clip(path, dtype=None, shardings=None, **overrides) -> tuple[CLIPConfig, dict]:
    """(CLIPConfig, params) from a checkpoint written by `convert_clip`, layers stacked for the scan.

    `dtype` casts the floating weights; `shardings` (a pytree of jax.sharding.Sharding like the
    stacked params) restores each leaf into its shards; `overrides` set non-architecture fields
    (compute_dtype, ...); param_dtype follows the loaded weights.
    """
    arch = read_metadata(path).get("config", {})
    layers = {"vision": int(arch.get("vision_layers", 0)), "text": int(arch.get("text_layers", 0))}
    disk = None
    if shardings is not None:
        disk = dict(shardings)
        for tower, n in layers.items():
            disk[tower] = unstack_shardings(shardings[tower], "blocks", n)
    cfg, params = load_model(path, "clip", CLIPConfig, dtype, disk, overrides)
    for tower, n in layers.items():
        params[tower] = stack_layers(params[tower], "blocks", n, None if shardings is None else shardings[tower])
    return cfg, params
