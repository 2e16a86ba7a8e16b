"""Attention through the Pallas TPU splash-attention kernel (a block-wise flash attention).

The DiT's joint attention is one dense softmax over [visual tokens; text tokens] in which text
padding may never be a key. Splash expresses that with segment ids: every query has id 0, a key
has id 0 when `key_mask` allows it and 1 otherwise, and only equal ids attend. The static mask is
full (no causal or local structure), so the kernel visits every block.

The kernel wants whole tiles: the sequence is padded (with id-1 keys) to a multiple of the block
size and the output is sliced back. It takes one example as [heads, seq, head_dim] and does not
scale the logits, so the batch is vmapped and q is pre-multiplied by 1/sqrt(head_dim).

Mosaic kernels are opaque to XLA's partitioner, so under a mesh the call runs inside `shard_map`
in the layout the DiT already uses around attention (DeepSpeed-Ulysses): batch split over the
'batch' rule's axes, heads over the 'act_heads' rule's axes, every token of a head on one device.
Off TPU the kernel runs in Pallas' interpreter, which is how the CPU tests check it.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax.core.spmd import get_logical_axis_rules
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

from mochi_jax.models import sharding

LANES = 128  # block sizes must be multiples of the TPU lane width
DEFAULT_BLOCK = 512  # MaxText's default for every splash tile; <= 4.6 % padding at Mochi's >= 11k tokens


def splash_attention(q, k, v, key_mask=None, block: int = DEFAULT_BLOCK, interpret: bool | None = None,
                     residual_name: str = ""):
    """Softmax attention, [B, S, H, D] layout, scale 1/sqrt(D), equal to layers.attention(impl='xla').

    key_mask: [B, Sk] bool, True for keys that may be attended to (any pattern; every example needs
    at least one True). block: the q and kv tile of the forward and both backward kernels, a
    multiple of 128; shorter sequences use one tile of their length rounded up to 128.
    interpret: run the kernel in Pallas' interpreter (default: whenever the mesh's devices, or without
      a mesh the default backend, are not TPUs).
    residual_name: the checkpoint name of the kernel's residuals (its output and log-sum-exp), so that
      a remat policy can keep them and skip the forward kernel in the backward pass ('' = unnamed).
    """
    if block % LANES or block <= 0:
        raise ValueError(f"splash block size {block} must be a positive multiple of {LANES}")
    if interpret is None:
        interpret = _platform() != "tpu"
    if key_mask is None:
        key_mask = jnp.ones(k.shape[:2], bool)
    local = functools.partial(_attend, block=block, interpret=interpret, residual_name=residual_name or None)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local(q, k, v, key_mask)
    rules = get_logical_axis_rules()
    qkv = sharding.spec(("batch", None, "act_heads", None), q.shape, mesh, rules)
    mask = sharding.spec(("batch", None), key_mask.shape, mesh, rules)
    # check_vma off: the Pallas call carries no varying-axes annotations.
    return jax.shard_map(local, mesh=mesh, in_specs=(qkv, qkv, qkv, mask), out_specs=qkv,
                         check_vma=False)(q, k, v, key_mask)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _platform() -> str:
    """The platform the program is being built for: the active mesh's devices (so an ahead-of-time
    compile for TPU devices on a CPU host builds the real kernel), else the default backend."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return getattr(device, "platform", None) or jax.default_backend()


def _attend(q, k, v, key_mask, *, block: int, interpret: bool, residual_name: str | None):
    """The kernel on one device's shard: [b, S, h, D] in and out."""
    _, sq, heads, d = q.shape
    sk_len = k.shape[1]
    bq, bkv = min(block, _round_up(sq, LANES)), min(block, _round_up(sk_len, LANES))
    pq, pk = _round_up(sq, bq) - sq, _round_up(sk_len, bkv) - sk_len

    scale = 1.0 / math.sqrt(d)
    q = (q.astype(jnp.float32) * scale).astype(q.dtype)

    def heads_first(x, pad):  # [b, S, h, D] -> [b, h, S + pad, D]
        return jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    q, k, v = heads_first(q, pq), heads_first(k, pk), heads_first(v, pk)
    kv_ids = jnp.where(jnp.pad(key_mask, ((0, 0), (0, pk))), 0, 1).astype(jnp.int32)
    q_ids = jnp.zeros((sq + pq,), jnp.int32)

    sizes = sk.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                          block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                          block_q_dq=bq, block_kv_dq=bkv)
    full = sm.MultiHeadMask([sm.FullMask((sq + pq, sk_len + pk))] * heads)
    kernel = sk.make_splash_mha_single_device(full, block_sizes=sizes, interpret=interpret,
                                              residual_checkpoint_name=residual_name)

    def one(q, k, v, kv_ids):
        return kernel(q, k, v, segment_ids=sk.SegmentIds(q=q_ids, kv=kv_ids))

    out = jax.vmap(one)(q, k, v, kv_ids)  # [b, h, S + pad, D]
    return out[:, :, :sq].transpose(0, 2, 1, 3)
