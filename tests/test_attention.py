"""The attention function: masked XLA path vs the fused path (same arguments as cuDNN's)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mochi_jax.models import layers


def _qkv(b=2, s=24, h=3, d=16, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    return [jax.random.normal(k, (b, s, h, d)) for k in ks]


def test_xla_path_matches_fused_path_with_prefix_masks():
    q, k, v = _qkv()
    mask = jnp.arange(24)[None] < jnp.array([[20], [9]])  # visual tokens then valid text: a prefix
    ours = layers.attention(q, k, v, mask, impl="xla")
    fused = layers.fused_attention(q, k, v, mask, "xla")  # the call the 'cudnn' path makes, on the CPU
    np.testing.assert_allclose(ours, fused, rtol=1e-5, atol=1e-5)


def test_masked_keys_are_ignored():
    q, k, v = _qkv(b=1)
    mask = jnp.arange(24)[None] < 10
    a = layers.attention(q, k, v, mask)
    k2 = k.at[:, 10:].set(100.0)
    v2 = v.at[:, 10:].set(-7.0)
    np.testing.assert_allclose(a, layers.attention(q, k2, v2, mask), rtol=1e-6)
    np.testing.assert_allclose(a, layers.attention(q[:, :], k[:, :10], v[:, :10]), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU")
def test_cudnn_matches_xla_in_bf16():
    q, k, v = [x.astype(jnp.bfloat16) for x in _qkv(s=64, d=64)]
    mask = jnp.arange(64)[None] < jnp.array([[50], [64]])
    a = layers.attention(q, k, v, mask, impl="xla").astype(jnp.float32)
    b = layers.attention(q, k, v, mask, impl="cudnn").astype(jnp.float32)
    np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-2)
