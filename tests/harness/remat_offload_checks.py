"""Block inputs in host memory ('offload:residual', 'offload:residual_bf16'; mochi_jax/models/remat.py):
what tests/test_remat_offload.py checks in a subprocess, because the device count (or the
compile-only TPU) must be set before jax is imported, and the helpers it shares with it.

    python remat_offload_checks.py mesh   8 CPU devices: the LoRA loss and gradient of a tiny DiT (three
                                          stacked blocks) under 'full', 'offload:residual' (nn.scan and
                                          remat groups) and 'offload:residual_bf16' on a data 2 x fsdp 2 x
                                          sequence 2 mesh, and where the jaxpr keeps the block inputs
    python remat_offload_checks.py tpu    the tiny DiT's LoRA gradient compiled for a TPU v5e (compile only,
                                          with libtpu): the memory spaces of the buffers of the stacked block
                                          inputs ([blocks, B, N, width]; S(5) is host memory) and the compiled
                                          memory analysis (four stacked blocks: 'full:2,offload:residual:2'
                                          has stacks of two, unlike any one block's [1, B, N, width] arrays)

Each prints one line, RESULT <json>; the test asserts on it.
"""

import sys

if __name__ == "__main__":  # before jax is imported
    if sys.argv[1:] == ["mesh"]:
        from simulated import cpu_devices

        cpu_devices(8)
    elif sys.argv[1:] == ["tpu"]:
        from mochi_jax.aot import targets as _targets

        _targets.compile_only_environment()
    else:
        raise SystemExit("usage: remat_offload_checks.py mesh|tpu")

import json  # noqa: E402
import re  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

# ----------------------------------------------------------------------------- shared with the test


def _sub_jaxprs(params):
    for value in params.values():
        for x in value if isinstance(value, (tuple, list)) else (value,):
            j = getattr(x, "jaxpr", x)
            if hasattr(j, "eqns"):
                yield j


def _scans(jaxpr):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            yield eqn
        for sub in _sub_jaxprs(eqn.params):
            yield from _scans(sub)


def stacked(closed_jaxpr, shape) -> list[tuple]:
    """What the scans of a jaxpr (nested ones included) stack of arrays of `shape`: (steps, dtype name,
    'host' | 'device') of every stacked output (ys) of shape [steps, *shape]. In a gradient's jaxpr,
    with `shape` that of a block input, [B, N, width] or [B, L, text_width]: what the forward scans over
    the blocks keep of their inputs for the backward pass, and where."""
    out = []
    for eqn in _scans(closed_jaxpr.jaxpr):
        for v in eqn.outvars[eqn.params["num_carry"]:]:
            a = v.aval
            if tuple(a.shape[1:]) == tuple(shape):
                out.append((int(a.shape[0]), a.dtype.name,
                            "host" if getattr(a, "memory_space", None) == jax.memory.Space.Host else "device"))
    return out


def rel(a, b) -> float:
    """Relative L2 difference of two pytrees of arrays (all leaves together)."""
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    num = sum(float(np.sum((np.float64(x) - np.float64(y)) ** 2)) for x, y in zip(la, lb))
    den = sum(float(np.sum(np.float64(y) ** 2)) for y in lb)
    return (num / den) ** 0.5


def max_abs(a, b) -> float:
    return max(float(np.max(np.abs(np.float64(x) - np.float64(y))))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


# ----------------------------------------------------------------------------- the subprocess checks


def _model_and_data():
    from host_weights import random_like
    from mochi_jax.lib import training
    from mochi_jax.models import lora as lora_lib
    from mochi_jax.models.dit import DiTConfig, MochiDiT, abstract_variables

    cfg = DiTConfig(depth=4, num_heads=4, head_dim=8, text_width=24, t5_dim=16, time_embed_dim=32,
                    param_dtype="float32", compute_dtype="float32", remat="full")
    targets = lora_lib.targets_from_config(
        {k: dict(v, rank=4, alpha=8.0) for k, v in lora_lib.REFERENCE_TARGETS.items()})
    shapes = abstract_variables(cfg, targets)
    params = random_like(shapes["params"], 3)
    params["pos_frequencies"] = (0.3 * np.random.default_rng(4).standard_normal(
        shapes["params"]["pos_frequencies"].shape)).astype(np.float32)
    rng = np.random.default_rng(5)
    lora = jax.tree_util.tree_map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype), shapes["lora"])
    b, t, h, w, L = 4, 2, 6, 6, 6  # 18 visual tokens a clip: 'sequence' 2 splits them evenly
    mask = np.zeros((b, L), bool)
    for i in range(b):
        mask[i, :1 + i % L] = True
    batch = {"mean": rng.standard_normal((b, 12, t, h, w)).astype(np.float32),
             "logvar": rng.uniform(-3, -1, (b, 12, t, h, w)).astype(np.float32),
             "t5_feats": rng.standard_normal((b, L, cfg.t5_dim)).astype(np.float32), "t5_mask": mask}
    noise = jax.tree_util.tree_map(np.asarray, training.draw_noise(jax.random.PRNGKey(7), batch, 0.3))
    return cfg, targets, params, lora, batch, noise, MochiDiT


