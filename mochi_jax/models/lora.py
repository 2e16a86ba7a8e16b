"""LoRA as a separate pytree.

A `LoraTarget` names a set of Dense layers by a regular expression on their module path
(e.g. 'blocks/attn/qkv_x', 'last_block/attn/proj_x'; `re.search` semantics) and gives their
rank, alpha and dropout. Each matching Dense owns variables `a` [in, r] and `b` [r, out]
in the 'lora' collection, at the same path as its `kernel` in 'params'. Stacked (scanned)
blocks carry a leading layer axis on both.

    y = x @ W + b + (alpha / r) * dropout(x) @ a @ b
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp


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


def count(lora: Mapping) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(lora))
