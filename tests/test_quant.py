"""A quantized frozen base (int8 / float8_e4m3fn weight-only, per-output-channel scales) and block
weights streamed from pinned host memory: accuracy against bf16, LoRA-only gradients, training,
equality of host-streamed and on-device weights, checkpoint round trips, compiled GPU memory."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

import dit_ref
from mochi_jax.lib import training
from mochi_jax.models import lora as lora_lib
from mochi_jax.models import quant
from mochi_jax.models.dit import DiTConfig, MochiDiT, abstract_variables

TARGETS = lora_lib.targets_from_config({k: dict(v, rank=4, alpha=8.0) for k, v in lora_lib.REFERENCE_TARGETS.items()})
# DiT output error (relative L2) against the float32 model, per format, on random weights (tests/harness
# configs): measured ~0.004 (bf16), ~0.006-0.008 (int8), ~0.025-0.03 (float8_e4m3fn); the bounds leave 2x room
BOUND = {"bfloat16": 0.01, "int8": 0.02, "float8_e4m3fn": 0.06}


def _bf16(name):
    return dataclasses.replace(dit_ref.our_config(name), param_dtype="bfloat16", compute_dtype="bfloat16")


def _optim(**kw):
    o = dict(lr=1e-3, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, warmup_steps=0, schedule="constant",
             decay_steps=100, grad_clip=0.0, grad_accum=1)
    return ml_collections.ConfigDict({**o, **kw})


def _batch(cfg, seed, b=1, t=2, h=4, w=6, L=8):
    rng = np.random.default_rng(seed)
    mask = np.zeros((b, L), bool)
    for i in range(b):
        mask[i, :3 + 2 * i] = True
    return {"mean": rng.standard_normal((b, 12, t, h, w)).astype(np.float32),
            "logvar": np.full((b, 12, t, h, w), -8.0, np.float32),
            "t5_feats": rng.standard_normal((b, L, cfg.t5_dim)).astype(np.float32), "t5_mask": mask}


@pytest.fixture(scope="module", params=["h2d16", "h3d8"])
def base(request):
    """(bf16 config, float32 params of a random base, inputs)."""
    cfg = _bf16(request.param)
    inp = dit_ref.random_inputs(cfg)
    params = MochiDiT(dataclasses.replace(cfg, param_dtype="float32")).init(jax.random.PRNGKey(3), *inp)["params"]
    return cfg, params, inp


def test_quantize_roundtrip_bounds():
    w = np.random.default_rng(0).standard_normal((2, 64, 48)).astype(np.float32)
    w[:, :, 5] = 0.0  # a zero column gets scale 1 and stays zero
    for name, tol in (("int8", 0.5 / 127), ("float8_e4m3fn", 2.0 ** -4)):
        q, s = quant.quantize(w, name)
        assert q.dtype == np.dtype(name) and s.shape == (2, 48) and s.dtype == np.float32
        back = quant.dequantize(q, s)
        amax = np.abs(w).max(axis=1, keepdims=True)
        assert np.all(np.abs(back - w) <= tol * np.maximum(amax, np.abs(w)) + 1e-7), name
        assert np.all(back[:, :, 5] == 0)
        qj, sj = quant.quantize(jnp.asarray(w), name)  # the same numbers from JAX
        np.testing.assert_array_equal(np.asarray(qj).astype(np.float32), q.astype(np.float32))
        np.testing.assert_allclose(np.asarray(sj), s, rtol=1e-6)


@pytest.mark.parametrize("fmt", ["bfloat16", "int8", "float8_e4m3fn"])
def test_output_against_bf16_and_fp32(base, fmt):
    cfg, params, inp = base
    ref = MochiDiT(dataclasses.replace(cfg, param_dtype="float32", compute_dtype="float32")).apply(
        {"params": params}, *inp)
    qcfg = dataclasses.replace(cfg, param_dtype=fmt)
    qparams = quant.quantize_params(params, fmt) if fmt != "bfloat16" else jax.tree_util.tree_map(
        lambda a: a.astype(jnp.bfloat16), params)
    # the stored layout is what the model declares (abstract_variables: what the fit check and loaders use)
    shapes = traverse_util.flatten_dict(abstract_variables(qcfg)["params"])
    got = traverse_util.flatten_dict(qparams)
    assert set(shapes) == set(got)
    for k, v in got.items():
        if k != ("pos_frequencies",):
            assert (v.shape, v.dtype) == (shapes[k].shape, shapes[k].dtype), k
    if fmt != "bfloat16":
        assert got[("blocks", "mlp_x", "w1", "kernel")].dtype == np.dtype(fmt)
        assert got[("blocks", "mlp_x", "w1", "kernel_scale")].shape == (cfg.depth - 1, got[
            ("blocks", "mlp_x", "w1", "kernel")].shape[-1])
        assert got[("last_block", "attn", "qkv_x", "kernel")].dtype == np.dtype(fmt)
        assert got[("final_layer", "linear", "kernel")].dtype == jnp.bfloat16  # outside the blocks: bf16
    out = MochiDiT(qcfg).apply({"params": qparams}, *inp)
    err = dit_ref.rel_l2(out, ref)
    print(f"{fmt}: relative L2 error against float32 {err:.4f}")
    assert err < BOUND[fmt], (fmt, err)


def test_gradients_reach_only_the_lora(base):
    cfg, params, inp = base
    qcfg = dataclasses.replace(cfg, param_dtype="int8")
    model = MochiDiT(qcfg, TARGETS)
    qparams = quant.quantize_params(params, "int8")
    lora = jax.tree_util.tree_map(lambda a: a + 0.01, training.init_lora(model, jax.random.PRNGKey(0)))
    opt = training.make_optimizer(_optim())
    state = {"step": jnp.zeros((), jnp.int32), "lora": lora, "opt": opt.init(lora), "rng": jax.random.PRNGKey(1)}
    before = jax.tree_util.tree_map(np.array, qparams)
    step = training.make_train_step(model, opt, "normalized", 0.0)
    state, out = step(state, qparams, _batch(cfg, 0))
    assert bool(out["finite"]) and float(out["grad_norm"]) > 0
    jax.tree_util.tree_map(np.testing.assert_array_equal, before, jax.tree_util.tree_map(np.array, qparams))
    # the step differentiates the LoRA only: every optimizer slot is a LoRA factor's shape, float32
    lora_shapes = {x.shape for x in jax.tree_util.tree_leaves(lora)}
    big = [x for x in jax.tree_util.tree_leaves(state["opt"]) if x.size > 1]
    assert big and all(x.shape in lora_shapes and x.dtype == jnp.float32 for x in big)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(state["lora"]))
    # integer weights cannot carry a gradient at all: differentiating them is refused by JAX itself
    with pytest.raises(TypeError):
        jax.grad(lambda p: jnp.sum(model.apply({"params": p, "lora": lora}, *inp)))(qparams)


def _overfit(cfg, params, steps=30):
    """(fixed-noise loss before, after) of a LoRA trained on two clips over `params`, and the LoRA."""
    targets = lora_lib.targets_from_config({"attn": dict(pattern=r"attn/(qkv|proj)_[xy]$", rank=8, alpha=8.0),
                                            "mlp": dict(pattern=r"mlp_x/w2$", rank=8, alpha=8.0)})
    model = MochiDiT(cfg, targets)
    opt = training.make_optimizer(_optim(lr=2e-2))
    lora = training.init_lora(model, jax.random.PRNGKey(0))
    state = {"step": jnp.zeros((), jnp.int32), "lora": lora, "opt": opt.init(lora), "rng": jax.random.PRNGKey(1)}
    clips = [_batch(cfg, 10 + i) for i in range(2)]

    stacked = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *[clips[i % 2] for i in range(8)])

    @jax.jit
    def eval_loss(lora):  # 8 fixed (clip, noise) draws through one traced DiT call
        def one(args):
            c, k = args
            return training.flow_loss(model, params, lora, c, training.draw_noise(k, c))
        return jnp.mean(jax.lax.map(one, (stacked, jax.random.split(jax.random.PRNGKey(7), 8))))

    start = float(eval_loss(state["lora"]))
    step = training.make_train_step(model, opt, "normalized", 0.0)
    for i in range(steps):
        state, _ = step(state, params, clips[i % 2])
    return start, float(eval_loss(state["lora"])), state["lora"], targets


@pytest.mark.slow
def test_lora_on_quantized_base_overfits_like_bf16():
    cfg = _bf16("h2d16")
    params = MochiDiT(dataclasses.replace(cfg, param_dtype="float32")).init(
        jax.random.PRNGKey(3), *dit_ref.random_inputs(cfg))["params"]
    bf = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params)
    s0, e0, _, _ = _overfit(cfg, bf)
    assert e0 < 0.85 * s0
    for fmt in ("int8",):  # float8_e4m3fn: benchmarks/quant_accuracy.py (one more compile here costs ~20 s)
        s1, e1, _, _ = _overfit(dataclasses.replace(cfg, param_dtype=fmt), quant.quantize_params(params, fmt))
        print(f"{fmt}: loss {s1:.3f} -> {e1:.3f} (bf16 {s0:.3f} -> {e0:.3f})")
        assert abs(s1 - s0) < 0.05 * s0
        assert e1 < 0.85 * s1 and abs(e1 - e0) < 0.05 * e0, (fmt, s0, e0, s1, e1)


@pytest.mark.slow
def test_host_weights_equal_device_weights_in_values_and_gradients():
    """The LoRA loss and gradients with the stacked blocks in pinned host memory (fetched block by
    block inside the scan) equal those with every weight on the device, for a quantized base; the
    train step runs with that placement. The CPU backend has 'pinned_host' memory, so the placement
    is real here (the device-memory saving is measured by the GPU compile: test_gpu_compile_...)."""
    from mochi_jax.models import sharding as sharding_lib

    mesh = sharding_lib.make_mesh({"data": 1}, jax.devices()[:1])
    cfg = dataclasses.replace(dit_ref.our_config("h2d16"), param_dtype="int8", remat="full")
    p32 = MochiDiT(dataclasses.replace(cfg, param_dtype="float32")).init(
        jax.random.PRNGKey(3), *dit_ref.random_inputs(cfg))["params"]
    params = quant.quantize_params(p32, "int8")
    batch = _batch(cfg, 0)
    results = []
    for on_host in (False, True):
        model = MochiDiT(dataclasses.replace(cfg, weights_on_host=on_host), TARGETS)
        opt = training.make_optimizer(_optim())
        sh = training.train_shardings(model, opt, mesh)
        kinds = {s.memory_kind for s in jax.tree_util.tree_leaves(sh["params"]["blocks"])}
        assert kinds == ({sharding_lib.HOST_MEMORY} if on_host else {"device"})
        assert {s.memory_kind for s in jax.tree_util.tree_leaves(sh["params"]["last_block"])} == {"device"}
        placed = jax.device_put(params, sh["params"])
        leaf = placed["blocks"]["attn"]["qkv_x"]["kernel"]
        assert leaf.sharding.memory_kind == (sharding_lib.HOST_MEMORY if on_host else "device")
        state = training.init_state(model, opt, 0, sh["state"])
        state["lora"] = jax.tree_util.tree_map(lambda a: a + 0.01, state["lora"])
        b = jax.device_put(batch, sh["batch"])
        noise = training.draw_noise(jax.random.PRNGKey(5), b)
        fn = jax.jit(lambda p, lo: jax.value_and_grad(
            lambda lo: training.flow_loss(model, p, lo, b, noise))(lo))
        with sharding_lib.activate(mesh):
            lowered = fn.lower(placed, state["lora"])
            assert ("pinned_host" in lowered.as_text()) == on_host
            loss, grads = lowered.compile()(placed, state["lora"])
        results.append((float(loss), jax.tree_util.tree_map(np.asarray, grads)))
        if on_host:
            new, out = training.make_train_step(model, opt, "normalized", 0.0, mesh, sh)(state, placed, b)
            assert bool(out["finite"]) and new["lora"]["blocks"]["attn"]["qkv_x"]["a"].sharding.memory_kind == "device"
    (l0, g0), (l1, g1) = results
    assert l0 == pytest.approx(l1, rel=1e-6), (l0, l1)
    errs = jax.tree_util.tree_leaves(jax.tree_util.tree_map(dit_ref.rel_l2, g1, g0))
    assert max(errs) < 1e-5, max(errs)


def test_unknown_dtype_is_one_clear_error():
    with pytest.raises(ValueError, match=r"model.param_dtype='int4' is not a DiT weight format; choose one of "
                                         r"float32, bfloat16, float16, int8, float8_e4m3fn"):
        DiTConfig(param_dtype="int4")
    with pytest.raises(ValueError, match="model.param_dtype='float8'"):
        DiTConfig.from_dict({"param_dtype": "float8"})
    with pytest.raises(ValueError, match="weights_on_host needs scan_layers"):
        DiTConfig(weights_on_host=True, scan_layers=False)


def test_merge_refuses_quantized_kernels(base):
    cfg, params, inp = base
    qcfg = dataclasses.replace(cfg, param_dtype="int8")
    model = MochiDiT(qcfg, TARGETS)
    lora = training.init_lora(model, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="quantized.*int8.*apply the LoRA unmerged"):
        lora_lib.merge(quant.quantize_params(params, "int8"), lora, TARGETS)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A random reference DiT written as genmo's dit.safetensors (float32), and its config."""
    cfg = dit_ref.our_config("h2d16")
    d = tmp_path_factory.mktemp("src")
    _, genmo = dit_ref.write_both_layouts(dit_ref.make_reference(cfg, seed=2), d)
    return cfg, genmo, d


