"""Mochi LoRA files: import, export, combine, merge into a checkpoint.

Reads (auto-detected from the keys) into our scanned LoRA pytree (see models/lora.py):
  * genmo / ComfyUI  `blocks.N.attn.qkv_x.lora_A` (r x in) / `.lora_B` (out x r), optional
    `diffusion_model.` / `model.diffusion_model.` prefix and `.weight` suffix, per-layer `.alpha`
    tensors, `kwargs` metadata (qkv_proj_lora_rank/alpha, out_proj_lora_rank/alpha);
  * kohya            `lora_unet_blocks_N_attn_qkv_x.lora_down.weight` / `.lora_up.weight` (+ `.alpha`);
  * diffusers        `transformer.transformer_blocks.N.attn1.to_q.lora_A.weight` / `.lora_B.weight`
    (to_k, to_v, add_{q,k,v}_proj, to_out.0, to_add_out, ...), optional `lora_adapter_metadata`
    (PEFT LoraConfig fields, prefixed `transformer.`); without alpha information alpha = rank.
Any Dense of a block can be named: attn qkv/proj, mlp_{x,y}.w{1,2} (diffusers `ff.net.0.proj`,
`ff.net.2`, `ff_context.*`; w1's output halves are swapped there), mod_{x,y} (`norm1.linear`,
`norm1_context.linear`, `.linear_1` in the last block).

Scale rules (what the real loaders do): an `.alpha` tensor wins (ComfyUI); else genmo's `kwargs`
for genmo-named attn layers (genmo's loader); else diffusers' metadata for diffusers names;
else scale 1. diffusers' separate q/k/v adapters become one fused adapter: rank r with
b = [B_q | B_k | B_v] when A_q, A_k, A_v are bitwise equal, else rank r_q + r_k + r_v with
stacked A and block-diagonal B. All of it is exact.

Writes genmo-native files (alpha/rank folded into lora_B, `kwargs` with alpha = rank, no `.alpha`
tensors: ComfyUI and genmo read it the same way) and diffusers files (scale folded, no metadata,
one rank for all adapters, so diffusers' alpha = rank is right in every release from 0.32 on).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import jax.numpy as jnp

from mochi_jax.checkpoints.common import ConversionError, TensorSource, save_model, write_safetensors
from mochi_jax.checkpoints.dit import load_dit, save_genmo_dit
from mochi_jax.models import lora as lora_lib
from mochi_jax.models.dit import DiTConfig
from mochi_jax.models.lora import LoraTarget, layers_of, find_target


class LoraFormatError(ValueError):
    """A LoRA file (or tree) cannot be read or written; the message names the file and keys."""


# Layers of one block a LoRA file can name: our path inside the block -> (diffusers modules
# (q/k/v thirds for the fused projections), exists in the last block, diffusers swaps the halves).
_LAYERS = {
    "attn/qkv_x": (("attn1.to_q", "attn1.to_k", "attn1.to_v"), True, False),
    "attn/qkv_y": (("attn1.add_q_proj", "attn1.add_k_proj", "attn1.add_v_proj"), True, False),
    "attn/proj_x": (("attn1.to_out.0",), True, False),
    "attn/proj_y": (("attn1.to_add_out",), False, False),
    "mlp_x/w1": (("ff.net.0.proj",), True, True),
    "mlp_x/w2": (("ff.net.2",), True, False),
    "mlp_y/w1": (("ff_context.net.0.proj",), False, True),
    "mlp_y/w2": (("ff_context.net.2",), False, False),
    "mod_x": (("norm1.linear",), True, False),
    "mod_y": (("norm1_context.linear",), True, False),
}
_GENMO = {layer.replace("/", "."): layer for layer in _LAYERS}
_KOHYA = {layer.replace("/", "_"): layer for layer in _LAYERS}
_DIFFUSERS = {m: (layer, i, len(ms)) for layer, (ms, _, _) in _LAYERS.items() for i, m in enumerate(ms)}
_DIFFUSERS["norm1_context.linear_1"] = ("mod_y", 0, 1)
# genmo's kwargs metadata: its rank/alpha/dropout group per layer
_KWARGS_GROUP = {"attn/qkv_x": "qkv_proj", "attn/qkv_y": "qkv_proj", "attn/proj_x": "out_proj",
                 "attn/proj_y": "out_proj"}


def _alt(names) -> str:
    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))


_PATTERNS = (
    ("genmo", re.compile(rf"^blocks\.(\d+)\.({_alt(_GENMO)})\.(?:(lora_A|lora_B)(?:\.weight)?|(alpha))$")),
    ("kohya", re.compile(rf"^lora_unet_blocks_(\d+)_({_alt(_KOHYA)})\.(?:(lora_down|lora_up)\.weight|(alpha))$")),
    ("diffusers",
     re.compile(rf"^transformer_blocks\.(\d+)\.({_alt(_DIFFUSERS)})\.(?:(lora_A|lora_B)\.weight|(alpha))$")),
)
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")
_ROLE = {"lora_A": "A", "lora_down": "A", "lora_B": "B", "lora_up": "B", "alpha": "alpha"}


def _layer_dims(layer: str, width: int, text_width: int, last: bool) -> tuple[int, int]:
    """(in, out) of a block Dense."""
    w, t = width, text_width
    iw, it = DiTConfig.mlp_inner(w), DiTConfig.mlp_inner(t)
    return {"attn/qkv_x": (w, 3 * w), "attn/qkv_y": (t, 3 * w), "attn/proj_x": (w, w), "attn/proj_y": (w, t),
            "mlp_x/w1": (w, 2 * iw), "mlp_x/w2": (iw, w), "mlp_y/w1": (t, 2 * it), "mlp_y/w2": (it, t),
            "mod_x": (w, 4 * w), "mod_y": (w, t if last else 4 * t)}[layer]


def _diffusers_modules(layer: str, last: bool) -> tuple[str, ...]:
    return ("norm1_context.linear_1",) if (last and layer == "mod_y") else _LAYERS[layer][0]


def _swap_halves(b: np.ndarray) -> np.ndarray:
    """Swap the two halves of the output (last) axis."""
    h = b.shape[-1] // 2
    return np.concatenate([b[..., h:], b[..., :h]], axis=-1)


# ----------------------------------------------------------------------------- reading

@dataclasses.dataclass
class _Piece:
    """One adapter of the file, in our layout: a [in, r], b [r, out_part] (unscaled)."""
    part: int
    nparts: int
    a: np.ndarray
    b: np.ndarray
    scale: float
    label: tuple | None  # (rank, alpha) when scale == alpha / rank, for keeping the file's alpha
    dropout: float
    alpha_source: str
    keys: tuple[str, ...]


def _safetensors_metadata(path: Path) -> dict:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)).get("__metadata__") or {}


def _json_meta(meta: dict, key: str, path: Path) -> dict | None:
    if key not in meta:
        return None
    try:
        out = json.loads(meta[key])
    except json.JSONDecodeError as e:
        raise LoraFormatError(f"{path}: metadata {key!r} is not valid JSON ({e})") from e
    if not isinstance(out, dict):
        raise LoraFormatError(f"{path}: metadata {key!r} is not a JSON object")
    return out


def _peft_lookup(patterns: Mapping, name: str, default):
    """PEFT's rank_pattern / alpha_pattern semantics: the first key matching a dotted suffix of `name`."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def load_lora(path, depth: int | None = None, cfg: DiTConfig | None = None):
    """Read a LoRA .safetensors file (genmo/ComfyUI, kohya or diffusers spelling).

    Returns (lora_tree, targets, info): the tree in our scanned layout ('blocks' stacked over
    depth-1 blocks, 'last_block' separate; numpy float32), ready for `MochiDiT(cfg, targets)`;
    targets with exact per-layer patterns ('^blocks/attn/qkv_x$'); info describes the file.
    `depth` (or `cfg.depth`) says which block is the last; without it the file must show it
    (`_infer_depth`), else DepthUnknown. Adapters and rank components that are zero in every
    block (zero padding, a genmo file's zero partners) are dropped; `info['zero_layers']` names
    the layers that were nothing but zeros.
    With `cfg`, every factor is checked against the model's dims. Any key that cannot be used
    raises LoraFormatError naming the file and every offending key.

    Three steps: `_classify` (every key by block, spelling and module), `_read_pieces` (each
    adapter in our layout with its scale) and `_assemble` (fused, stacked, padded, zeros dropped);
    the unusable keys of the first two are collected and reported together."""
    path = Path(path)
    try:
        src = TensorSource(path)
    except ConversionError as e:
        raise LoraFormatError(str(e)) from e
    if len(src.files) != 1:
        raise LoraFormatError(f"{path}: expected one LoRA .safetensors file")
    meta = _safetensors_metadata(src.files[0])
    if cfg is not None:
        if depth is not None and depth != cfg.depth:
            raise LoraFormatError(f"{path}: depth={depth} contradicts cfg.depth={cfg.depth}")
        depth = cfg.depth

    entries, fmt, bad = _classify(src, path)
    inferred = depth is None
    if inferred and entries:
        depth = _infer_depth(entries, path)
    hint = f" (depth {depth} was inferred from the file; pass the model's depth)" if inferred else ""

    genmo_kwargs = _json_meta(meta, "kwargs", path) if fmt == "genmo" else None
    peft = None
    if fmt == "diffusers":
        raw = _json_meta(meta, "lora_adapter_metadata", path)
        if raw is not None:
            peft = {k[len("transformer."):]: v for k, v in raw.items() if k.startswith("transformer.")} or None
        if peft and peft.get("use_dora"):
            raise LoraFormatError(f"{path}: DoRA adapters (use_dora) are not supported")

    pieces = _read_pieces(src, path, entries, depth, hint, cfg, genmo_kwargs, peft, bad)
    if bad:
        raise LoraFormatError(f"{path}: cannot use {len(bad)} LoRA entr{'y' if len(bad) == 1 else 'ies'}:\n  "
                              + "\n  ".join(bad))
    return _assemble(path, pieces, depth, inferred, fmt, genmo_kwargs, meta)


