"""Base and LoRAs as one structure, rendered together.

All LoRAs are brought to one structure: the union of their adapted layers with ranks zero-padded
to the largest (exact: zero rows add nothing), strength * alpha / rank folded into b, the base a
zero adapter. `stack_adapters` stacks them on a leading variant axis and `denoise_variants` runs
ONE jitted step that vmaps the DiT over them, so base and LoRAs denoise in the same call from the
same noise (or, batched=False, each variant alone through sampling.denoise). Swapping LoRAs of
the same shapes never recompiles.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mochi_jax.checkpoints.lora_format import LoraFormatError
from mochi_jax.checkpoints.runs import expand_sweeps, load_lora_or_run, parse_loras
from mochi_jax.lib import sampling
from mochi_jax.models import lora as lora_lib
from mochi_jax.models.dit import DiTConfig, abstract_variables
from mochi_jax.models.lora import LoraTarget, layers_of


@dataclasses.dataclass
class Variant:
    """One column of the comparison. `layers`: {layer path: (a [.., in, r], b [.., r, out])} with
    strength * alpha / r folded into b; empty for the base."""
    name: str
    source: str | None = None
    strength: float = 1.0
    layers: dict = dataclasses.field(default_factory=dict)


def param_shapes(cfg: DiTConfig) -> dict:
    """The DiT's parameter tree as ShapeDtypeStructs (traced, nothing allocated)."""
    return abstract_variables(cfg)["params"]


def check_fits(tree, shapes, source) -> None:
    """Raise LoraFormatError naming `source` and the layer when a factor does not fit the base."""
    for path, node in layers_of(tree):
        name = "/".join(path)
        kernel = shapes
        for k in path:
            kernel = kernel.get(k, {}) if isinstance(kernel, dict) else {}
        kernel = kernel.get("kernel") if isinstance(kernel, dict) else None
        if kernel is None:
            raise LoraFormatError(f"{source}: LoRA layer {name!r} is not a Dense layer of the base model")
        a, b = np.shape(node["a"]), np.shape(node["b"])
        k = tuple(kernel.shape)
        if a[:-1] != k[:-1] or b[:-2] != k[:-2] or b[-1] != k[-1] or a[-1] != b[-2]:
            raise LoraFormatError(f"{source}: LoRA layer {name!r} has a {a} and b {b}, which do not fit the "
                                  f"base model's kernel {k}")


def load_variant(path, strength: float, dit_cfg: DiTConfig, shapes) -> Variant:
    """A LoRA file in any supported format, or a training run directory, checked against the base."""
    p = Path(path)
    tree, targets = load_lora_or_run(p, dit_cfg)
    check_fits(tree, shapes, p)
    combined, _ = lora_lib.combine([(tree, targets, strength)])
    name = p.stem if p.is_file() else p.name
    return Variant(name if strength == 1 else f"{name}@{strength:g}", str(p), strength,
                   {path: (node["a"], node["b"]) for path, node in layers_of(combined)})


def load_variants(spec: str, dit_cfg: DiTConfig) -> list[Variant]:
    """The base, then every LoRA of 'path[:strength],...' (a sweep's run directory: each of its LoRAs),
    each checked against the base, with unique names (a repeated name gets _2, _3, ...)."""
    shapes = param_shapes(dit_cfg)
    variants = [Variant("base")] + [load_variant(path, st, dit_cfg, shapes)
                                    for path, st in expand_sweeps(parse_loras(spec))]
    seen: dict[str, int] = {}
    for v in variants:
        seen[v.name] = seen.get(v.name, 0) + 1
        if seen[v.name] > 1:
            v.name = f"{v.name}_{seen[v.name]}"
    return variants


def stack_adapters(variants) -> tuple[dict, tuple[LoraTarget, ...]]:
    """All variants as one LoRA tree whose leaves have a leading variant axis K, and its targets
    (per-layer patterns, alpha = rank so the scale is 1). A layer a variant does not adapt, and
    ranks below the largest, are zeros: every variant computes exactly its own adapter
    (models/lora.py `stack_padded`, as a sweep stacks its LoRAs)."""
    paths = sorted({p for v in variants for p in v.layers})
    return lora_lib.adapter_tree({path: lora_lib.stack_padded([v.layers.get(path) for v in variants])
                                  for path in paths})


def variant_adapter(stacked, k: int):
    """Variant k's adapter out of `stack_adapters`' tree."""
    return lora_lib.take(stacked, k)


# ----------------------------------------------------------------------------- rendering

def variant_count(stacked, targets) -> int:
    """K, the variants of a `stack_adapters` tree (1 when no variant adapts anything: the base alone)."""
    return len(jax.tree_util.tree_leaves(stacked)[0]) if targets else 1


def denoise_variants(cfg: DiTConfig, params, stacked, targets, noise, cond, uncond, sigmas, guidance: float,
                     batched: bool = True):
    """Latents [K, B, ...] of the K variants of `stack_adapters`, all from the same noise [B, ...]:
    in one vmapped denoising loop (sampling.denoise with variants=K), or (batched=False) one
    variant after the other. Runs where `params` are (sampling.denoise)."""
    k_all = variant_count(stacked, targets)
    if not batched:
        return jnp.stack([sampling.denoise(cfg, params, noise, cond, uncond, sigmas, guidance,
                                           lora=(variant_adapter(stacked, k), targets)) for k in range(k_all)])
    return sampling.denoise(cfg, params, noise, cond, uncond, sigmas, guidance, lora=(stacked, targets),
                            variants=k_all)