def mesh_checks() -> dict:
    import dataclasses

    import ml_collections

    from mochi_jax.lib import training
    from mochi_jax.models import sharding

    assert len(jax.devices()) == 8
    cfg, targets, params, lora, batch, noise, MochiDiT = _model_and_data()
    optim = ml_collections.ConfigDict(dict(lr=1e-2, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, warmup_steps=0,
                                           schedule="constant", decay_steps=10, grad_clip=0.0, grad_accum=1))
    b, L = batch["t5_mask"].shape
    _, _, t, h, w = batch["mean"].shape
    tokens = t * (h // cfg.patch_size) * (w // cfg.patch_size)

    def run(remat, groups, mesh_sizes):
        model = MochiDiT(dataclasses.replace(cfg, remat=remat, remat_groups=groups), targets)
        fn = jax.value_and_grad(lambda lo, p, b, nz: training.flow_loss(model, p, lo, b, nz))
        mesh = sharding.make_mesh(mesh_sizes)
        sh = training.train_shardings(model, training.make_optimizer(optim), mesh)
        args = (jax.device_put(lora, sh["state"]["lora"]), jax.device_put(params, sh["params"]),
                jax.device_put(batch, sh["batch"]), jax.device_put(noise, sh["replicated"]))
        with sharding.activate(mesh):
            jaxpr = jax.make_jaxpr(fn)(*args)
            kept = {"x": stacked(jaxpr, (b, tokens, cfg.width)), "y": stacked(jaxpr, (b, L, cfg.text_width))}
            loss, grads = jax.jit(fn)(*args)
        return float(loss), jax.tree_util.tree_map(np.asarray, grads), kept

    mesh = dict(data=2, fsdp=2, sequence=2)
    full_loss, full_grads, full_kept = run("full", "", mesh)
    out = {"full": {"loss": full_loss, "kept": full_kept}}
    for name, remat, groups in (("offload", "offload:residual", ""), ("groups", "full", "full:1,offload:residual:2"),
                                ("bf16", "offload:residual_bf16", "")):
        loss, grads, kept = run(remat, groups, mesh)
        out[name] = {"loss": loss, "kept": kept, "grad_rel": rel(grads, full_grads),
                     "grad_max_abs": max_abs(grads, full_grads)}
    return out


_STACKED = r"(f32|bf16)\[{n},{b},{tokens},{width}\]\{{([^}}]*)\}}"


def tpu_checks() -> dict:
    import dataclasses
    import time

    from jax.sharding import SingleDeviceSharding

    from mochi_jax.aot import targets as aot_targets
    from mochi_jax.models import lora as lora_lib
    from mochi_jax.models.dit import DiTConfig, MochiDiT, abstract_variables

    device = aot_targets.compile_devices(aot_targets.parse_target("v5e-1"))[0]
    one = SingleDeviceSharding(device)
    cfg = DiTConfig(depth=5, num_heads=4, head_dim=128, text_width=128, t5_dim=32, time_embed_dim=32,
                    param_dtype="bfloat16", compute_dtype="bfloat16")
    targets = lora_lib.targets_from_config(lora_lib.REFERENCE_TARGETS)
    v = abstract_variables(cfg, targets)
    b, t, h, w, L = 1, 2, 16, 16, 8

    def place(tree):
        return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=one), tree)

    args = place((jax.ShapeDtypeStruct((b, 12, t, h, w), jnp.float32), jax.ShapeDtypeStruct((b, L, 32), jnp.float32),
                  jax.ShapeDtypeStruct((b, L), bool), jax.ShapeDtypeStruct((b,), jnp.float32)))
    tokens = t * (h // cfg.patch_size) * (w // cfg.patch_size)
    out = {"tokens": tokens, "width": cfg.width, "blocks": cfg.depth - 1}
    for name, remat, groups in (("full", "full", ""), ("offload", "offload:residual", ""),
                                ("bf16", "offload:residual_bf16", ""), ("groups", "full", "full:2,offload:residual:2")):
        c = dataclasses.replace(cfg, remat=remat, remat_groups=groups)
        model = MochiDiT(c, targets)
        grad = jax.jit(jax.grad(lambda lo, p, *a: jnp.mean(model.apply({"params": p, "lora": lo}, *a) ** 2)))
        start = time.time()
        compiled = grad.lower(place(v["lora"]), place(v["params"]), *args).compile()
        hlo, mem = compiled.as_text(), compiled.memory_analysis()
        stacked = {}
        for n in range(2, cfg.depth):  # the stacked inputs of a scan over n >= 2 blocks: [n, B, N, width]
            for dtype, layout in re.findall(_STACKED.format(n=n, b=b, tokens=tokens, width=cfg.width), hlo):
                stacked.setdefault(f"{dtype}[{n}]", set()).add("host" if "S(5)" in layout else "device")
        out[name] = {"temp": mem.temp_size_in_bytes, "host_temp": mem.host_temp_size_in_bytes,
                     "host_buffers": hlo.count("S(5)"), "stacked": {k: sorted(s) for k, s in stacked.items()},
                     "seconds": round(time.time() - start, 1)}
    return out


if __name__ == "__main__":
    result = mesh_checks() if sys.argv[1] == "mesh" else tpu_checks()
    print("RESULT " + json.dumps(result))
