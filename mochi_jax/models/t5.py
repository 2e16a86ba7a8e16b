"""The T5 v1.1 encoder (Mochi's text encoder, T5-XXL) as Flax Linen modules.

    token ids [B, L] -> shared embedding -> num_layers x Block -> RMS norm -> features [B, L, d_model]
    Block:  x += o(attention(q(n1(x)), k(n1(x)), v(n1(x)), bias));  x += wo(gelu(wi_0(n2(x))) * wi_1(n2(x)))

T5 specifics (those of transformers' T5EncoderModel, the reference tests/test_t5.py compares
against): no biases anywhere; RMS norms without mean subtraction; attention logits are NOT scaled
by 1/sqrt(d_kv) (the scale is folded into the trained weights); one learned relative-position
bias table [num_buckets, num_heads] (the reference keeps it in the first layer) is added to the
logits of every layer.

Parameters (Dense kernels [in, out]; the layers stacked on a leading axis for one nn.scan):
    shared/embedding                    [vocab, d_model]
    relative_attention_bias/embedding   [num_buckets, num_heads]
    blocks/attn_norm/weight             [N, d_model]
    blocks/attn/{q,k,v}/kernel          [N, d_model, heads * d_kv]
    blocks/attn/o/kernel                [N, heads * d_kv, d_model]
    blocks/ff_norm/weight               [N, d_model]
    blocks/ff/{wi_0,wi_1}/kernel        [N, d_model, d_ff]
    blocks/ff/wo/kernel                 [N, d_ff, d_model]
    final_norm/weight                   [d_model]
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mochi_jax.models.layers import Dense, RMSNorm, config_from_dict, declared_axes


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Defaults: T5 v1.1 XXL as used by Mochi."""

    d_model: int = 4096
    num_layers: int = 24
    num_heads: int = 64
    d_kv: int = 64
    d_ff: int = 10240
    vocab_size: int = 32128
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6
    param_dtype: str = "bfloat16"
    compute_dtype: str = "bfloat16"  # matmuls; norms, softmax, the residual stream are float32

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    @classmethod
    def from_dict(cls, d) -> "T5Config":
        return config_from_dict(cls, d, "T5")

    def arch(self) -> dict:
        """The architecture fields (what a converted checkpoint fixes)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("param_dtype", "compute_dtype")}


# ----------------------------------------------------------------------------- relative position

def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """[L, L] int32 bucket of (key position - query position), bidirectional.

    Half of the buckets are for keys after the query, half for keys at or before it. Within a
    half, distances below `num_buckets // 4` get one bucket each; larger ones share log-spaced
    buckets up to `max_distance`, beyond which all fall into the last bucket. Computed on the
    host in float32, as the reference does, so the rounding at bucket edges is the same.
    """
    pos = np.arange(length, dtype=np.int64)
    rel = pos[None, :] - pos[:, None]  # [q, k]
    half = num_buckets // 2
    side = np.where(rel > 0, half, 0)
    dist = np.abs(rel)
    exact = half // 2
    with np.errstate(divide="ignore"):
        scaled = (np.log(dist.astype(np.float32) / np.float32(exact))
                  / np.float32(math.log(max_distance / exact)) * np.float32(half - exact))
    far = exact + np.where(dist < exact, 0, scaled).astype(np.int64)
    far = np.minimum(far, half - 1)
    return (side + np.where(dist < exact, dist, far)).astype(np.int32)


# ----------------------------------------------------------------------------- modules

class Embedding(nn.Module):
    """A lookup table 'embedding' [num, features]; rows are returned in the parameter dtype."""

    num: int
    features: int
    param_dtype: jnp.dtype = jnp.float32
    axes: tuple = (None, None)  # logical names of the table's dimensions

    def param_axes(self) -> dict:
        return {"embedding": self.axes}

    @nn.compact
    def __call__(self, idx):
        table = self.param("embedding", nn.initializers.normal(1.0), (self.num, self.features), self.param_dtype)
        return jnp.take(table, idx, axis=0)


class _Base(nn.Module):
    cfg: T5Config

    def dense(self, features, name, axes):
        return Dense(features, axes=axes, use_bias=False, param_dtype=jnp.dtype(self.cfg.param_dtype),
                     compute_dtype=jnp.dtype(self.cfg.compute_dtype), name=name)

    def norm(self, name):
        return RMSNorm(self.cfg.eps, jnp.dtype(self.cfg.param_dtype), axes=("embed",), name=name)


class SelfAttention(_Base):
    """Unscaled multi-head attention with an additive position bias; padded keys are masked."""

    @nn.compact
    def __call__(self, x, bias, key_mask):
        # x [B, L, d_model] (compute dtype), bias [H, L, L] f32, key_mask [B, L] bool
        cfg = self.cfg
        b, l, _ = x.shape
        q, k, v = (self.dense(cfg.inner_dim, n, ("embed", "heads"))(x).reshape(b, l, cfg.num_heads, cfg.d_kv)
                   for n in "qkv")
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + bias[None]
        logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, l, cfg.inner_dim)
        return self.dense(cfg.d_model, "o", ("heads", "embed"))(out)


class GatedGelu(_Base):
    """wo(gelu_tanh(wi_0 x) * wi_1 x); the activation in float32."""

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        gate = jax.nn.gelu(self.dense(cfg.d_ff, "wi_0", ("embed", "mlp"))(x).astype(jnp.float32), approximate=True)
        up = self.dense(cfg.d_ff, "wi_1", ("embed", "mlp"))(x).astype(jnp.float32)
        h = (gate * up).astype(jnp.dtype(cfg.compute_dtype))
        return self.dense(cfg.d_model, "wo", ("mlp", "embed"))(h)


class Block(_Base):
    @nn.compact
    def __call__(self, x, bias, key_mask):
        cdt = jnp.dtype(self.cfg.compute_dtype)  # x: float32 residual stream [B, L, d_model]
        x = x + SelfAttention(self.cfg, name="attn")(self.norm("attn_norm")(x).astype(cdt), bias, key_mask)
        x = x + GatedGelu(self.cfg, name="ff")(self.norm("ff_norm")(x).astype(cdt))
        return x, None


class T5Encoder(_Base):
    """ids [B, L] int, mask [B, L] bool (True on real tokens; None = all real)
    -> (features [B, L, d_model] float32, mask [B, L] bool)."""

    @nn.compact
    def __call__(self, ids, mask=None):
        cfg = self.cfg
        pdt = jnp.dtype(cfg.param_dtype)
        mask = jnp.ones(ids.shape, bool) if mask is None else mask.astype(bool)
        x = Embedding(cfg.vocab_size, cfg.d_model, pdt, ("vocab", "embed"), name="shared")(ids).astype(jnp.float32)
        rel = Embedding(cfg.num_buckets, cfg.num_heads, pdt, ("buckets", "heads"), name="relative_attention_bias")
        buckets = relative_position_buckets(ids.shape[1], cfg.num_buckets, cfg.max_distance)
        bias = rel(jnp.asarray(buckets)).astype(jnp.float32).transpose(2, 0, 1)  # [H, L, L]

        blocks = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_layers)
        x, _ = blocks(cfg, name="blocks")(x, bias, mask)
        return self.norm("final_norm")(x), mask


# ----------------------------------------------------------------------------- parameters

def init_params(cfg: T5Config, rng, seq_len: int = 8) -> dict:
    """Random parameters (for tests and benchmarks; real ones come from checkpoints/t5.py)."""
    ids = jnp.zeros((1, seq_len), jnp.int32)
    return T5Encoder(cfg).init(rng, ids)["params"]


def abstract_params(cfg: T5Config) -> dict:
    """The parameter tree as jax.ShapeDtypeStruct leaves, without allocating anything."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


def logical_axes(cfg: T5Config, seq_len: int = 8) -> dict:
    """A tree like the params whose leaves are tuples of logical axis names, one per dimension, as
    the layers declare them where they create their weights (e.g. blocks/attn/q/kernel ->
    ('layers', 'embed', 'heads')). Map over it with `is_leaf=lambda x: isinstance(x, tuple)`."""
    return declared_axes(T5Encoder(cfg), jnp.zeros((1, seq_len), jnp.int32), collections=("params",))["params"]
