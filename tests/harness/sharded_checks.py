"""Run by tests/test_sharded_train.py in a subprocess with 8 CPU devices (XLA_FLAGS must be set
before jax is imported): two training steps on each mesh of MESHES against one device, the refusal of
heads the mesh does not divide, the compiled step's per-device argument bytes at fsdp 1, 2, 4 and 8,
and a checkpoint restored onto other meshes. Prints one JSON line of measurements; the test asserts on
them. Each distinct step program compiles once (seconds each on the CPU): the memory check and the
checkpoint reuse the meshes' runs."""

import sys

from simulated import cpu_devices

cpu_devices(8)

import json  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from compiles import compiled_functions  # noqa: E402
from host_weights import random_like  # noqa: E402
from mochi_jax.lib import training  # noqa: E402
from mochi_jax.models import sharding  # noqa: E402
from mochi_jax.models import lora as lora_lib  # noqa: E402
from mochi_jax.models.dit import DiTConfig, MochiDiT, abstract_variables  # noqa: E402

assert len(jax.devices()) == 8
CFG = DiTConfig(depth=3, num_heads=4, head_dim=8, text_width=24, t5_dim=16, time_embed_dim=32,
                param_dtype="float32", compute_dtype="float32", remat="full")
TARGETS = lora_lib.targets_from_config(
    {k: dict(v, rank=4, alpha=8.0) for k, v in lora_lib.REFERENCE_TARGETS.items()})
OPTIM = ml_collections.ConfigDict(dict(lr=1e-2, weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8, warmup_steps=0,
                                       schedule="constant", decay_steps=10, grad_clip=0.0, grad_accum=1))
# The clips (`batch`) have 2 * 3 * 3 = 18 visual tokens: 'sequence' 2 splits them evenly (9 a device),
# 'sequence' 4 does not (5, 5, 5, 3: padded). One compiled program per mesh serves every check that
# needs a step on it: the runs against one device, the compiled step's memory, the checkpoint's state.
MESHES = {"data8": dict(data=8), "data2_fsdp4": dict(data=2, fsdp=4), "fsdp2_seq4": dict(fsdp=2, sequence=4),
          "data4_seq2": dict(data=4, sequence=2)}
# fsdp -> the mesh of the memory check: data x fsdp, or sequence x fsdp, over the 8 devices
MEMORY = {1: "data8", 2: "fsdp2_seq4", 4: "data2_fsdp4", 8: "fsdp8"}


