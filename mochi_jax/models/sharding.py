"""Sharding as data: a device mesh from config axes, and logical-axis rules that map the names
on every parameter dimension and activation annotation to mesh axes.

Mesh axes (any may have size 1):
  data      pure data parallelism: the batch is split, weights are replicated
  fsdp      the batch is split AND the frozen weights, LoRA factors and optimizer state are
            sharded along their model dimension ('embed'); XLA all-gathers each layer's weights
            when it runs (ZeRO-3 / FSDP)
  sequence  visual tokens are split between devices (context parallelism for long clips). In
            attention the layout switches to heads-split / tokens-whole with an all-to-all
            (DeepSpeed-Ulysses), so every device sees every key of its heads: exact, and the
            number of heads must be divisible by the axis size.
  tensor    heads and MLP columns are split (Megatron-style tensor parallelism)

    mesh = make_mesh({"data": 2, "fsdp": -1})           # -1: whatever devices are left
    shardings = param_shardings(dit.logical_axes(cfg, targets)["params"], abstract_params, mesh)
    with activate(mesh):                                 # activation annotations inside jit
        ...
"""

from __future__ import annotations

import contextlib
import math
from typing import Mapping

import flax.linen as nn
import jax
import numpy as np
from flax.core.spmd import get_logical_axis_rules
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "sequence", "tensor")

# logical name -> mesh axis (or axes); every name a model declares must be here (`spec` refuses
# others). Parameters (named where each is created, see models/layers.py `declared_axes`): 'embed'
# (model width), 'heads' / 'mlp' (the expanded side of projections), 'layers' (the scan axis, never
# split), 'norm', 'vocab', 'buckets' (small, replicated). Activations: 'batch', 'seq' (visual
# tokens), 'act_heads' (heads inside attention: Ulysses over 'sequence').
RULES = (
    ("batch", ("data", "fsdp")),
    ("seq", "sequence"),
    ("act_heads", ("sequence", "tensor")),
    ("act_embed", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    ("vocab", None),
    ("buckets", None),
)


def make_mesh(sizes: Mapping[str, int], devices=None) -> Mesh:
    """A Mesh with axes AXES from {axis: size}; missing axes have size 1, one axis may be -1 (the rest)."""
    devices = list(jax.devices() if devices is None else devices)
    unknown = set(sizes) - set(AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; the axes are {AXES}")
    shape = [int(sizes.get(a, 1)) for a in AXES]
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh sizes {dict(sizes)}: each axis is a positive size, at most one is -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"mesh {dict(sizes)} does not divide the {len(devices)} devices")
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise ValueError(f"mesh {dict(zip(AXES, shape))} needs {math.prod(shape)} devices, "
                         f"there are {len(devices)}")
    return Mesh(np.asarray(devices).reshape(shape), AXES)


def _mesh_axes(name, table, mesh) -> tuple[str, ...]:
    """The mesh axes (of size > 1) a logical name maps to under the rules `table`."""
    axes = table.get(name) if name is not None else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return tuple(a for a in axes if mesh.shape[a] > 1)


def _entry(axes):
    return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)


def spec(names, shape, mesh: Mesh, rules=RULES) -> P:
    """PartitionSpec for one array: each logical name's mesh axes, dropping any axis already used
    by an earlier dimension or whose size does not divide the dimension (then it stays replicated)."""
    table = dict(rules)
    unknown = [n for n in names if n is not None and n not in table]
    if unknown:
        raise ValueError(f"logical axis names {unknown} have no sharding rule; add them to the rules "
                         f"(mochi_jax/models/sharding.py RULES)")
    used, out = set(), []
    for name, dim in zip(names, shape):
        keep = []
        for a in _mesh_axes(name, table, mesh):
            if a in used or dim % (math.prod(mesh.shape[k] for k in keep) * mesh.shape[a]):
                continue
            keep.append(a)
        used.update(keep)
        out.append(_entry(keep))
    return P(*out)


def param_shardings(axes_tree, shapes_tree, mesh: Mesh, rules=RULES):
    """NamedShardings for a tree of arrays / ShapeDtypeStructs, from a matching tree of logical names."""
    return jax.tree_util.tree_map(
        lambda names, x: NamedSharding(mesh, spec(names, x.shape, mesh, rules)), axes_tree, shapes_tree,
        is_leaf=lambda x: isinstance(x, tuple))


HOST_MEMORY = "pinned_host"  # where DiTConfig.weights_on_host keeps the stacked block weights


def host_sharding(s: NamedSharding) -> NamedSharding:
    """`s` in pinned host memory. Compile-only devices (the fit check's GPU targets) list no memories,
    so their NamedSharding drops the kind; there the sharding is stated on the mesh's abstract form,
    which keeps it and compiles to the same program."""
    h = s.with_memory_kind(HOST_MEMORY)
    if h.memory_kind != HOST_MEMORY:
        h = NamedSharding(s.mesh.abstract_mesh, s.spec, memory_kind=HOST_MEMORY)
    return h


def stacked(shardings):
    """Shardings for arrays with one more leading axis (e.g. several LoRAs stacked), kept whole on
    every device: each device holds every stacked copy of its slice."""
    return jax.tree_util.tree_map(lambda s: NamedSharding(s.mesh, P(None, *s.spec), memory_kind=s.memory_kind),
                                  shardings)


def replicated_like(x):
    """A sharding that places a whole copy of an array on every device `x` lives on."""
    s = x.sharding
    return NamedSharding(s.mesh, P()) if isinstance(s, NamedSharding) else s


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) dimension over the axes of the 'batch' rule (data x fsdp), the rest replicated."""
    return NamedSharding(mesh, P(dict(RULES)["batch"], *([None] * (ndim - 1))))


@contextlib.contextmanager
def activate(mesh: Mesh, rules=RULES):
    """Within this context, jit traces see the mesh and the rules, so the models' activation
    annotations (`constrain`) become sharding constraints. Outside it they are no-ops (one device)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def constrain(x, names):
    """Annotate activation `x` with logical names (one per dimension). A no-op outside `activate`
    (one device); inside, a sharding constraint. Visual tokens may split unevenly (XLA pads the
    last shard); the batch and the attention heads must divide their mesh axes, or this raises
    saying which."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    table = dict(get_logical_axis_rules())
    out = []
    for name, dim in zip(names, x.shape):
        axes = _mesh_axes(name, table, mesh)
        size = math.prod(mesh.shape[a] for a in axes)
        if dim % size and name != "seq":
            what = {"act_heads": "attention heads", "batch": "the batch"}.get(name, name)
            raise ValueError(f"{what}: {dim} is not divisible by the mesh axes {axes} of total size {size}")
        out.append(_entry(axes))
    return jax.lax.with_sharding_constraint(x, P(*out))


def like_tree_shardings(tree, sub, sub_shardings, replicated):
    """Shardings for a tree (e.g. an optax state) whose subtrees shaped like `sub` (e.g. Adam's mu
    and nu, shaped like the LoRA) take `sub_shardings`, and every other leaf `replicated`."""
    target = jax.tree_util.tree_structure(sub)

    def is_sub(x):
        return jax.tree_util.tree_structure(x) == target

    return jax.tree_util.tree_map(lambda x: sub_shardings if is_sub(x) else replicated, tree, is_leaf=is_sub)