def _classify(src: TensorSource, path: Path) -> tuple[dict, str, list[str]]:
    """Step 1 of load_lora: every key of the file by block, spelling and module.

    Returns ({(block, 'genmo' | 'diffusers', module): {role: key}}, the format ('genmo', 'kohya',
    'diffusers'), and a line for every key that cannot be used). One file must use one spelling."""
    bad: list[str] = []
    entries: dict[tuple[int, str, str], dict[str, str]] = {}  # (block, family, module) -> role -> key
    families = set()
    for key in sorted(src.keys()):
        k = key
        for p in _PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
                break
        for family, rx in _PATTERNS:
            m = rx.match(k)
            if m:
                break
        else:
            bad.append(f"{key}: unknown key (not a Mochi block LoRA tensor in genmo, kohya or diffusers naming)")
            continue
        families.add(family)
        module = _KOHYA[m[2]].replace("/", ".") if family == "kohya" else m[2]
        fam = "diffusers" if family == "diffusers" else "genmo"
        slot = entries.setdefault((int(m[1]), fam, module), {})
        role = _ROLE[m[3] or m[4]]
        if role in slot:
            bad.append(f"{key}: the same tensor as {slot[role]}")
        slot[role] = key
    if len(families) > 1:
        raise LoraFormatError(f"{path}: mixes key spellings {sorted(families)}; one file must use one format")
    if not entries and not bad:
        raise LoraFormatError(f"{path}: holds no LoRA tensors")
    return entries, (families.pop() if families else "unknown"), bad