def batch(b=8, t=2, h=6, w=6, L=6, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.zeros((b, L), bool)
    for i in range(b):
        mask[i, :1 + i % L] = True  # padding differs per sample
    return {"mean": rng.standard_normal((b, 12, t, h, w)).astype(np.float32),
            "logvar": rng.uniform(-3, -1, (b, 12, t, h, w)).astype(np.float32),
            "t5_feats": rng.standard_normal((b, L, CFG.t5_dim)).astype(np.float32), "t5_mask": mask}


def params():
    """Random DiT weights, as numpy (placed on each mesh from the host: a jax array would be sliced by
    programs per leaf)."""
    shapes = abstract_variables(CFG)["params"]
    p = random_like(shapes, 3)
    p["pos_frequencies"] = (0.3 * np.random.default_rng(4).standard_normal(shapes["pos_frequencies"].shape)
                            ).astype(np.float32)
    return p


def run(mesh_sizes, host_params, data, steps=2):
    """Two training steps; returns (losses, grad norms, final LoRA as numpy, final state, the step)."""
    model = MochiDiT(CFG, TARGETS)
    opt = training.make_optimizer(OPTIM)
    if mesh_sizes is None:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        state = training.init_state(model, opt, 0, one)
        p = jax.device_put(host_params, one)
        step = training.make_train_step(model, opt, "normalized", 0.3)
        put = lambda b: b  # noqa: E731
    else:
        mesh = sharding.make_mesh(mesh_sizes)
        sh = training.train_shardings(model, opt, mesh)
        state = training.init_state(model, opt, 0, sh["state"])
        p = jax.device_put(host_params, sh["params"])
        step = training.make_train_step(model, opt, "normalized", 0.3, mesh, sh)
        put = lambda b: {k: jax.device_put(v, sh["batch"][k]) for k, v in b.items()}  # noqa: E731
    losses, norms = [], []
    for i in range(steps):
        state, out = step(state, p, put(data[i]))
        losses.append(float(out["loss"]))
        norms.append(float(out["grad_norm"]))
    return losses, norms, jax.tree_util.tree_map(np.asarray, state["lora"]), state, step


def rel(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    num = sum(float(np.sum((np.float64(x) - y) ** 2)) for x, y in zip(la, lb))
    den = sum(float(np.sum(np.float64(y) ** 2)) for y in lb)
    return (num / den) ** 0.5


def tokens(clip):
    """Visual tokens per video: t * (h / p) * (w / p)."""
    _, _, t, h, w = clip["mean"].shape
    return t * (h // CFG.patch_size) * (w // CFG.patch_size)


def shard_bytes(abstract, shardings):
    """Bytes of one device's shards of a tree of arrays placed with a tree of shardings."""
    return sum(int(np.prod(sh.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
               for x, sh in zip(jax.tree_util.tree_leaves(abstract), jax.tree_util.tree_leaves(shardings)))


def main():
    out = {}
    hp = params()
    data = [batch(seed=s) for s in range(2)]  # two steps' batches
    losses, norms, ref_lora, _, _ = run(None, hp, data)
    out["single"] = {"loss": losses, "grad_norm": norms}
    runs = {}  # mesh -> (final state, step), reused below
    for name, sizes in MESHES.items():
        losses, norms, lora, state, step = run(sizes, hp, data)
        runs[name] = state, step
        out[name] = {"loss": losses, "grad_norm": norms, "lora_rel": rel(lora, ref_lora), "tokens": tokens(data[0]),
                     "sequence": sizes.get("sequence", 1),
                     "lora_kernel_sharding": str(state["lora"]["blocks"]["attn"]["qkv_x"]["a"].sharding.spec)}

    # heads must divide sequence x tensor (4 heads over 8): a clear error
    try:
        run(dict(sequence=8), hp, [batch(b=1)], steps=1)
        out["heads_error"] = "no error"
    except ValueError as e:
        out["heads_error"] = str(e)

    # per-device parameter bytes of the compiled step fall as 1 / fsdp: the steps run above (their
    # programs reused, not compiled again) and fsdp 8 alone
    model = MochiDiT(CFG, TARGETS)
    opt = training.make_optimizer(OPTIM)
    ps = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), hp)
    state = jax.eval_shape(lambda: training.init_state(model, opt, 0, jax.sharding.SingleDeviceSharding(jax.devices()[0])))
    b = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in data[0].items()}
    mem = {}
    for f, name in MEMORY.items():
        sizes = MESHES.get(name, dict(fsdp=8))
        mesh = sharding.make_mesh(sizes)
        sh = training.train_shardings(model, opt, mesh)
        step = runs[name][1] if name in runs else training.make_train_step(model, opt, "normalized", 0.3, mesh, sh)
        # the arguments as the step takes them (placed as train_shardings says, as in the runs)
        args = [jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh[k])
                for tree, k in ((state, "state"), (ps, "params"), (b, "batch"))]
        with sharding.activate(mesh), compiled_functions() as names:
            compiled = step.jitted.lower(*args).compile()
        mem[f] = {"mesh": name, "fsdp": mesh.shape["fsdp"],
                  "argument_bytes": compiled.memory_analysis().argument_size_in_bytes,
                  "batch_shard_bytes": shard_bytes(b, sh["batch"]), "param_shard_bytes": shard_bytes(ps, sh["params"]),
                  "param_bytes": shard_bytes(ps, jax.tree_util.tree_map(lambda _: sh["replicated"], ps)),
                  "compiled_again": len(names)}
    out["memory"] = mem

    # a checkpoint written on a (2, 4) mesh (the state after the data 2 / fsdp 4 run's two steps)
    # restores on (4, 2) and on one device with equal values
    import orbax.checkpoint as ocp

    state = runs["data2_fsdp4"][0]
    d = tempfile.mkdtemp()
    mngr = ocp.CheckpointManager(d)
    mngr.save(1, args=ocp.args.StandardSave(state))
    mngr.wait_until_finished()
    saved = jax.tree_util.tree_map(np.asarray, state)
    restored = {}
    for name, target in (("fsdp2_data4", sharding.make_mesh(dict(data=4, fsdp=2))), ("single", None)):
        if target is None:
            shard = jax.tree_util.tree_map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), state)
        else:
            shard = training.train_shardings(MochiDiT(CFG, TARGETS), training.make_optimizer(OPTIM), target)["state"]
        abstract = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shard)
        got = mngr.restore(1, args=ocp.args.StandardRestore(abstract))
        same = all(np.array_equal(np.asarray(a), b) for a, b in
                   zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(saved)))
        placed = all(a.sharding == s for a, s in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(shard)))
        restored[name] = {"equal": same, "placed": placed}
    out["restore"] = restored
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
