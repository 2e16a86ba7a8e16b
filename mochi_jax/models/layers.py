"""Layers shared by the Mochi models: a Dense that can carry LoRA, RMS norms,
one attention function with several backends, and stacks of layers (remat: mochi_jax/models/remat.py)."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.ad_checkpoint import checkpoint_name

from mochi_jax.models import quant as quant_lib
from mochi_jax.models import remat as remat_lib
from mochi_jax.models import splash
from mochi_jax.models.lora import LoraTarget, find_target

Dtype = Any


def config_from_dict(cls, d, what: str):
    """Build the frozen config dataclass `cls` from a dict / ConfigDict; unknown fields are an
    error naming them, lists (JSON, ConfigDict) become tuples."""
    d = dict(d)
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"unknown {what} config fields: {sorted(unknown)}")
    return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})


class Dense(nn.Module):
    """y = x @ kernel + bias, with an optional low-rank adapter.

    The frozen weights live in the 'params' collection (kernel [in, out], bias [out]).
    When the module's path (e.g. 'blocks/attn/qkv_x') matches one of `lora_targets`,
    it also owns 'lora' variables a [in, r] and b [r, out] (b starts at zero) and adds
    (alpha / r) * dropout(x) @ a @ b. LoRA dropout is active only when a 'dropout' rng is
    passed to `apply`. Without a matching target the module is exactly the plain Dense.

    `axes`: the logical names of the kernel's (in, out) dimensions ('embed', 'heads', 'mlp', None
    for replicated; mapped to mesh axes by mochi_jax.models.sharding.RULES). The bias and the LoRA
    factors take theirs from them (see `param_axes`). A model that is sharded declares them for
    every Dense; `declared_axes` refuses a parameter whose module declared none.
    """

    features: int
    axes: tuple = ()
    use_bias: bool = True
    param_dtype: Dtype = jnp.float32
    compute_dtype: Dtype = jnp.float32
    lora_targets: Sequence[LoraTarget] = ()
    kernel_init: Any = nn.initializers.xavier_uniform()

    # '' or a format of mochi_jax.models.quant.QUANT_DTYPES: the kernel is stored quantized, with a
    # float32 'kernel_scale' [out] beside it, and dequantized to compute_dtype where it is used
    quant: str = ""

    @nn.compact
    def __call__(self, x):
        in_features = x.shape[-1]
        shape = (in_features, self.features)
        cdt = self.compute_dtype
        if self.quant:
            q0 = s0 = None
            if self.is_initializing():  # one random kernel, quantized: the scale fits its kernel
                q0, s0 = quant_lib.quantize(self.kernel_init(self.make_rng("params"), shape, jnp.float32), self.quant)
            q = self.param("kernel", lambda _: q0)
            scale = self.param("kernel_scale", lambda _: s0)
            kernel = quant_lib.dequantize(q, scale, cdt)  # this layer's kernel only (one block under a scan)
        else:
            kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
        y = jnp.dot(x.astype(cdt), kernel.astype(cdt))
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
            y = y + bias.astype(cdt)
        target = find_target(self.lora_targets, "/".join(self.path))
        if target is not None and target.rank > 0:
            y = y + self._lora(x, in_features, target).astype(y.dtype)
        return y

    def param_axes(self) -> dict:
        if not self.axes:
            return {}
        i, o = self.axes
        return {"kernel": (i, o), "kernel_scale": (o,), "bias": (o,), "a": (i, None), "b": (None, o)}

    def _lora(self, x, in_features: int, target: LoraTarget):
        bound = 1.0 / math.sqrt(in_features)  # PEFT's kaiming_uniform(a=sqrt(5)) for A
        a = self.variable(
            "lora", "a",
            lambda: jax.random.uniform(self.make_rng("params"), (in_features, target.rank),
                                       jnp.float32, -bound, bound))
        b = self.variable("lora", "b", lambda: jnp.zeros((target.rank, self.features), jnp.float32))
        if target.dropout > 0.0 and self.has_rng("dropout"):
            x = nn.Dropout(rate=target.dropout, deterministic=False)(x)
        cdt = self.compute_dtype
        h = jnp.dot(x.astype(cdt), a.value.astype(cdt))
        return jnp.dot(h, b.value.astype(cdt)) * target.scale


def rms_norm(x, eps: float):
    """RMS-normalise the last axis in float32 (no learned weight)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