@pytest.mark.slow
@pytest.mark.parametrize("fmt", quant.QUANT_DTYPES)
def test_quantized_checkpoints_round_trip(source, fmt):
    from mochi_jax.checkpoints import convert_dit, load_dit, read_metadata
    from mochi_jax.models import sharding as sharding_lib

    cfg, genmo, d = source
    convert_dit(genmo, d / f"q_{fmt}", dtype=fmt, progress=False)
    if not (d / "f32").exists():
        convert_dit(genmo, d / "f32", dtype="float32", progress=False)
    assert read_metadata(d / f"q_{fmt}")["quantized"] == fmt
    qcfg, qp = load_dit(d / f"q_{fmt}")  # a quantized checkpoint loads as such
    assert qcfg.param_dtype == fmt and qcfg.quantized
    _, f32 = load_dit(d / "f32")
    expect = quant.quantize_params(jax.tree_util.tree_map(np.asarray, f32), fmt)
    _, on_load = load_dit(d / "f32", dtype=fmt)  # quantize on load = the converter's output
    for tree in (qp, on_load):
        flat, want = traverse_util.flatten_dict(tree), traverse_util.flatten_dict(expect)
        assert set(flat) == set(want)
        for k, v in want.items():
            got = np.asarray(flat[k])
            assert got.dtype == v.dtype, k
            if k[-1] == "kernel_scale":
                np.testing.assert_allclose(got, v, rtol=1e-6, err_msg=str(k))
            else:
                np.testing.assert_array_equal(got.astype(np.float32), np.asarray(v).astype(np.float32), err_msg=str(k))
    # the model runs on it, close to the float32 model
    inp = dit_ref.random_inputs(cfg)
    ref = MochiDiT(cfg).apply({"params": f32}, *inp)
    out = MochiDiT(dataclasses.replace(qcfg, compute_dtype="float32")).apply({"params": qp}, *inp)
    assert dit_ref.rel_l2(out, ref) < BOUND[fmt]
    # a float dtype asked of a quantized checkpoint dequantizes it
    dcfg, deq = load_dit(d / f"q_{fmt}", dtype="float32")
    assert dcfg.param_dtype == "float32" and "kernel_scale" not in deq["blocks"]["attn"]["qkv_x"]
    np.testing.assert_allclose(np.asarray(deq["blocks"]["attn"]["qkv_x"]["kernel"]),
                               quant.dequantize(np.asarray(qp["blocks"]["attn"]["qkv_x"]["kernel"]),
                                                np.asarray(qp["blocks"]["attn"]["qkv_x"]["kernel_scale"])), rtol=1e-6)
    # straight into the training shardings, the stacked blocks into pinned host memory
    mesh = sharding_lib.make_mesh({"data": 1}, jax.devices()[:1])
    model = MochiDiT(dataclasses.replace(qcfg, weights_on_host=True), TARGETS)
    sh = training.train_shardings(model, training.make_optimizer(_optim()), mesh)["params"]
    _, placed = load_dit(d / "f32", dtype=fmt, shardings=sh)
    leaf = placed["blocks"]["mlp_x"]["w1"]["kernel"]
    assert leaf.sharding.memory_kind == sharding_lib.HOST_MEMORY and leaf.dtype == np.dtype(fmt)
    np.testing.assert_array_equal(np.asarray(leaf).astype(np.float32),
                                  np.asarray(expect["blocks"]["mlp_x"]["w1"]["kernel"]).astype(np.float32))
    assert placed["last_block"]["attn"]["qkv_x"]["kernel"].sharding.memory_kind == "device"