def _read_pieces(src: TensorSource, path: Path, entries: dict, depth: int, hint: str, cfg: DiTConfig | None,
                 genmo_kwargs: dict | None, peft: dict | None, bad: list[str]) -> dict:
    """Step 2 of load_lora: every adapter as a piece of one of our layers, in our layout (a [in, r],
    b [r, out part], unscaled, with its scale from .alpha tensors, genmo's kwargs or PEFT's
    metadata). Returns {(group, layer): {block: [pieces]}}; what cannot be used goes to `bad`."""

    def get(key):
        try:
            return src.get(key).astype(np.float32)
        except ConversionError as e:
            raise LoraFormatError(str(e)) from e

    pieces: dict[tuple[str, str], dict[int, list[_Piece]]] = {}  # (group, layer) -> block -> pieces
    for (n, fam, module), slot in sorted(entries.items()):
        keys = tuple(sorted(slot.values()))
        layer, part, nparts = (_DIFFUSERS[module] if fam == "diffusers" else (_GENMO[module], 0, 1))
        last = n == depth - 1
        if n >= depth:
            bad.append(f"{', '.join(keys)}: block {n} does not exist in a model of depth {depth}")
            continue
        if last and not _LAYERS[layer][1]:
            bad.append(f"{', '.join(keys)}: block {n} is the last block, which has no {layer}{hint}")
            continue
        if fam == "diffusers" and module not in _diffusers_modules(layer, last):
            bad.append(f"{', '.join(keys)}: {module} exists only in the {'other' if last else 'last'} blocks{hint}")
            continue
        if "A" not in slot or "B" not in slot:
            have = ", ".join(f"{r} {k}" for r, k in sorted(slot.items()))
            bad.append(f"{', '.join(keys)}: lora_A and lora_B must come in pairs, found only {have}")
            continue
        A, B = get(slot["A"]), get(slot["B"])
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1] or A.shape[0] == 0:
            bad.append(f"{slot['A']} {A.shape} / {slot['B']} {B.shape}: expected lora_A [r, in] and "
                       f"lora_B [out, r] with the same rank r > 0")
            continue
        if cfg is not None:
            d_in, d_out = _layer_dims(layer, cfg.width, cfg.text_width, last)
            if (A.shape[1], B.shape[0]) != (d_in, d_out // nparts):
                bad.append(f"{slot['A']} {A.shape} / {slot['B']} {B.shape}: the model's layer is "
                           f"{d_out // nparts} x {d_in} (out x in)")
                continue
        r = A.shape[0]
        alpha, dropout, source, rs = float(r), 0.0, "default alpha = rank", False
        name = f"transformer_blocks.{n}.{module}"
        if "alpha" in slot:
            x = get(slot["alpha"])
            if x.size != 1:
                bad.append(f"{slot['alpha']}: an alpha must be a scalar, got shape {x.shape}")
                continue
            alpha, source = float(x.reshape(-1)[0]), "alpha tensors"
        elif genmo_kwargs is not None and layer in _KWARGS_GROUP:
            g = _KWARGS_GROUP[layer]
            rk = int(genmo_kwargs.get(f"{g}_lora_rank", 0))
            if rk != r:
                bad.append(f"{', '.join(keys)}: rank {r}, but the kwargs metadata says {g}_lora_rank = {rk}")
                continue
            alpha = float(genmo_kwargs.get(f"{g}_lora_alpha", r))
            dropout, source = float(genmo_kwargs.get(f"{g}_lora_dropout", 0.0)), "kwargs metadata"
        elif peft is not None:
            rk = int(_peft_lookup(peft.get("rank_pattern"), name, peft.get("r", 8)))
            if rk != r:
                bad.append(f"{', '.join(keys)}: rank {r}, but lora_adapter_metadata says rank {rk}")
                continue
            alpha = float(_peft_lookup(peft.get("alpha_pattern"), name, peft.get("lora_alpha", 8)))
            rs = bool(peft.get("use_rslora", False))
            dropout, source = float(peft.get("lora_dropout", 0.0)), "lora_adapter_metadata"
        a, b = A.T, B.T
        if fam == "diffusers" and _LAYERS[layer][2]:
            b = _swap_halves(b)
        scale = alpha / math.sqrt(r) if rs else alpha / r
        group = "last_block" if last else "blocks"
        pieces.setdefault((group, layer), {}).setdefault(n, []).append(
            _Piece(part, nparts, a, b, scale, None if rs else (r, alpha), dropout, source, keys))
    return pieces


def _assemble(path: Path, pieces: dict, depth: int, inferred: bool, fmt: str, genmo_kwargs: dict | None,
              meta: dict) -> tuple[dict, tuple[LoraTarget, ...], dict]:
    """Step 3 of load_lora: fuse q/k/v pieces, stack the blocks, pad ranks, fold scales where they
    differ, drop rank components that are zero in every block. Returns (tree, targets, info)."""
    lora, targets = {}, []
    info = {"file": str(path), "format": fmt, "depth": depth, "depth_inferred": inferred, "layers": {},
            "zero_layers": [], "notes": _notes(fmt, genmo_kwargs, meta, pieces)}
    for (group, layer), per_block in sorted(pieces.items()):
        fused = {n: _fuse(ps, path) for n, ps in per_block.items()}
        dims = {(a.shape[0], b.shape[1]) for a, b, _, _ in fused.values()}
        if len(dims) != 1:
            keys = [k for ps in per_block.values() for p in ps for k in p.keys]
            raise LoraFormatError(f"{path}: the blocks disagree on the shape of {layer} "
                                  f"({sorted(dims)} as (in, out)): {', '.join(keys)}")
        (d_in, d_out), = dims
        rank = max(a.shape[1] for a, _, _, _ in fused.values())
        labels = {lab for _, _, _, lab in fused.values()}
        keep = len(labels) == 1 and None not in labels and next(iter(labels))[0] == rank
        alpha = next(iter(labels))[1] if keep else float(rank)
        n_layers = depth - 1 if group == "blocks" else 1
        a_st = np.zeros((n_layers, d_in, rank), np.float32)
        b_st = np.zeros((n_layers, rank, d_out), np.float32)
        for n, (a, b, scale, _) in fused.items():
            i = n if group == "blocks" else 0
            a_st[i, :, :a.shape[1]] = a
            b_st[i, :b.shape[0]] = b if keep else b * np.float32(scale)
        # rank components that add nothing in any block (a zero column of a or row of b: zero
        # padding, or a genmo file's all-zero partner adapters) are dropped, a layer of them all too
        adds = np.any(a_st != 0, axis=1) & np.any(b_st != 0, axis=2)  # [blocks, rank]
        live = adds.any(axis=0)
        blocks = [n for n in sorted(per_block) if adds[n if group == "blocks" else 0].any()]
        all_pieces = [p for ps in per_block.values() for p in ps]
        if not live.any():
            info["zero_layers"].append(f"{group}/{layer}")
            continue
        file_rank = rank
        if not live.all():
            a_st, b_st, rank = a_st[..., live], b_st[:, live], int(live.sum())
            alpha = alpha * rank / file_rank if keep else float(rank)  # the same scale alpha / rank
        if group == "last_block":
            a_st, b_st = a_st[0], b_st[0]
        node = lora.setdefault(group, {})
        for part in layer.split("/"):
            node = node.setdefault(part, {})
        node.update(a=a_st, b=b_st)
        dropout = max(p.dropout for p in all_pieces)
        targets.append(LoraTarget(f"^{group}/{layer}$", rank=rank, alpha=alpha, dropout=dropout))
        info["layers"][f"{group}/{layer}"] = {
            "rank": rank, "alpha": alpha, "blocks": blocks, "zero_blocks": sorted(set(per_block) - set(blocks)),
            "zero_rank_dropped": file_rank - rank,
            "file_ranks": sorted({p.a.shape[1] for p in all_pieces}),
            "file_alphas": sorted({p.label[1] if p.label else p.scale * math.sqrt(p.a.shape[1])
                                   for p in all_pieces}),
            "alpha_source": sorted({p.alpha_source for p in all_pieces}),
            "scale_folded_into_b": not keep}
    return lora, tuple(targets), info


MOCHI_DEPTH = 48  # Mochi 1's blocks


class DepthUnknown(LoraFormatError):
    """The file does not show whether its highest block is the model's last one: pass the depth."""

    def __init__(self, message: str, highest: int):
        super().__init__(message)
        self.highest = highest


def _infer_depth(entries, path) -> int:
    """The model's depth when the file shows it: its highest block N is the last block if it
    names a last-block-only module (diffusers' norm1_context.linear_1), or if a layer the last
    block lacks (attn/proj_y, mlp_y) adapts every block before N but not N, or if N is Mochi 1's
    last block (47). Otherwise raises DepthUnknown: writing block N under the last block's names
    would be wrong whenever the model has more blocks (the file covers only some of them)."""
    layers: dict[int, set[str]] = {}
    for n, fam, module in entries:
        if fam == "diffusers" and module == "norm1_context.linear_1":
            layer = "last-only"
        else:
            layer = _DIFFUSERS[module][0] if fam == "diffusers" else _GENMO[module]
        layers.setdefault(n, set()).add(layer)
    top = max(layers)
    not_last = sorted(layer for layer in layers[top] if layer in _LAYERS and not _LAYERS[layer][1])
    if "last-only" in layers[top] and not not_last:
        return top + 1
    skipped = [layer for layer, (_, in_last, _) in _LAYERS.items() if not in_last and layer not in layers[top]
               and top > 0 and all(layer in layers.get(n, ()) for n in range(top))]
    if not not_last and (skipped or top + 1 == MOCHI_DEPTH):
        return top + 1
    why = (f"block {top} has {', '.join(not_last)}, which the last block lacks, so the model has more blocks"
           if not_last else f"nothing in it shows whether block {top} is the model's last block")
    raise DepthUnknown(f"{path}: the file's highest block is {top}, and {why}; pass the model's depth "
                       f"(tools/lora.py --depth N; Mochi 1: {MOCHI_DEPTH})", top)


def _fuse(pieces: list[_Piece], path):
    """The pieces of one layer in one block -> (a [in, r], b [r, out], scale, label).

    One piece, or q/k/v pieces sharing a bitwise-equal A with one scale: kept as they are
    (b concatenated). Otherwise stacked A and block-diagonal B with each scale folded into its
    block (scale 1, no label)."""
    nparts = pieces[0].nparts
    if nparts == 1:
        p = pieces[0]
        return p.a, p.b, p.scale, p.label
    ps = sorted(pieces, key=lambda p: p.part)
    width = ps[0].b.shape[1]
    if (len(ps) == nparts and all(p.b.shape[1] == width for p in ps)
            and all(p.a.shape == ps[0].a.shape and np.array_equal(p.a, ps[0].a) for p in ps)
            and len({(p.scale, p.label) for p in ps}) == 1):
        return ps[0].a, np.concatenate([p.b for p in ps], axis=1), ps[0].scale, ps[0].label
    a = np.concatenate([p.a for p in ps], axis=1)
    b = np.zeros((a.shape[1], nparts * width), np.float32)
    row = 0
    for p in ps:
        if p.b.shape[1] != width:
            raise LoraFormatError(f"{path}: q/k/v adapters of different output widths: "
                                  f"{', '.join(k for p in ps for k in p.keys)}")
        b[row:row + p.a.shape[1], p.part * width:(p.part + 1) * width] = p.b * np.float32(p.scale)
        row += p.a.shape[1]
    return a, b, 1.0, None


def _notes(fmt, genmo_kwargs, meta, pieces) -> list[str]:
    """What other tools would make of this file, where it differs from what load_lora reads."""
    notes = []
    every = [p for per in pieces.values() for ps in per.values() for p in ps]
    if fmt == "genmo" and any(p.alpha_source == "kwargs metadata" and p.scale != 1.0 for p in every):
        notes.append("alpha comes from the genmo kwargs metadata, which ComfyUI ignores (it applies scale 1)")
    if any(p.alpha_source == "alpha tensors" for p in every):
        notes.append("has .alpha tensors: diffusers refuses such files and genmo's strict loader fails on them")
    if fmt != "diffusers":
        notes.append("diffusers loads nothing from a genmo/kohya-named file (only a warning); "
                     "convert it with `tools/lora.py convert --to diffusers`")
    else:
        notes.append("ComfyUI and genmo load nothing from diffusers-named Mochi LoRAs; "
                     "convert it with `tools/lora.py convert --to genmo`")
    return notes


# ----------------------------------------------------------------------------- writing

def writable(path: str) -> bool:
    """Whether the LoRA file formats (genmo / ComfyUI and diffusers alike) can hold an adapter on the
    layer at `path` ('blocks/attn/qkv_x', 'last_block/mod_y'): they name only the Dense layers of
    the blocks, not the embedders or the final layer ('final_layer/linear', 't5_yproj', ...)."""
    group, _, layer = path.partition("/")
    return group in ("blocks", "last_block") and layer in _LAYERS


def _export_layers(lora: Mapping, targets: Sequence[LoraTarget], depth: int | None):
    """(depth, {(block n, layer): (a [in, r], b [r, out] with the scale folded in)}, {layer: dropout})."""
    layers, dropouts, found_depth = {}, {}, None
    for path, node in layers_of(lora):
        name = "/".join(path)
        group, layer = path[0], "/".join(path[1:])
        if not writable(name):
            raise LoraFormatError(f"cannot export LoRA layer {name!r}: the LoRA file formats only name the "
                                  f"Dense layers of the blocks ({', '.join(_LAYERS)})")
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
    """The file, atomically and with the permissions of any new file (common.write_safetensors)."""
    np_dtype = np.dtype(jnp.dtype(dtype))
    return write_safetensors(path, {k: v.astype(np_dtype) for k, v in tensors.items()},
                             {k: str(v) for k, v in metadata.items()})


def save_genmo(path, lora: Mapping, targets: Sequence[LoraTarget], depth: int | None = None,
               cfg: DiTConfig | None = None, dtype="float32"):
    """Write a genmo-native LoRA that ComfyUI and genmo's own loader read identically.

    Keys `blocks.N.<layer>.lora_A` [r, in] / `.lora_B` [out, r], alpha/r folded into lora_B,
    `kwargs` metadata with qkv_proj_lora_{rank,alpha,dropout} and out_proj_lora_* (alpha =
    rank). Because genmo builds every qkv_x/qkv_y (resp. proj_x/proj_y) adapter of every block
    with one rank, those groups are zero-padded to a common rank and written for every block,
    with zero factors where the tree has none (their dims come from the tree, or from `cfg`).
    mlp/mod adapters are written 1:1 (ComfyUI applies them; genmo's loader has no such layers).
    With `cfg` (the DiT's config) a LoRA on one stream only (e.g. qkv_x and proj_x) and one on
    the last block only are written too; without it the text width and depth are read off the
    factors, which such LoRAs do not show."""
    depth = _depth(depth, cfg)
    depth, layers, dropouts = _export_layers(lora, targets, depth)
    width, text_width = _widths(layers, cfg)
    kwargs = {}
    for g in ("qkv_proj", "out_proj"):
        members = [layer for layer, grp in _KWARGS_GROUP.items() if grp == g]
        rank = max((a.shape[1] for (_, layer), (a, _) in layers.items() if layer in members), default=0)
        drop = max((dropouts.get(layer, 0.0) for layer in members), default=0.0)
        kwargs.update({f"{g}_lora_rank": rank, f"{g}_lora_alpha": rank, f"{g}_lora_dropout": drop})
        for n in range(depth if rank else 0):
            for layer in members:
                if n == depth - 1 and not _LAYERS[layer][1]:
                    continue
                if (n, layer) in layers:
                    a, b = layers[(n, layer)]
                    d_in, d_out = a.shape[0], b.shape[1]
                elif text_width is None and layer in ("attn/qkv_y", "attn/proj_y"):
                    raise LoraFormatError(f"cannot write the zero {layer} adapters genmo's loader expects "
                                          f"without the text stream width: pass cfg=")
                else:
                    a = b = None
                    d_in, d_out = _layer_dims(layer, width, text_width or 0, n == depth - 1)
                a_pad, b_pad = np.zeros((d_in, rank), np.float32), np.zeros((rank, d_out), np.float32)
                if a is not None:
                    a_pad[:, :a.shape[1]], b_pad[:b.shape[0]] = a, b
                layers[(n, layer)] = (a_pad, b_pad)
    tensors = {}
    for (n, layer), (a, b) in sorted(layers.items()):
        key = f"blocks.{n}.{layer.replace('/', '.')}"
        tensors[key + ".lora_A"], tensors[key + ".lora_B"] = a.T, b.T
    return _write(path, tensors, {"kwargs": json.dumps(kwargs)}, dtype)


def _depth(depth: int | None, cfg: DiTConfig | None) -> int | None:
    if cfg is None:
        return depth
    if depth is not None and depth != cfg.depth:
        raise LoraFormatError(f"depth={depth} contradicts cfg.depth={cfg.depth}")
    return cfg.depth


def _widths(layers: dict, cfg: DiTConfig | None) -> tuple[int, int | None]:
    """(width, text_width) of the model, from cfg or from the LoRA's own factor shapes."""
    if cfg is not None:
        return cfg.width, cfg.text_width
    width = text_width = None
    for (_, layer), (a, b) in layers.items():
        if layer in ("attn/qkv_x", "attn/qkv_y"):
            width = b.shape[1] // 3
        elif layer in ("attn/proj_x", "attn/proj_y", "mlp_x/w1", "mod_x", "mod_y"):
            width = a.shape[0]
        if layer in ("attn/qkv_y", "mlp_y/w1"):
            text_width = a.shape[0]
        elif layer in ("attn/proj_y", "mlp_y/w2"):
            text_width = b.shape[1]
    return width, text_width


def save_diffusers(path, lora: Mapping, targets: Sequence[LoraTarget], depth: int | None = None,
                   cfg: DiTConfig | None = None, dtype="float32"):
    """Write a diffusers LoRA (`transformer.transformer_blocks.N.attn1.to_q.lora_A.weight`, ...)
    that `MochiPipeline.load_lora_weights` of every diffusers release with Mochi LoRAs (0.32 on)
    applies exactly: the scale folded into lora_B, no alpha metadata (diffusers then takes alpha =
    rank) and ONE rank for every adapter, the lower ranks zero-padded (exact). diffusers before
    0.40 gives every adapter alpha = the first adapter's rank when ranks differ, so adapters of
    another rank would come out scaled by the ratio of the ranks. A fused qkv adapter becomes
    to_q/to_k/to_v adapters sharing lora_A, with lora_B the row thirds. Adapters that add
    nothing (all-zero factors, as a genmo file's zero partners) are left out, and so are rank
    components whose a column or b row is zero (e.g. an earlier zero-padding). `cfg` (or `depth`) says
    which block is the last, needed when the LoRA adapts only the last block."""
    depth, layers, _ = _export_layers(lora, targets, _depth(depth, cfg))

    def modules(drop_zeros: bool) -> dict:
        out = {}
        for (n, layer), (a, b) in sorted(layers.items()):
            if drop_zeros:
                keep = np.any(a != 0, axis=0) & np.any(b != 0, axis=1)  # rank components that add something
                a, b = a[:, keep], b[keep]
            if _LAYERS[layer][2]:
                b = _swap_halves(b)
            names = _diffusers_modules(layer, n == depth - 1)
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
        a_pad, b_pad = np.zeros((rank, a.shape[0]), np.float32), np.zeros((b.shape[1], rank), np.float32)
        a_pad[:a.shape[1]], b_pad[:, :a.shape[1]] = a.T, b.T
        tensors[key + ".lora_A.weight"], tensors[key + ".lora_B.weight"] = a_pad, b_pad
    return _write(path, tensors, {"format": "pt"}, dtype)


# ----------------------------------------------------------------------------- combine / merge

def combine(loras: Sequence[tuple[Mapping, Sequence[LoraTarget], float]]):
    """Several (lora_tree, targets, strength) as ONE adapter: (lora_tree, targets).

    Per layer, the factors of every LoRA adapting it are concatenated along the rank axis with
    strength * alpha / r folded into b; the targets are exact per-layer patterns with alpha =
    rank. A layer adapted by only some LoRAs carries only their factors (the others add nothing).
    The result applies all of them in one forward pass (one compiled function)."""
    parts: dict[tuple[str, ...], list] = {}
    for i, (tree, targets, strength) in enumerate(loras):
        for path, node in layers_of(tree):
            target = find_target(targets, "/".join(path))
            if target is None:
                raise LoraFormatError(f"LoRA #{i}: layer {'/'.join(path)!r} matches none of its targets")
            a = np.asarray(node["a"], np.float32)
            b = np.asarray(node["b"], np.float32) * np.float32(strength * target.scale)
            prev = parts.setdefault(path, [])
            if prev and (prev[0][0].shape[:-1] != a.shape[:-1] or prev[0][1].shape[-1] != b.shape[-1]):
                raise LoraFormatError(f"LoRA #{i}: layer {'/'.join(path)!r} has shape a {a.shape} b {b.shape}, "
                                      f"other LoRAs a {prev[0][0].shape} b {prev[0][1].shape}")
            prev.append((a, b))
    out, targets = {}, []
    for path, ab in sorted(parts.items()):
        node = out
        for k in path:
            node = node.setdefault(k, {})
        node["a"] = np.concatenate([a for a, _ in ab], axis=-1)
        node["b"] = np.concatenate([b for _, b in ab], axis=-2)
        rank = node["a"].shape[-1]
        targets.append(LoraTarget(f"^{'/'.join(path)}$", rank=rank, alpha=float(rank)))
    return out, tuple(targets)


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