class RMSNorm(nn.Module):
    """RMS norm with a learned weight over the last axis, computed in float32."""

    eps: float = 1e-5
    param_dtype: Dtype = jnp.float32
    axes: tuple = ("norm",)  # the logical name of the weight's dimension

    def param_axes(self) -> dict:
        return {"weight": self.axes}

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        return rms_norm(x, self.eps) * w.astype(jnp.float32)


# ----------------------------------------------------------------------------- logical axis names

def declared_axes(module: nn.Module, *args, collections=("params", "lora")) -> dict:
    """{collection: a tree like the module's variables whose leaves are tuples of logical axis names},
    from the names each submodule declares where it creates its parameters (a `param_axes()` method
    returning {parameter name: names}). Parameters stacked by nn.scan get a leading 'layers'. Traced
    with jax.eval_shape: nothing is compiled or allocated. A parameter whose module declares no
    names for it is an error naming it (it would otherwise be silently replicated)."""
    declared = {}

    def record(next_fun, call_args, kwargs, context):
        m = context.module
        if context.method_name == "__call__" and hasattr(m, "param_axes"):
            declared[tuple(m.path)] = m.param_axes()
        return next_fun(*call_args, **kwargs)

    with nn.intercept_methods(record):
        shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args))
    out, missing = {}, []
    for col in collections:
        names = {}
        for path, leaf in traverse_util.flatten_dict(shapes.get(col, {})).items():
            axes = declared.get(path[:-1], {}).get(path[-1])
            if axes is not None and len(axes) == len(leaf.shape) - 1:
                axes = ("layers",) + tuple(axes)  # stacked by nn.scan
            if axes is None or len(axes) != len(leaf.shape):
                missing.append(f"{col}/{'/'.join(path)} {tuple(leaf.shape)}: "
                               + ("no logical axis names declared" if axes is None else f"declared {axes}"))
                continue
            names[path] = tuple(axes)
        out[col] = traverse_util.unflatten_dict(names) if names else {}
    if missing:
        raise ValueError(f"{type(module).__name__}: parameters without logical axis names (declare them where "
                         "the parameter is created, e.g. Dense(axes=(in, out))):\n  " + "\n  ".join(missing))
    return out


# ----------------------------------------------------------------------------- attention

ATTENTION_IMPLS = ("xla", "cudnn", "splash")


def platform_attention(platform: str, compute_dtype: str = "bfloat16") -> str:
    """The attention kernel `attention='auto'` runs on `platform` (a jax platform name, or an ahead-of-time
    target's: 'tpu', 'gpu' / 'cuda', 'rocm', 'cpu'): Pallas splash on TPUs, cuDNN's fused attention on
    NVIDIA GPUs when the matmuls are bfloat16 or float16 (the only inputs cuDNN takes), 'xla' otherwise
    (CPUs, ROCm GPUs, float32 compute)."""
    if platform == "tpu":
        return "splash"
    if platform in ("gpu", "cuda") and compute_dtype in ("bfloat16", "float16"):
        return "cudnn"
    return "xla"


def local_platform() -> str:
    """The platform this process computes on, as `platform_attention` names it ('rocm' for AMD GPUs,
    which jax also calls 'gpu')."""
    device = jax.devices()[0]
    if device.platform == "gpu" and "rocm" in str(getattr(device.client, "platform_version", "")).lower():
        return "rocm"
    return device.platform


def attention(q, k, v, key_mask=None, impl: str = "xla", splash_block: int | None = None, name: str = ""):
    """Softmax attention, [B, S, H, D] layout, scale 1/sqrt(D).

    key_mask: [B, Sk] bool, True for keys that may be attended to. The 'cudnn' path turns it
    into per-sample key lengths, so it must be a prefix mask (valid keys first, padding as a
    suffix), which is how the DiT orders its sequence (visual tokens, then text).
    The 'xla' path accepts any mask; its logits and softmax run in float32.
    'splash' is the Pallas TPU kernel (mochi_jax.models.splash; interpreted off TPU, as the tests
    run it), with q/kv tiles of `splash_block` tokens (None: that module's default).

    name: ATTENTION_NAME (or '' for none) marks what the backward pass needs from the attention, so
    that a remat policy keeping it (remat.remat_policy) skips the attention's forward in the backward pass:
    the output on 'xla'; on the fused kernels their residuals, the output and the softmax statistics
    (naming only their output would keep it and still rerun the kernel for the statistics).
    """
    if impl == "xla":
        scale = 1.0 / math.sqrt(q.shape[-1])
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
        if key_mask is not None:
            logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        return checkpoint_name(out, name) if name else out
    if impl == "cudnn":  # its forward is recognised by the policies (remat.py matches it), not named
        return fused_attention(q, k, v, key_mask, "cudnn")
    if impl == "splash":
        return splash.splash_attention(q, k, v, key_mask, block=splash_block or splash.DEFAULT_BLOCK,
                                       residual_name=name and remat_lib.kernel_residual_name(name))
    raise ValueError(f"unknown attention implementation {impl!r}; choose one of {ATTENTION_IMPLS}")


