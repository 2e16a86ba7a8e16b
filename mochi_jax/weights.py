"""Load converted weights (written by tools/convert_weights.py) into memory or straight into shardings."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

from mochi_jax.convert.common import read_metadata
from mochi_jax.models.dit import DiTConfig, stack_unrolled
from mochi_jax.models.layers import unstack_shardings


def load_tree(path, dtype=None, shardings=None):
    """Restore a converted checkpoint. `shardings`: a pytree of jax.sharding.Sharding matching the
    checkpoint (each process then reads only its shards); `dtype` casts floating leaves."""
    import orbax.checkpoint.experimental.v1 as ocp

    path = Path(path).absolute()
    meta = ocp.metadata(path).metadata

    def abstract(m, s=None):
        dt = m.dtype
        if dtype is not None and jnp.issubdtype(dt, jnp.floating):
            dt = jnp.dtype(dtype)
        return jax.ShapeDtypeStruct(m.shape, dt, sharding=s)

    if shardings is None:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree_util.tree_map(lambda _: one, meta)
    target = jax.tree_util.tree_map(abstract, meta, shardings)
    return ocp.load(path, target)


def load_dit(path, dtype=None, shardings=None, **overrides) -> tuple[DiTConfig, dict]:
    """(DiTConfig, params) from a converted DiT checkpoint, in the scanned layout.

    `shardings`: NamedShardings for the scanned params (e.g. FSDP); each process then reads only
    its shards and the blocks are stacked straight into them. `dtype` casts the weights;
    `overrides` set non-architecture config fields (compute_dtype, attention, remat, ...)."""
    meta = read_metadata(path)
    if meta.get("model") != "mochi_dit":
        raise ValueError(f"{path} is not a converted Mochi DiT checkpoint (metadata: {meta})")
    depth = int(meta["config"]["depth"])
    disk = unstack_shardings(shardings, "blocks", depth - 1) if shardings is not None else None
    params = stack_unrolled(load_tree(path, dtype=dtype, shardings=disk), depth, shardings)
    fields = dict(meta["config"], **overrides)
    leaf = jax.tree_util.tree_leaves(params)[0]
    fields.setdefault("param_dtype", jnp.dtype(leaf.dtype).name)
    return DiTConfig.from_dict(fields), params
