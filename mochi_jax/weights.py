"""Load converted weights (written by tools/convert_weights.py) into memory or straight into shardings."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

from mochi_jax.convert.common import read_metadata
from mochi_jax.models.dit import DiTConfig
from mochi_jax.models.layers import stack_layers, unstack_shardings


def load_tree(path, dtype=None, shardings=None):
    """Restore a converted checkpoint. `shardings`: a pytree of jax.sharding.Sharding matching the
    checkpoint (each process then reads only its shards), or one Sharding for every leaf (default:
    this process's first device); `dtype` casts floating leaves."""
    import orbax.checkpoint.experimental.v1 as ocp

    path = Path(path).absolute()
    meta = ocp.metadata(path).metadata

    def abstract(m, s=None):
        dt = m.dtype
        if dtype is not None and jnp.issubdtype(dt, jnp.floating):
            dt = jnp.dtype(dtype)
        return jax.ShapeDtypeStruct(m.shape, dt, sharding=s)

    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        one = shardings or jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree_util.tree_map(lambda _: one, meta)
    target = jax.tree_util.tree_map(abstract, meta, shardings)
    return ocp.load(path, target)


def load_model(path, model: str, cfg_cls, dtype=None, shardings=None, overrides=None, stack=None):
    """(config, params) from a checkpoint written by tools/convert_weights.py.

    `model`: the metadata's model name ('mochi_dit', ...), checked. `stack(arch) -> (name, n)`:
    the unrolled layers name_0 .. name_{n-1} on disk to stack for a scan, straight into
    `shardings` (given for the stacked layout). The config is the stored architecture plus
    `overrides`; param_dtype follows the loaded weights."""
    meta = read_metadata(path)
    if meta.get("model") != model:
        raise ValueError(f"{path} is not a converted {model} checkpoint (metadata: {meta})")
    if stack is None:
        params = load_tree(path, dtype=dtype, shardings=shardings)
    else:
        name, n = stack(meta["config"])
        disk = unstack_shardings(shardings, name, n) if shardings is not None else None
        params = stack_layers(load_tree(path, dtype=dtype, shardings=disk), name, n, shardings)
    fields = dict(meta["config"], **(overrides or {}))
    fields.setdefault("param_dtype", jnp.dtype(jax.tree_util.tree_leaves(params)[0].dtype).name)
    return cfg_cls.from_dict(fields), params


def dit_config(path, **overrides) -> DiTConfig:
    """The DiTConfig of a converted checkpoint, from its metadata (no weights are read), plus `overrides`."""
    try:
        arch = read_metadata(path)["config"]
    except Exception as e:
        raise ValueError(f"dit: {path} is not a converted DiT checkpoint ({type(e).__name__}: {e})") from e
    return DiTConfig.from_dict({**arch, **overrides})


def load_dit(path, dtype=None, shardings=None, **overrides) -> tuple[DiTConfig, dict]:
    """(DiTConfig, params) from a converted DiT checkpoint, in the scanned layout.

    `shardings`: NamedShardings for the scanned params (e.g. FSDP); each process then reads only
    its shards and the blocks are stacked straight into them. `dtype` casts the weights;
    `overrides` set non-architecture config fields (compute_dtype, attention, remat, ...)."""
    return load_model(path, "mochi_dit", DiTConfig, dtype, shardings, overrides,
                      stack=lambda arch: ("blocks", int(arch["depth"]) - 1))


def save_model(path, params, model: str, arch: dict, unstack=(), dtype=None, overwrite=False,
               progress=False, extra_metadata=None):
    """Write `params` as a checkpoint `load_model` reads: the layout tools/convert_weights.py writes
    (orbax, custom metadata {'model', 'config': arch}). `unstack`: [(path, n), ...] of scanned layer
    stacks to write unrolled, e.g. [('blocks', 47)] or [(('vision', 'blocks'), 12)] ->
    blocks_0 .. blocks_46; `dtype` casts floating leaves. Used for merged LoRA checkpoints and the
    demo's random tiny models; appears atomically like a conversion."""
    import numpy as np
    from flax import traverse_util

    from mochi_jax.convert.common import Leaf, write

    stacks = {(p,) if isinstance(p, str) else tuple(p): n for p, n in unstack}
    flat = {}
    for p, x in traverse_util.flatten_dict(params).items():
        prefix = next((q for q in stacks if p[:len(q)] == q), None)
        if prefix is None:
            flat[p] = (x, None)
            continue
        for i in range(stacks[prefix]):
            flat[prefix[:-1] + (f"{prefix[-1]}_{i}",) + p[len(prefix):]] = (x, i)

    def build(x, i):
        return lambda _src: np.asarray(x if i is None else x[i])

    leaves = [Leaf(p, tuple(x.shape[1:] if i is not None else x.shape), (), build(x, i))
              for p, (x, i) in flat.items()]
    meta = {"model": model, "config": arch, **(extra_metadata or {})}
    np_dtype = np.dtype(jnp.dtype(dtype if dtype is not None else jax.tree_util.tree_leaves(params)[0].dtype))
    return write(leaves, None, path, np_dtype, meta, overwrite=overwrite, progress=progress)