def fused_attention(q, k, v, key_mask, implementation):
    """jax.nn.dot_product_attention with the prefix `key_mask` given as per-sample key lengths.
    'cudnn' needs bfloat16/float16 inputs on an NVIDIA GPU; 'xla' runs anywhere (tests)."""
    lengths = None if key_mask is None else jnp.sum(key_mask, axis=-1, dtype=jnp.int32)
    # every query is real; said explicitly, and computed from the key lengths so that under vmap both
    # are batched alike (cuDNN's batching rule reshapes them with the queries; a sweep's text mask
    # comes in once per variant for that reason: lib/sampling.py per_variant_mask)
    q_lengths = None if lengths is None else lengths * 0 + q.shape[1]
    return jax.nn.dot_product_attention(q, k, v, query_seq_lengths=q_lengths, key_value_seq_lengths=lengths,
                                        implementation=implementation)


# ----------------------------------------------------------------------------- layer stacks

def stack_layers(tree: dict, name: str, n: int, shardings=None) -> dict:
    """{name_0 .. name_{n-1}: layer} -> {name: layers stacked on a leading axis}, as scanned
    modules expect. Checkpoints keep layers unrolled so conversion holds one tensor at a time;
    this stacks them leaf by leaf (at most one stacked leaf exists twice), each straight into
    shardings[name] (for the stacked layout) when given."""
    names = [f"{name}_{i}" for i in range(n)]
    flat = [traverse_util.flatten_dict(tree[k]) for k in names]
    target = traverse_util.flatten_dict(shardings[name]) if shardings is not None else {}
    stacked = {}
    for path in list(flat[0]):
        xs = [layer.pop(path) for layer in flat]
        sharding = target.get(path)
        if sharding is not None and sharding.memory_kind not in (None, "device"):
            stacked[path] = _stack_in_host_memory(xs, sharding)  # jit computes on the device only
        else:
            stacked[path] = _stack(*xs, sharding=sharding)
        del xs
    out = {k: v for k, v in tree.items() if k not in names}
    out[name] = traverse_util.unflatten_dict(stacked)
    return out


@functools.partial(jax.jit, static_argnames=("sharding",))
def _stack(*layers, sharding=None):
    """The layers stacked on a new leading axis, laid out as `sharding` (static: equal layer shapes
    and shardings compile once, in jax.jit's own cache)."""
    out = jnp.stack(layers)
    return out if sharding is None else jax.lax.with_sharding_constraint(out, sharding)


def _stack_in_host_memory(layers, sharding):
    """The layers (each laid out as `sharding` without its leading axis, in the same host memory)
    stacked into `sharding` by this process's hosts, shard by shard: nothing passes through a device."""
    def local(x, index):
        for shard in x.addressable_shards:
            if tuple(shard.index) == tuple(index):
                return np.asarray(shard.data)
        return np.asarray(x)[tuple(index)]  # a layout the shards do not match: the whole layer (one process)

    def block(index):
        rows = range(len(layers))[index[0]]
        return np.stack([local(layers[i], index[1:]) for i in rows])

    return jax.make_array_from_callback((len(layers), *layers[0].shape), sharding, block)


def unstack_shardings(shardings: dict, name: str, n: int) -> dict:
    """NamedShardings of the stacked layout -> the unrolled one (the leading layer axis dropped)."""
    def drop_layer_axis(sh):
        return jax.sharding.NamedSharding(sh.mesh, jax.sharding.PartitionSpec(*tuple(sh.spec)[1:]),
                                          memory_kind=sh.memory_kind)

    out = {k: v for k, v in shardings.items() if k != name}
    per_layer = jax.tree_util.tree_map(drop_layer_axis, shardings[name])
    out.update({f"{name}_{i}": per_layer for i in range(n)})
    return out