GPU_MEMORY_SCRIPT = """
import json, sys
from mochi_jax.aot import targets
targets.compile_only_environment()
from mochi_jax.configs import lora
from mochi_jax.aot import fit
out = {}
for name, dtype, host in (("bf16", "bfloat16", False), ("int8", "int8", False), ("bf16+host", "bfloat16", True)):
    cfg = lora.get_config()
    cfg.aot.model, cfg.aot.target, cfg.model.attention = "tiny", "h100", "cudnn"
    cfg.aot.num_frames, cfg.aot.height, cfg.aot.width = 7, 32, 32
    cfg.model.param_dtype, cfg.model.weights_on_host = dtype, host
    r = fit.check(cfg)
    out[name] = {"total": r.total_bytes, "arguments": r.argument_bytes, "host": r.host_bytes, "inputs": r.inputs}
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.skipif(not __import__("mochi_jax.aot.targets").aot.targets.have_compiler("cuda"),
                    reason="the CUDA compiler plugin is not installed (pip install -e '.[cuda]', several GB)")
def test_gpu_compile_needs_less_device_memory_for_int8_and_host_weights():
    """The tiny train step compiled for an H100 (on this CPU): an int8 base's weights take about half
    the device memory of bf16, and host-streamed blocks leave the stacked weights in host memory."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, "-c", GPU_MEMORY_SCRIPT], cwd=root, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(root)), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    bf16, int8, host = r["bf16"], r["int8"], r["bf16+host"]
    w_bf16, w_int8 = bf16["inputs"]["frozen weights"], int8["inputs"]["frozen weights"]
    # 1 byte instead of 2 for the blocks' kernels (99 % of the full model, ~75 % of this tiny one)
    assert 0.45 * w_bf16 < w_int8 < 0.7 * w_bf16, (w_bf16, w_int8)
    assert bf16["arguments"] - int8["arguments"] >= 0.9 * (w_bf16 - w_int8), (bf16, int8)
    assert int8["total"] < bf16["total"], (bf16, int8)
    on_host = host["inputs"]["frozen weights in host memory"]  # the stacked blocks: 2 of this tiny model's 3
    assert on_host > 0.5 * w_bf16 and bf16["host"] == 0 and host["host"] >= on_host, (bf16, host)
    assert host["arguments"] <= bf16["arguments"] - 0.9 * on_host and host["total"] < bf16["total"], (bf16, host)


