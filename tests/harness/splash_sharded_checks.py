"""Run by tests/test_splash.py in a subprocess with 8 CPU devices (XLA_FLAGS must be set before jax is
imported): attention='splash' on one device and under a mesh (shard_map over batch and heads) against
attention='xla' on one device, for the attention op (output and q/k/v gradients) and the whole DiT
(output and LoRA gradients). Prints one JSON line of relative errors; the test asserts on them."""

import os
import sys

from simulated import cpu_devices

cpu_devices(8)

import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
from test_splash import attention_case, dit_case, max_rel  # noqa: E402

from mochi_jax.models import sharding  # noqa: E402

assert len(jax.devices()) == 8
# heads (4) split over sequence x tensor in both; the batch (2) over data / fsdp.
MESHES = {"data2_seq2_tensor2": dict(data=2, sequence=2, tensor=2), "fsdp2_seq4": dict(fsdp=2, sequence=4)}
DIT_MESH = "data2_seq2_tensor2"
# how the shard_map's q operand is split in the lowered program (batch axes, heads axes)
Q_SPLIT = {"data2_seq2_tensor2": '[{"data"}, {}, {"sequence", "tensor"}, {}]',
           "fsdp2_seq4": '[{"fsdp"}, {}, {"sequence"}, {}]'}


def sharded_call(mesh, fn, *args):
    """fn jitted under the mesh (activation constraints and the shard_map active): array inputs split
    over the batch axes, pytrees (the LoRA) replicated."""
    put = [jax.device_put(a, NamedSharding(mesh, P())) if isinstance(a, dict)
           else jax.device_put(a, sharding.batch_sharding(mesh, np.ndim(a))) for a in args]
    with sharding.activate(mesh):
        lowered = jax.jit(fn).lower(*put)
        out = lowered.compile()(*put)
    return jax.device_get(out), lowered.as_text()


def errors(got, want):
    return [max_rel(a, b) for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want))]


def main():
    one = jax.devices()[0]
    results = {}
    op_fn, op_args = attention_case(block=128, heads=4)
    dit_fn, dit_args = dit_case(heads=4)
    with jax.default_device(one):
        op_ref = jax.device_get(jax.jit(op_fn("xla"))(*op_args))
        dit_ref = jax.device_get(jax.jit(dit_fn("xla"))(*dit_args))
        # the whole DiT with splash on one device (here rather than in the test process: one model
        # init and one xla compile fewer)
        results["one_device"] = {"dit": errors(jax.jit(dit_fn("splash"))(*dit_args), dit_ref)}
    for name, sizes in MESHES.items():
        mesh = sharding.make_mesh(sizes)
        op, text = sharded_call(mesh, op_fn("splash"), *op_args)
        results[name] = {"attention": errors(op, op_ref),
                         "shard_map": "sdy.manual_computation" in text and Q_SPLIT[name] in text}
        if name == DIT_MESH:  # the DiT once: it costs most of this script's time
            dit, _ = sharded_call(mesh, dit_fn("splash"), *dit_args)
            results[name]["dit"] = errors(dit, dit_ref)
    print("RESULT " + json.dumps(results))


if __name__ == "__main__":
    main()
