"""A command's compiled program as data: the jitted function a command calls, with abstract inputs
that carry the shardings the command gives its real inputs.

Each program has one owner, the library module that runs it for real, and one builder there:

    training.train_program / sweep.training_parts   the training step (one LoRA or a sweep)
    sampling.sampler_program                        one Euler step of the sampler
    placement.vae_encode_program / t5_program       prepare's VAE encode and T5 batch

The commands call what the builder returns; the fit check (`mochi_jax.aot`) lowers the same
function with the abstract inputs and reads the compiler's memory (`memory`), so what is measured is
what runs. `remat='auto'` (mochi_jax/models/remat.py) measures training steps the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Callable

import jax
import numpy as np

from mochi_jax.models import sharding as sharding_lib


@dataclasses.dataclass
class Program:
    what: str  # 'train step', 'sampler step', 'VAE encode', 'T5 encode'
    fn: Callable  # the jax.jit-wrapped function the command calls
    args: tuple  # its positional inputs: trees of ShapeDtypeStructs carrying shardings
    inputs: dict  # report name -> the part of `args` it names (bytes per device are reported per name)
    kwargs: dict = dataclasses.field(default_factory=dict)  # static keyword arguments
    mesh: object = None  # a Mesh the trace sees (sharding.activate), for the model's activation annotations
    rules: tuple = sharding_lib.RULES  # the logical-axis rules the trace sees with the mesh
    layout: dict = dataclasses.field(default_factory=dict)  # mesh axis -> size, as reported ({} = one device)
    details: list = dataclasses.field(default_factory=list)  # report lines: the model, the batch, ...
    resident: dict = dataclasses.field(default_factory=dict)  # name -> a tree on the device the program never reads
    remat: str = ""  # a training step's remat setting (a policy or a groups string)

    def lower(self):
        """jax.stages.Lowered of the function on the abstract inputs."""
        ctx = sharding_lib.activate(self.mesh, self.rules) if self.mesh is not None else contextlib.nullcontext()
        with ctx:
            return self.fn.lower(*self.args, **self.kwargs)


def abstract(tree, shardings):
    """ShapeDtypeStructs like `tree` (arrays or ShapeDtypeStructs), each with its sharding: one
    Sharding for every leaf, or a tree of them like `tree`."""
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings), tree)
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def mesh_layout(mesh) -> dict:
    """{axis: size} of a mesh, as a report prints it."""
    return {k: int(v) for k, v in mesh.shape.items()}


def device_bytes(tree, memory: str = "device") -> int:
    """Bytes of one device's shards of a tree of ShapeDtypeStructs carrying shardings, in device
    memory (memory='device') or in pinned host memory (memory='pinned_host')."""
    total = 0
    for x in jax.tree_util.tree_leaves(tree):
        kind = getattr(getattr(x, "sharding", None), "memory_kind", None) or "device"
        if (kind == "pinned_host") != (memory == "pinned_host"):
            continue
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += math.prod(shape) * np.dtype(x.dtype).itemsize
    return total


def memory(compiled, resident_bytes: int = 0) -> dict:
    """The compiler's memory of a compiled program, per device, in bytes: arguments, outputs, alias
    (outputs written into donated arguments), temporaries, code, host (pinned host memory: weights
    streamed block by block, offloaded activations) and total = arguments + outputs - alias +
    temporaries + code + `resident_bytes` (what sits on the device without being an argument)."""
    m = compiled.memory_analysis()
    out = {"argument": int(m.argument_size_in_bytes), "output": int(m.output_size_in_bytes),
           "alias": int(m.alias_size_in_bytes), "temp": int(m.temp_size_in_bytes),
           "code": int(m.generated_code_size_in_bytes),
           "host": sum(int(getattr(m, f"host_{k}_size_in_bytes", 0)) for k in ("argument", "output", "temp"))}
    out["total"] = (out["argument"] + out["output"] - out["alias"] + out["temp"] + out["code"] + resident_bytes)
    return out
