"""LoRA as a separate pytree.

A `LoraTarget` names a set of Dense layers by a regular expression on their module path
(e.g. 'blocks/attn/qkv_x', 'last_block/attn/proj_x'; `re.search` semantics) and gives their
rank, alpha and dropout. Each matching Dense owns variables `a` [in, r] and `b` [r, out]
in the 'lora' collection, at the same path as its `kernel` in 'params'. Stacked (scanned)
blocks carry a leading layer axis on both.

    y = x @ W + b + (alpha / r) * dropout(x) @ a @ b

Adapter maths shared by everything that holds several LoRAs: `pad_rank` / `stack_padded` bring
factors of different ranks to one rank with zeros (exact: a zero column of `a` meets a zero row of
`b`) and stack them on a leading axis (evaluation's variants, a sweep's stacked structure, a LoRA
file's blocks); `combine` makes one adapter of several LoRAs with strengths; `adapter_tree` turns
{layer: (a, b)} with the scales folded in into a tree and its scale-1 targets.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class LoraTarget:
    pattern: str
    rank: int
    alpha: float
    dropout: float = 0.0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def matches(self, path: str) -> bool:
        return re.search(self.pattern, path) is not None


def find_target(targets: Sequence[LoraTarget], path: str) -> LoraTarget | None:
    """The first target whose pattern matches `path`, or None."""
    for t in targets:
        if t.matches(path):
            return t
    return None


def targets_from_config(cfg: Mapping[str, Any] | None) -> tuple[LoraTarget, ...]:
    """ConfigDict/dict {name: {pattern, rank, alpha, dropout}} -> tuple of LoraTargets.

    Targets with rank 0 are dropped, so rank 0 everywhere builds the plain model.
    """
    if not cfg:
        return ()
    out = []
    for name in sorted(cfg):
        t = cfg[name]
        rank = int(t["rank"])
        if rank < 0:
            raise ValueError(f"lora target {name!r}: rank must be >= 0, got {rank}")
        if rank == 0:
            continue
        out.append(LoraTarget(pattern=str(t["pattern"]), rank=rank,
                              alpha=float(t.get("alpha", rank)), dropout=float(t.get("dropout", 0.0))))
    return tuple(out)


# The reference fine-tuner's targets: visual and text qkv and output projections.
REFERENCE_TARGETS = {
    "qkv": dict(pattern=r"attn/qkv_[xy]$", rank=16, alpha=16.0, dropout=0.0),
    "out": dict(pattern=r"attn/proj_[xy]$", rank=16, alpha=16.0, dropout=0.0),
}


def layers_of(lora: Mapping, prefix=()) -> Iterable[tuple[tuple[str, ...], Mapping]]:
    """Yield (path, {'a', 'b'}) for every adapted layer of a LoRA pytree."""
    if "a" in lora and "b" in lora and not isinstance(lora["a"], Mapping):
        yield prefix, lora
        return
    for k, v in lora.items():
        yield from layers_of(v, prefix + (k,))


def _get(tree: Mapping, path: Sequence[str]):
    for k in path:
        tree = tree[k]
    return tree


def _replace(tree: Mapping, path: Sequence[str], key: str, value) -> dict:
    """Copy of nested dict `tree` with tree[path][key] = value (untouched branches shared)."""
    if not path:
        return {**tree, key: value}
    return {**tree, path[0]: _replace(tree[path[0]], path[1:], key, value)}


def lora_delta(a, b, scale: float):
    """scale * a @ b, batched over any leading (layer) axes, in float32."""
    return scale * jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32))


def merge(params: Mapping, lora: Mapping, targets: Sequence[LoraTarget], strength: float = 1.0,
          sign: float = 1.0) -> dict:
    """Fold strength * (alpha/r) * a @ b into the adapted kernels; returns new params.

    The kernels keep their dtype. `sign=-1` removes a merged LoRA again (unmerge). A quantized
    kernel (int8 / float8 with a 'kernel_scale' beside it) is refused with a ValueError.
    """
    out = dict(params)
    for path, node in layers_of(lora):
        target = find_target(targets, "/".join(path))
        if target is None:
            raise ValueError(f"LoRA layer {'/'.join(path)!r} matches no LoRA target, so its scale is unknown")
        kernel = _get(params, path)["kernel"]
        if "kernel_scale" in _get(params, path):
            raise ValueError(f"cannot merge a LoRA into {'/'.join(path)!r}: its kernel is quantized "
                             f"({jnp.dtype(kernel.dtype).name} with per-channel scales), and folding the LoRA in "
                             "would re-round the whole kernel; apply the LoRA unmerged (as training and sampling "
                             "do), or merge into a bfloat16/float32 base")
        if kernel.shape[-2:] != (node["a"].shape[-2], node["b"].shape[-1]):
            raise ValueError(f"LoRA layer {'/'.join(path)!r}: a {node['a'].shape} @ b {node['b'].shape} "
                             f"does not fit kernel {kernel.shape}")
        new = kernel.astype(jnp.float32) + sign * strength * lora_delta(node["a"], node["b"], target.scale)
        out = _replace(out, path, "kernel", new.astype(kernel.dtype))
    return out


def unmerge(params: Mapping, lora: Mapping, targets: Sequence[LoraTarget], strength: float = 1.0) -> dict:
    """Inverse of `merge` (exact up to the rounding of the kernel dtype)."""
    return merge(params, lora, targets, strength, sign=-1.0)


def variant_of(stacked: Mapping, k: int, targets: Sequence[LoraTarget]) -> dict:
    """Variant k's own LoRA out of a tree stacked on a leading variant axis and zero-padded to the
    largest rank (a sweep's, mochi_jax/lib/sweep.py): the layers its `targets` adapt, at their ranks."""
    out = {}
    for path, node in layers_of(stacked):
        target = find_target(targets, "/".join(path))
        if target is not None:
            r = target.rank
            out = _nested_set(out, path, {"a": node["a"][k][..., :r], "b": node["b"][k][..., :r, :]})
    return out


def _nested_set(tree: dict, path: Sequence[str], value) -> dict:
    if len(path) == 1:
        return {**tree, path[0]: value}
    return {**tree, path[0]: _nested_set(tree.get(path[0], {}), path[1:], value)}


def take(stacked: Mapping, k: int) -> dict:
    """Adapter k of a tree stacked on a leading axis (`stack_padded`), at the stacked (padded) ranks."""
    return jax.tree_util.tree_map(lambda x: x[k], stacked)


# ----------------------------------------------------------------------------- several adapters

def _array_module(*arrays):
    """numpy for numpy factors (a LoRA file's, evaluation's), jax.numpy for anything else (a sweep's)."""
    return np if all(isinstance(x, np.ndarray) for x in arrays) else jnp


def pad_rank(a, b, rank: int):
    """a [.., in, r] and b [.., r, out] zero-padded to `rank` >= r: the same adapter (the zero
    columns of a meet the zero rows of b). numpy in, numpy out; jax arrays in, jax arrays out."""
    r = a.shape[-1]
    if b.shape[-2] != r or rank < r:
        raise ValueError(f"cannot pad a {tuple(a.shape)} / b {tuple(b.shape)} to rank {rank}")
    if rank == r:
        return a, b
    xp = _array_module(a, b)
    return (xp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, rank - r)]),
            xp.pad(b, [(0, 0)] * (b.ndim - 2) + [(0, rank - r), (0, 0)]))


