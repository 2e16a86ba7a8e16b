"""attention='splash' (the Pallas TPU kernel, interpreted on the CPU) equals attention='xla': the op's
output and q/k/v gradients with text padding at two configs, the whole DiT's output and LoRA
gradients, and the sharded path (shard_map over batch and heads) on 8 simulated devices.

Errors are max|splash - xla| / max|xla| over each array, in float32."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mochi_jax.models import layers
from mochi_jax.models import lora as lora_lib
from mochi_jax.models.dit import DiTConfig, MochiDiT
from mochi_jax.models.splash import splash_attention

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5  # float32; the kernel reaches ~1e-6 or better


def max_rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def attention_case(batch=2, seq=150, heads=3, head_dim=16, block=128, valid=(140, 97), prefix=True, seed=0):
    """(fn(impl) -> f(q, k, v, key_mask, cotangent) = (output, (dq, dk, dv)), args). seq need not be a
    multiple of the block; `valid` keys per example as a prefix (DiT order) or, prefix=False, scattered."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    q, k, v, ct = [jax.random.normal(x, (batch, seq, heads, head_dim), jnp.float32) for x in ks[:4]]
    if prefix:
        mask = jnp.arange(seq)[None] < jnp.asarray(valid)[:, None]
    else:
        order = jnp.argsort(jax.random.uniform(ks[4], (batch, seq)), axis=1)
        mask = order < jnp.asarray(valid)[:, None]  # `valid` keys per row at random positions

    def fn(impl):
        def f(q, k, v, mask, ct):
            def loss(q, k, v):
                out = layers.attention(q, k, v, mask, impl=impl, splash_block=block)
                return jnp.sum(out * ct), out

            (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
            return out, grads
        return f

    return fn, (q, k, v, mask, ct)


def dit_case(heads=2, seed=0):
    """(fn(impl) -> f(lora, latents, t5_feats, t5_mask, timestep) = (velocity, LoRA gradient), args):
    the tiny preset's shape (heads x 16), 2 x 4 x 6 latents (12 visual tokens) and 6 text tokens of
    which 2 and 5 are real, LoRA on q/k/v and the output projections with non-zero factors."""
    cfg = DiTConfig(depth=3, num_heads=heads, head_dim=16, text_width=32, t5_dim=32, time_embed_dim=32,
                    param_dtype="float32", compute_dtype="float32", remat="none")
    targets = lora_lib.targets_from_config({k: dict(v, rank=4, alpha=8.0)
                                            for k, v in lora_lib.REFERENCE_TARGETS.items()})
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((2, 12, 2, 4, 6)).astype(np.float32)
    feats = rng.standard_normal((2, 6, cfg.t5_dim)).astype(np.float32)
    mask = np.arange(6)[None] < np.array([[2], [5]])
    timestep = np.array([300.0, 800.0], np.float32)
    variables = jax.jit(MochiDiT(cfg, targets).init)(jax.random.PRNGKey(seed), latents, feats, mask, timestep)
    params = variables["params"]
    lora = jax.tree_util.tree_map(lambda x: x + 0.05, variables["lora"])  # b = 0 would zero a's gradient

    def fn(impl):
        model = MochiDiT(dataclasses.replace(cfg, attention=impl), targets)

        def f(lora, *inputs):
            def loss(lora):
                out = model.apply({"params": params, "lora": lora}, *inputs)
                return jnp.mean(out ** 2), out

            (_, out), grads = jax.value_and_grad(loss, has_aux=True)(lora)
            return out, grads
        return f

    return fn, (lora, latents, feats, mask, timestep)


def _errors(fn, args):
    """Relative errors of splash against xla, per output leaf (all on this process's one device)."""
    got = jax.jit(fn("splash"))(*args)
    want = jax.jit(fn("xla"))(*args)
    return [max_rel(a, b) for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want))]


@pytest.mark.parametrize("kw", [
    dict(seq=150, heads=3, head_dim=16, block=128, valid=(140, 97)),  # pads 150 -> 256 (two tiles)
    dict(seq=300, heads=2, head_dim=32, block=256, valid=(300, 201), prefix=False),  # 300 -> 512, holes
], ids=["s150h3d16", "s300h2d32_scattered"])
def test_op_forward_and_gradients_equal_xla(kw):
    errs = _errors(*attention_case(**kw))
    assert len(errs) == 4  # output, dq, dk, dv
    assert max(errs) < TOL, f"max relative error of (out, dq, dk, dv): {errs}"


