"""Reading Mochi LoRA files: `load_lora`.

Reads (auto-detected from the keys) into our scanned LoRA pytree (see models/lora.py):
  * genmo / ComfyUI  `blocks.N.attn.qkv_x.lora_A` (r x in) / `.lora_B` (out x r), optional
    `diffusion_model.` / `model.diffusion_model.` prefix and `.weight` suffix, per-layer `.alpha`
    tensors, `kwargs` metadata (qkv_proj_lora_rank/alpha, out_proj_lora_rank/alpha);
  * kohya            `lora_unet_blocks_N_attn_qkv_x.lora_down.weight` / `.lora_up.weight` (+ `.alpha`);
  * diffusers        `transformer.transformer_blocks.N.attn1.to_q.lora_A.weight` / `.lora_B.weight`
    (to_k, to_v, add_{q,k,v}_proj, to_out.0, to_add_out, ...), optional `lora_adapter_metadata`
    (PEFT LoraConfig fields, prefixed `transformer.`); without alpha information alpha = rank.
The layers each spelling can name are in lora_format.py.

Scale rules (what the real loaders do): an `.alpha` tensor wins (ComfyUI); else genmo's `kwargs`
for genmo-named attn layers (genmo's loader); else diffusers' metadata for diffusers names;
else scale 1. diffusers' separate q/k/v adapters become one fused adapter: rank r with
b = [B_q | B_k | B_v] when A_q, A_k, A_v are bitwise equal (a part the file leaves out is zero),
else rank r_q + r_k + r_v with stacked A and block-diagonal B. All of it is exact.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Mapping

import numpy as np

from mochi_jax.checkpoints.lora_format import (DIFFUSERS, GENMO, KOHYA, KWARGS_GROUP, LAYERS, LoraFormatError,
                                               diffusers_modules, layer_dims, swap_halves, text_width_shown)
from mochi_jax.checkpoints.safetensors_io import ConversionError, TensorSource, header_metadata
from mochi_jax.models import lora as lora_lib
from mochi_jax.models.dit import DiTConfig
from mochi_jax.models.lora import LoraTarget


def _alt(names) -> str:
    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))


_PATTERNS = (
    ("genmo", re.compile(rf"^blocks\.(\d+)\.({_alt(GENMO)})\.(?:(lora_A|lora_B)(?:\.weight)?|(alpha))$")),
    ("kohya", re.compile(rf"^lora_unet_blocks_(\d+)_({_alt(KOHYA)})\.(?:(lora_down|lora_up)\.weight|(alpha))$")),
    ("diffusers",
     re.compile(rf"^transformer_blocks\.(\d+)\.({_alt(DIFFUSERS)})\.(?:(lora_A|lora_B)\.weight|(alpha))$")),
)
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")
_ROLE = {"lora_A": "A", "lora_down": "A", "lora_B": "B", "lora_up": "B", "alpha": "alpha"}


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


def _about(meta: dict) -> dict:
    try:
        about = json.loads(meta.get("mochi_jax", "{}"))
    except ValueError:
        return {}
    return about if isinstance(about, dict) else {}


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
    if path.is_dir():
        inside = sorted(f.name for f in path.glob("*.safetensors"))
        raise LoraFormatError(f"{path} is a folder; name the LoRA .safetensors file"
                              + (f" in it ({', '.join(inside)})" if inside else ""))
    try:
        src = TensorSource(path)
    except ConversionError as e:
        raise LoraFormatError(str(e)) from e
    if len(src.files) != 1:
        raise LoraFormatError(f"{path}: expected one LoRA .safetensors file")
    meta = header_metadata(src.files[0])
    if cfg is not None:
        if depth is not None and depth != cfg.depth:
            raise LoraFormatError(f"{path}: depth={depth} contradicts cfg.depth={cfg.depth}")
        depth = cfg.depth

    entries, fmt, bad = _classify(src, path)
    inferred = depth is None
    if inferred and entries:
        depth = _infer_depth(entries, path, src)
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
        module = KOHYA[m[2]].replace("/", ".") if family == "kohya" else m[2]
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
        layer, part, nparts = (DIFFUSERS[module] if fam == "diffusers" else (GENMO[module], 0, 1))
        last = n == depth - 1
        if n >= depth:
            bad.append(f"{', '.join(keys)}: block {n} does not exist in a model of depth {depth}")
            continue
        if last and not LAYERS[layer][1]:
            bad.append(f"{', '.join(keys)}: block {n} is the last block, which has no {layer}{hint}")
            continue
        if fam == "diffusers" and module not in diffusers_modules(layer, last):
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
            d_in, d_out = layer_dims(layer, cfg.width, cfg.text_width, last)
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
        elif genmo_kwargs is not None and layer in KWARGS_GROUP:
            g = KWARGS_GROUP[layer]
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
        if fam == "diffusers" and LAYERS[layer][2]:
            b = swap_halves(b)
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
    shown = {text_width_shown(layer, p.a.shape[0], p.b.shape[1], group == "last_block")
             for (group, layer), per_block in pieces.items() for ps in per_block.values() for p in ps} - {None}
    info = {"file": str(path), "format": fmt, "depth": depth, "depth_inferred": inferred, "layers": {},
            "zero_layers": [], "notes": _notes(fmt, genmo_kwargs, meta, pieces),
            "text_width": shown.pop() if len(shown) == 1 else None,  # as the file's shapes show it
            "about": _about(meta)}  # what the trainer wrote about the file (lora_write's `about`), or {}
    for (group, layer), per_block in sorted(pieces.items()):
        fused = {n: _fuse(ps, path) for n, ps in per_block.items()}
        dims = {(a.shape[0], b.shape[1]) for a, b, _, _ in fused.values()}
        if len(dims) != 1:
            keys = [k for ps in per_block.values() for p in ps for k in p.keys]
            raise LoraFormatError(f"{path}: the blocks disagree on the shape of {layer} "
                                  f"({sorted(dims)} as (in, out)): {', '.join(keys)}")
        rank = max(a.shape[1] for a, _, _, _ in fused.values())
        labels = {lab for _, _, _, lab in fused.values()}
        keep = len(labels) == 1 and None not in labels and next(iter(labels))[0] == rank
        alpha = next(iter(labels))[1] if keep else float(rank)
        # one row per block of the group (the stacked blocks, or the last block alone), zeros where
        # the file has no adapter, every block's rank padded to the largest
        a_st, b_st = lora_lib.stack_padded(
            [None if n not in fused else (fused[n][0], fused[n][1] if keep else fused[n][1] * np.float32(fused[n][2]))
             for n in (range(depth - 1) if group == "blocks" else (depth - 1,))], rank)
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


def _infer_depth(entries, path, src: TensorSource) -> int:
    """The model's depth when the file shows it: its highest block N is the last block if it
    names a last-block-only module (diffusers' norm1_context.linear_1), or if its mod_y has a
    quarter of the outputs mod_y has in a block before N (genmo names the last block's like any
    other), or if a layer the last block lacks (attn/proj_y, mlp_y) adapts every block before N
    but not N, or if N is Mochi 1's last block (47). Otherwise raises DepthUnknown: writing block
    N under the last block's names would be wrong whenever the model has more blocks (the file
    covers only some of them)."""
    layers: dict[int, set[str]] = {}
    mod_y_out: dict[int, int] = {}  # block -> rows of its genmo/kohya-named mod_y lora_B
    for (n, fam, module), slot in entries.items():
        if fam == "diffusers" and module == "norm1_context.linear_1":
            layer = "last-only"
        else:
            layer = DIFFUSERS[module][0] if fam == "diffusers" else GENMO[module]
        layers.setdefault(n, set()).add(layer)
        if fam == "genmo" and layer == "mod_y" and "B" in slot and len(src.shape(slot["B"])) == 2:
            mod_y_out[n] = src.shape(slot["B"])[0]
    top = max(layers)
    not_last = sorted(layer for layer in layers[top] if layer in LAYERS and not LAYERS[layer][1])
    if top in mod_y_out and any(4 * mod_y_out[top] == rows for n, rows in mod_y_out.items() if n < top):
        layers[top].add("last-only")
    if "last-only" in layers[top] and not not_last:
        return top + 1
    skipped = [layer for layer, (_, in_last, _) in LAYERS.items() if not in_last and layer not in layers[top]
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
    (b concatenated, zeros for a part the file leaves out, as save_diffusers does with an
    all-zero one). Otherwise stacked A and block-diagonal B with each scale folded into its
    block (scale 1, no label)."""
    nparts = pieces[0].nparts
    if nparts == 1:
        p = pieces[0]
        return p.a, p.b, p.scale, p.label
    ps = sorted(pieces, key=lambda p: p.part)
    width = ps[0].b.shape[1]
    if (all(p.b.shape[1] == width for p in ps)
            and all(p.a.shape == ps[0].a.shape and np.array_equal(p.a, ps[0].a) for p in ps)
            and len({(p.scale, p.label) for p in ps}) == 1):
        b = np.zeros((ps[0].a.shape[1], nparts * width), np.float32)
        for p in ps:
            b[:, p.part * width:(p.part + 1) * width] = p.b
        return ps[0].a, b, ps[0].scale, ps[0].label
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