def stack_padded(pairs: Sequence, rank: int | None = None):
    """(a [K, .., in, rank], b [K, .., rank, out]): K adapters (a, b) of one layer on a leading axis,
    each zero-padded to `rank` (default: the largest of them); None for an adapter that is not
    there (zeros: it adds nothing). In the dtypes of the first adapter given."""
    have = [p for p in pairs if p is not None]
    if not have:
        raise ValueError("stack_padded: no adapter to stack")
    a0, b0 = have[0]
    rank = max(a.shape[-1] for a, _ in have) if rank is None else rank
    xp = _array_module(*(x for p in have for x in p))
    zeros = (xp.zeros((*a0.shape[:-1], rank), a0.dtype), xp.zeros((*b0.shape[:-2], rank, b0.shape[-1]), b0.dtype))
    padded = [zeros if p is None else pad_rank(*p, rank) for p in pairs]
    return (xp.stack([a.astype(a0.dtype) for a, _ in padded]),
            xp.stack([b.astype(b0.dtype) for _, b in padded]))


def adapter_tree(layers: Mapping) -> tuple[dict, tuple[LoraTarget, ...]]:
    """{layer path: (a, b)} with every scale already folded into b -> (LoRA tree, targets): one exact
    pattern per layer ('^blocks/attn/qkv_x$') with alpha = rank, so every scale is 1."""
    tree, targets = {}, []
    for path, (a, b) in sorted(layers.items()):
        tree = _nested_set(tree, path, {"a": a, "b": b})
        rank = a.shape[-1]
        targets.append(LoraTarget(f"^{'/'.join(path)}$", rank=rank, alpha=float(rank)))
    return tree, tuple(targets)


def combine(loras: Sequence[tuple[Mapping, Sequence[LoraTarget], float]]):
    """Several (lora_tree, targets, strength) as ONE adapter: (lora_tree, targets).

    Per layer, the factors of every LoRA adapting it are concatenated along the rank axis with
    strength * alpha / r folded into b (numpy float32); the targets are exact per-layer patterns
    with alpha = rank. A layer adapted by only some LoRAs carries only their factors (the others
    add nothing). The result applies all of them in one forward pass (one compiled function).
    A layer no target of its LoRA matches, or factors of another shape than the other LoRAs' on
    that layer, raise ValueError."""
    parts: dict[tuple[str, ...], list] = {}
    for i, (tree, targets, strength) in enumerate(loras):
        for path, node in layers_of(tree):
            target = find_target(targets, "/".join(path))
            if target is None:
                raise ValueError(f"LoRA #{i}: layer {'/'.join(path)!r} matches none of its targets")
            a = np.asarray(node["a"], np.float32)
            b = np.asarray(node["b"], np.float32) * np.float32(strength * target.scale)
            prev = parts.setdefault(path, [])
            if prev and (prev[0][0].shape[:-1] != a.shape[:-1] or prev[0][1].shape[-1] != b.shape[-1]):
                raise ValueError(f"LoRA #{i}: layer {'/'.join(path)!r} has shape a {a.shape} b {b.shape}, "
                                 f"other LoRAs a {prev[0][0].shape} b {prev[0][1].shape}")
            prev.append((a, b))
    return adapter_tree({path: (np.concatenate([a for a, _ in ab], axis=-1),
                                np.concatenate([b for _, b in ab], axis=-2)) for path, ab in parts.items()})


def count(lora: Mapping) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(lora))