def test_padding_keys_are_ignored_and_bf16_tracks_xla():
    _, (q, k, v, mask, _) = attention_case()
    a = splash_attention(q, k, v, mask, block=128)
    junk = ~mask[:, :, None, None]
    b = splash_attention(q, jnp.where(junk, 50.0, k), jnp.where(junk, -9.0, v), mask, block=128)
    assert max_rel(b, a) < TOL  # masked keys change nothing
    q16, k16, v16 = (x.astype(jnp.bfloat16) for x in (q, k, v))
    got = splash_attention(q16, k16, v16, mask, block=128)
    assert got.dtype == jnp.bfloat16
    assert max_rel(got, layers.attention(q, k, v, mask)) < 2e-2


def test_block_size_must_be_lane_multiple():
    _, (q, k, v, mask, _) = attention_case()
    with pytest.raises(ValueError, match="multiple of 128"):
        splash_attention(q, k, v, mask, block=100)


@pytest.mark.slow
def test_remat_keeping_the_kernel_residuals_changes_nothing():
    """'save:attn' and 'dots' keep the kernel's output and log-sum-exp for the backward instead of rerunning
    it (tests/test_aot.py counts the kernels in the compiled step): the DiT's output and LoRA gradients
    equal those without remat."""
    fn, args = dit_case()
    lora, *inputs = args
    cfg0 = DiTConfig(depth=3, num_heads=2, head_dim=16, text_width=32, t5_dim=32, time_embed_dim=32,
                     param_dtype="float32", compute_dtype="float32", attention="splash")
    targets = lora_lib.targets_from_config({k: dict(v, rank=4, alpha=8.0)
                                            for k, v in lora_lib.REFERENCE_TARGETS.items()})
    params = jax.jit(MochiDiT(cfg0, targets).init)(jax.random.PRNGKey(0), *inputs)["params"]

    def grads(policy):
        model = MochiDiT(dataclasses.replace(cfg0, remat=policy), targets)

        def loss(lora):
            out = model.apply({"params": params, "lora": lora}, *inputs)
            return jnp.mean(out ** 2), out

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(lora)

    want = grads("none")
    for policy in ("save:attn", "dots"):
        errs = [max_rel(a, b) for a, b in zip(jax.tree_util.tree_leaves(grads(policy)), jax.tree_util.tree_leaves(want))]
        assert max(errs) < 1e-6, (policy, errs)


@pytest.fixture(scope="module")
def sharded():
    """tests/harness/splash_sharded_checks.py's relative errors (8 CPU devices, so in a subprocess; it also runs
    the one-device DiT, which needs the same model and reference)."""
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "harness" / "splash_sharded_checks.py")], capture_output=True,
                       text=True, timeout=900, cwd=ROOT)
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    assert r.returncode == 0 and line, r.stdout[-3000:] + r.stderr[-5000:]
    return json.loads(line[0][len("RESULT "):])


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["data2_seq2_tensor2", "fsdp2_seq4"])
def test_sharded_splash_equals_one_device_xla(sharded, mesh):
    got = sharded[mesh]
    assert got["shard_map"], "the kernel did not run under shard_map"
    assert max(got["attention"]) < TOL, f"op (out, dq, dk, dv) relative errors: {got['attention']}"


@pytest.mark.slow  # the 8-device harness behind `sharded` runs for tens of seconds
def test_dit_with_splash_equals_xla(sharded):
    errs = sharded["one_device"]["dit"]
    out_err, grad_errs = errs[0], errs[1:]
    assert out_err < TOL, f"DiT velocity: relative error {out_err}"
    assert len(grad_errs) > 0 and max(grad_errs) < TOL, f"LoRA gradients: max relative error {max(grad_errs)}"


@pytest.mark.slow  # reads the 8-device harness run
def test_sharded_dit_with_splash_equals_one_device_xla(sharded):
    errs = sharded["data2_seq2_tensor2"]["dit"]  # one mesh only: the DiT is most of the script's time
    assert max(errs) < TOL, f"DiT (velocity, LoRA grads) max relative error: {max(errs)}"
