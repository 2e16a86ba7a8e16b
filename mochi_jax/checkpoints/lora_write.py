"""Writing Mochi LoRAs: files other tools read, and LoRAs merged into a DiT checkpoint.

Writes genmo-native files (alpha/rank folded into lora_B, `kwargs` with alpha = rank, no `.alpha`
tensors: ComfyUI and genmo read it the same way) and diffusers files (scale folded, no metadata,
one rank for all adapters, so diffusers' alpha = rank is right in every release from 0.32 on).
`writable` says which layers the formats can hold; `merge_checkpoint` folds a LoRA into a
converted checkpoint (or genmo's single-file layout).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import jax.numpy as jnp

from mochi_jax.checkpoints.dit import load_dit, save_genmo_dit
from mochi_jax.checkpoints.lora_format import (KWARGS_GROUP, LAYERS, LoraFormatError, diffusers_modules, layer_dims,
                                               swap_halves, text_width_shown)
from mochi_jax.checkpoints.lora_read import load_lora
from mochi_jax.checkpoints.orbax_io import save_model
from mochi_jax.checkpoints.safetensors_io import ConversionError, write_safetensors
from mochi_jax.models import lora as lora_lib
from mochi_jax.models.dit import DiTConfig
from mochi_jax.models.lora import LoraTarget, layers_of, find_target


def writable(path: str) -> bool:
    """Whether the LoRA file formats (genmo / ComfyUI and diffusers alike) can hold an adapter on the
    layer at `path` ('blocks/attn/qkv_x', 'last_block/mod_y'): they name only the Dense layers of
    the blocks, not the embedders or the final layer ('final_layer/linear', 't5_yproj', ...)."""
    group, _, layer = path.partition("/")
    return group in ("blocks", "last_block") and layer in LAYERS


def _export_layers(lora: Mapping, targets: Sequence[LoraTarget], depth: int | None):
    """(depth, {(block n, layer): (a [in, r], b [r, out] with the scale folded in)}, {layer: dropout})."""
    layers, dropouts, found_depth = {}, {}, None
    for path, node in layers_of(lora):
        name = "/".join(path)
        group, layer = path[0], "/".join(path[1:])
        if not writable(name):
            raise LoraFormatError(f"cannot export LoRA layer {name!r}: the LoRA file formats only name the "
                                  f"Dense layers of the blocks ({', '.join(LAYERS)})")
        target = find_target(targets, name)
        if target is None:
            raise LoraFormatError(f"LoRA layer {name!r} matches no LoRA target, so its scale is unknown")
        a = np.asarray(node["a"], np.float32)
        b = np.asarray(node["b"], np.float32) * np.float32(target.scale)
        if group == "blocks":
            if found_depth is not None and found_depth != a.shape[0] + 1:
                raise LoraFormatError(f"LoRA layers disagree on the number of blocks ({name!r})")
            found_depth = a.shape[0] + 1
        layers[(group, layer)] = (a, b)
        dropouts[layer] = max(dropouts.get(layer, 0.0), target.dropout)
    if depth is None:
        depth = found_depth
    if depth is None:
        raise LoraFormatError("the LoRA adapts only the last block: pass depth=")
    if found_depth is not None and found_depth != depth:
        raise LoraFormatError(f"the LoRA has {found_depth - 1} stacked blocks, not depth - 1 = {depth - 1}")
    out = {}
    for (group, layer), (a, b) in layers.items():
        if group == "last_block":
            out[(depth - 1, layer)] = (a, b)
        else:
            out.update({(n, layer): (a[n], b[n]) for n in range(depth - 1)})
    return depth, out, dropouts


def _write(path, tensors: dict, metadata: dict, dtype):
    """The file, atomically and with the permissions of any new file (safetensors_io.write_safetensors)."""
    np_dtype = np.dtype(jnp.dtype(dtype))
    return write_safetensors(path, {k: v.astype(np_dtype) for k, v in tensors.items()},
                             {k: str(v) for k, v in metadata.items()})


ABOUT_KEY = "mochi_jax"  # the safetensors metadata entry with what the file is (`about`: JSON)


def save_genmo(path, lora: Mapping, targets: Sequence[LoraTarget], depth: int | None = None,
               cfg: DiTConfig | None = None, dtype="float32", text_width: int | None = None,
               about: Mapping | None = None):
    """Write a genmo-native LoRA that ComfyUI and genmo's own loader read identically.

    Keys `blocks.N.<layer>.lora_A` [r, in] / `.lora_B` [out, r], alpha/r folded into lora_B,
    `kwargs` metadata with qkv_proj_lora_{rank,alpha,dropout} and out_proj_lora_* (alpha =
    rank). Because genmo builds every qkv_x/qkv_y (resp. proj_x/proj_y) adapter of every block
    with one rank, those groups are zero-padded to a common rank and written for every block,
    with zero factors where the tree has none (their dims come from the tree, or from `cfg`).
    mlp/mod adapters are written 1:1 (ComfyUI applies them; genmo's loader has no such layers).
    With `cfg` (the DiT's config) a LoRA on one stream only (e.g. qkv_x and proj_x) and one on
    the last block only are written too; without it the text width and depth are read off the
    factors, which such LoRAs do not show: then `text_width` (and `depth`) give them. `about` (JSON:
    base model, step, targets, ...) goes into the file's metadata as `mochi_jax`, which ComfyUI,
    genmo and diffusers do not read."""
    depth = _depth(depth, cfg)
    depth, layers, dropouts = _export_layers(lora, targets, depth)
    width, shown = _widths(layers, depth, cfg)
    if text_width is not None and shown is not None and text_width != shown:
        raise LoraFormatError(f"{path}: text_width={text_width} (tools/lora.py --text-width) contradicts the "
                              f"LoRA's text stream width {shown}")
    text_width = shown or text_width
    kwargs = {}
    for g in ("qkv_proj", "out_proj"):
        members = [layer for layer, grp in KWARGS_GROUP.items() if grp == g]
        rank = max((a.shape[1] for (_, layer), (a, _) in layers.items() if layer in members), default=0)
        drop = max((dropouts.get(layer, 0.0) for layer in members), default=0.0)
        kwargs.update({f"{g}_lora_rank": rank, f"{g}_lora_alpha": rank, f"{g}_lora_dropout": drop})
        for n in range(depth if rank else 0):
            for layer in members:
                if n == depth - 1 and not LAYERS[layer][1]:
                    continue
                if (n, layer) in layers:
                    a, b = layers[(n, layer)]
                elif text_width is None and layer in ("attn/qkv_y", "attn/proj_y"):
                    raise LoraFormatError(f"{path}: cannot write the zero {layer} adapters genmo's loader expects: "
                                          f"the LoRA does not show the model's text width; pass it (text_width=, "
                                          f"tools/lora.py --text-width N; Mochi 1: {DiTConfig.text_width})")
                else:
                    d_in, d_out = layer_dims(layer, width, text_width or 0, n == depth - 1)
                    a, b = np.zeros((d_in, 0), np.float32), np.zeros((0, d_out), np.float32)
                layers[(n, layer)] = lora_lib.pad_rank(a, b, rank)
    tensors = {}
    for (n, layer), (a, b) in sorted(layers.items()):
        key = f"blocks.{n}.{layer.replace('/', '.')}"
        tensors[key + ".lora_A"], tensors[key + ".lora_B"] = a.T, b.T
    return _write(path, tensors, {"kwargs": json.dumps(kwargs), **_about(about)}, dtype)


def _about(about: Mapping | None) -> dict:
    return {ABOUT_KEY: json.dumps(dict(about), sort_keys=True)} if about else {}


def _depth(depth: int | None, cfg: DiTConfig | None) -> int | None:
    if cfg is None:
        return depth
    if depth is not None and depth != cfg.depth:
        raise LoraFormatError(f"depth={depth} contradicts cfg.depth={cfg.depth}")
    return cfg.depth


def _widths(layers: dict, depth: int, cfg: DiTConfig | None) -> tuple[int, int | None]:
    """(width, text_width) of the model, from cfg or from the LoRA's own factor shapes."""
    if cfg is not None:
        return cfg.width, cfg.text_width
    width = text_width = None
    for (n, layer), (a, b) in layers.items():
        if layer in ("attn/qkv_x", "attn/qkv_y"):
            width = b.shape[1] // 3
        elif layer in ("attn/proj_x", "attn/proj_y", "mlp_x/w1", "mod_x", "mod_y"):
            width = a.shape[0]
        text_width = text_width_shown(layer, a.shape[0], b.shape[1], n == depth - 1) or text_width
    return width, text_width


def save_diffusers(path, lora: Mapping, targets: Sequence[LoraTarget], depth: int | None = None,
                   cfg: DiTConfig | None = None, dtype="float32", about: Mapping | None = None):
    """Write a diffusers LoRA (`transformer.transformer_blocks.N.attn1.to_q.lora_A.weight`, ...)
    that `MochiPipeline.load_lora_weights` of every diffusers release with Mochi LoRAs (0.32 on)
    applies exactly: the scale folded into lora_B, no alpha metadata (diffusers then takes alpha =
    rank) and ONE rank for every adapter, the lower ranks zero-padded (exact). diffusers before
    0.40 gives every adapter alpha = the first adapter's rank when ranks differ, so adapters of
    another rank would come out scaled by the ratio of the ranks. A fused qkv adapter becomes
    to_q/to_k/to_v adapters sharing lora_A, with lora_B the row thirds. Adapters that add
    nothing (all-zero factors, as a genmo file's zero partners) are left out, and so are rank
    components whose a column or b row is zero (e.g. an earlier zero-padding). `cfg` (or `depth`) says
    which block is the last, needed when the LoRA adapts only the last block. `about`: as in
    save_genmo."""
    depth, layers, _ = _export_layers(lora, targets, _depth(depth, cfg))

    def modules(drop_zeros: bool) -> dict:
        out = {}
        for (n, layer), (a, b) in sorted(layers.items()):
            if drop_zeros:
                keep = np.any(a != 0, axis=0) & np.any(b != 0, axis=1)  # rank components that add something
                a, b = a[:, keep], b[keep]
            if LAYERS[layer][2]:
                b = swap_halves(b)
            names = diffusers_modules(layer, n == depth - 1)
            for module, b_part in zip(names, np.split(b, len(names), axis=1)):
                if a.shape[1] and (np.any(b_part) or not drop_zeros):
                    out[f"transformer.transformer_blocks.{n}.{module}"] = (a, b_part)
        return out

    adapters = modules(drop_zeros=True) or modules(drop_zeros=False)  # an all-zero LoRA is written as it is
    if not adapters:
        raise LoraFormatError(f"{path}: the LoRA has no layers to write")
    rank = max(a.shape[1] for a, _ in adapters.values())
    tensors = {}
    for key, (a, b) in adapters.items():
        a_pad, b_pad = lora_lib.pad_rank(a, b, rank)
        tensors[key + ".lora_A.weight"], tensors[key + ".lora_B.weight"] = a_pad.T, b_pad.T
    return _write(path, tensors, {"format": "pt", **_about(about)}, dtype)


def merge_checkpoint(base_dir, lora, out, strength: float = 1.0, unmerge: bool = False,
                     overwrite: bool = False, progress: bool = False, format: str = "orbax"):
    """Fold a LoRA (file path, or (tree, targets)) into a converted DiT checkpoint, in the base
    checkpoint's dtype. `format='orbax'`: `out` is a checkpoint folder `load_dit(out)` reads;
    `format='genmo'`: `out` is one safetensors file in genmo's layout (dit.safetensors key names),
    which ComfyUI and genmo's code load. `unmerge=True` removes a merged LoRA again (exact up to
    the rounding of that dtype). Returns (out, info)."""
    if format not in ("orbax", "genmo"):
        raise ValueError(f"format={format!r}: choose 'orbax' (a checkpoint folder) or 'genmo' (one safetensors file)")
    if format == "genmo" and Path(out).exists() and not overwrite:
        raise ConversionError(f"{out} exists; pass --overwrite to replace it")
    cfg, params = load_dit(base_dir)
    if isinstance(lora, (str, os.PathLike)):
        tree, targets, info = load_lora(lora, cfg=cfg)
    else:
        (tree, targets), info = lora, {}
    fn = lora_lib.unmerge if unmerge else lora_lib.merge
    try:
        params = fn(params, tree, targets, strength)
    except (ValueError, KeyError) as e:
        raise LoraFormatError(f"LoRA does not fit {base_dir}: {e}") from e
    if format == "genmo":
        return save_genmo_dit(out, cfg, params, dtype=cfg.param_dtype), info
    out = save_model(out, params, "mochi_dit", cfg.arch(), unstack=[("blocks", cfg.depth - 1)],
                     dtype=jnp.dtype(cfg.param_dtype), overwrite=overwrite, progress=progress,
                     extra_metadata={"lora": {"source": str(lora) if info else "in memory",
                                              "strength": strength, "unmerged": unmerge}})
    return out, info
