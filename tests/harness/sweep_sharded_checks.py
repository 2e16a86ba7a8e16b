"""Run by tests/test_sweep.py in a subprocess with 8 CPU devices: a sweep of three LoRAs (mixed ranks
and targets) on a mesh against one device, and the compiled step's arguments (the base's shards
once). Prints one JSON line; the test asserts on it."""

import sys

from simulated import cpu_devices

cpu_devices(8)

import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from mochi_jax.configs import lora as lora_config  # noqa: E402
from mochi_jax.lib import sweep as sweep_lib  # noqa: E402
from mochi_jax.models import sharding  # noqa: E402

from sharded_checks import CFG, batch, params, rel  # noqa: E402

assert len(jax.devices()) == 8
MESH = dict(fsdp=2, sequence=2, tensor=2)  # every kind of split at once (data is the batch's, as fsdp's)


def config(variants):
    cfg = lora_config.get_config()
    cfg.optim.update(dict(lr=1e-2, warmup_steps=0, schedule="constant"))
    cfg.sweep.variants = variants
    return cfg


THREE = config({"a": {"lora": {"qkv": {"rank": 2, "alpha": 4.0}, "out": {"rank": 0}}},
                "b": {"lora": {"qkv": {"rank": 4}, "out": {"rank": 4}}, "optim": {"lr": 3e-3}},
                "c": {"lora": {"qkv": {"rank": 8}, "out": {"rank": 4}}, "seed": 5}})


def parts(cfg, mesh_sizes):
    sw = sweep_lib.from_config(cfg, CFG)
    model, opts = sweep_lib.model_of(sw, CFG), sweep_lib.optimizers(sw)
    if mesh_sizes is None:
        return sw, model, opts, None, None
    mesh = sharding.make_mesh(mesh_sizes)
    return sw, model, opts, mesh, sweep_lib.shardings(sw, model, opts, mesh)


def run(cfg, mesh_sizes, host_params, data):
    sw, model, opts, mesh, sh = parts(cfg, mesh_sizes)
    if mesh is None:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        state, p, put = sweep_lib.init_state(sw, CFG, opts, cfg.seed, one), jax.device_put(host_params, one), dict
    else:
        state = sweep_lib.init_state(sw, CFG, opts, cfg.seed, sh["state"])
        p = jax.device_put(host_params, sh["params"])
        put = lambda b: {k: jax.device_put(v, sh["batch"][k]) for k, v in b.items()}  # noqa: E731
    step = sweep_lib.make_step(sw, model, opts, "normalized", 0.3, mesh, sh)
    losses = []
    for b in data:
        state, out = step(state, p, put(b))
        losses.append(np.asarray(out["loss"]).tolist())
    return losses, jax.tree_util.tree_map(np.asarray, state["lora"]), state


def main():
    out = {}
    hp = params()
    data = [batch(seed=s) for s in range(2)]
    ref_losses, ref_lora, _ = run(THREE, None, hp, data)
    out["single"] = {"loss": ref_losses}
    losses, lora, state = run(THREE, MESH, hp, data)
    out["mesh"] = {"loss": losses, "lora_rel": rel(lora, ref_lora),
                   "lora_sharding": str(state["lora"]["blocks"]["attn"]["qkv_x"]["a"].sharding.spec)}

    # the compiled step's memory per device: the base's shards are one argument, whatever the variants
    sw, model, opts, mesh, sh = parts(THREE, MESH)
    state = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                   sweep_lib.abstract_state(sw, model, opts), sh["state"])
    ps = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                jax.eval_shape(params), sh["params"])
    b = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh["batch"][k]) for k, v in data[0].items()}
    with sharding.activate(mesh):
        m = sweep_lib.make_step(sw, model, opts, "normalized", 0.3, mesh, sh).jitted.lower(
            state, ps, b).compile().memory_analysis()
    shard = lambda tree: sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize  # noqa: E731
                             for x in jax.tree_util.tree_leaves(tree))
    out["memory"] = {"argument_bytes": m.argument_size_in_bytes, "temp_bytes": m.temp_size_in_bytes,
                     "params_bytes": shard(ps), "state_bytes": shard(state), "batch_bytes": shard(b)}
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