def test_sampling_accepts_a_quantized_base(tmp_path):
    """`mochi_jax.sample` with model.param_dtype=int8 quantizes the (float32) demo checkpoint as it
    loads and renders nearly the float32 base's video (evaluate loads its base the same way)."""
    from mochi_jax import sample
    from mochi_jax.configs import sample as sample_config
    from mochi_jax.demo import write_demo_models

    paths = write_demo_models(tmp_path / "models")

    def render(dtype):
        cfg = sample_config.get_config("demo")
        cfg.model.update(dict(dit=str(paths["dit"]), vae=str(paths["vae"]), t5=str(paths["t5"]),
                              tokenizer=str(paths["tokenizer"]), param_dtype=dtype))
        cfg.sampling.update(dict(num_frames=7, height=32, width=48, steps=3))
        cfg.demo.root, cfg.out_dir = str(tmp_path), str(tmp_path / "out")
        return {seed: v for _, seed, v in sample.render(cfg)}[cfg.seed].astype(np.float32)

    base, q = render("float32"), render("int8")
    diff = np.abs(q - base)
    print(f"int8 base: mean |frame difference| {diff.mean():.3f} of 255")
    assert 0 < diff.mean() < 2.0, diff.mean()


def test_validation_sampling_with_host_placed_blocks_equals_device():
    """The trainer's validation videos sample with the training placement: blocks in pinned host
    memory, fetched by the scan, give the on-device latents."""
    from mochi_jax.lib import sampling
    from mochi_jax.models import sharding as sharding_lib

    cfg = dataclasses.replace(dit_ref.our_config("h2d16"), param_dtype="int8")
    params = quant.quantize_params(MochiDiT(dataclasses.replace(cfg, param_dtype="float32")).init(
        jax.random.PRNGKey(0), *dit_ref.random_inputs(cfg))["params"], "int8")
    mesh = sharding_lib.make_mesh({"data": 1}, jax.devices()[:1])
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((1, 12, 2, 4, 6)).astype(np.float32)
    cond = (rng.standard_normal((1, 8, cfg.t5_dim)).astype(np.float32), np.ones((1, 8), bool))
    outs = []
    for on_host in (False, True):
        c = dataclasses.replace(cfg, weights_on_host=on_host)
        sh = training.train_shardings(MochiDiT(c, TARGETS), training.make_optimizer(_optim()), mesh)
        placed = jax.device_put(params, sh["params"])
        outs.append(np.asarray(sampling.denoise(c, placed, noise, cond, cond, sigmas=np.linspace(1, 0, 4),
                                                guidance=2.0)))
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-6, atol=1e-6)


def test_float_checkpoint_loads_into_host_placed_blocks(tmp_path):
    """load_dit into the weights_on_host shardings: orbax reads the unrolled blocks into pinned host
    memory and they are stacked there (no device in between); the values are the checkpoint's."""
    from mochi_jax.checkpoints import load_dit
    from mochi_jax.demo import write_demo_models
    from mochi_jax.models import sharding as sharding_lib

    paths = write_demo_models(tmp_path)
    cfg, ref = load_dit(paths["dit"])
    mesh = sharding_lib.make_mesh({"data": 1}, jax.devices()[:1])
    sh = training.train_shardings(MochiDiT(dataclasses.replace(cfg, weights_on_host=True), TARGETS),
                                  training.make_optimizer(_optim()), mesh)["params"]
    hcfg, params = load_dit(paths["dit"], shardings=sh, weights_on_host=True)
    assert hcfg.weights_on_host
    assert params["blocks"]["attn"]["qkv_x"]["kernel"].sharding.memory_kind == sharding_lib.HOST_MEMORY
    assert params["last_block"]["attn"]["qkv_x"]["kernel"].sharding.memory_kind == "device"
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, ref)
