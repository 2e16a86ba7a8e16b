"""Weight-only quantization of the frozen DiT base: int8 or float8_e4m3fn kernels with one float32
scale per output channel.

    q, scale = quantize(w, "int8")        # w [..., in, out] -> q [..., in, out] int8, scale [..., out] f32
    w ~= dequantize(q, scale, bf16)       # q * scale, in the compute dtype

scale = max |w| over the input dimension / the format's largest value (127 for int8, 448 for
float8_e4m3fn); int8 rounds to the nearest integer, float8 to the nearest representable value.
A column of zeros gets scale 1.

What is quantized (`QUANTIZED_MODULES`): every Dense kernel of the 47 stacked joint blocks
('blocks') and of 'last_block', about 99 % of the DiT's weights. Their biases, the q/k RMS norm
weights, the embedders (x_embedder, t_embedder, t5_y_embedder, t5_yproj), pos_frequencies and
final_layer stay bfloat16 (`STORAGE_DTYPE`). Each quantized kernel has a float32 'kernel_scale'
[out] beside it (stacked with a leading layer axis under the scan like the kernel).
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np

QUANT_DTYPES = ("int8", "float8_e4m3fn")
FLOAT_DTYPES = ("float32", "bfloat16", "float16")
PARAM_DTYPES = FLOAT_DTYPES + QUANT_DTYPES
QMAX = {"int8": 127.0, "float8_e4m3fn": float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)}  # 448
STORAGE_DTYPE = "bfloat16"  # the weights a quantized base keeps unquantized
QUANTIZED_MODULES = ("blocks", "last_block")  # top-level names (checkpoints: blocks_N too)


def dtype_name(dtype) -> str:
    """'int8', 'float8_e4m3fn', 'bfloat16', ... of a dtype or its name ('' when it is not a dtype)."""
    try:
        return np.dtype(jnp.dtype(dtype)).name
    except TypeError:
        return ""


def check_param_dtype(dtype, flag: str = "model.param_dtype") -> str:
    """The canonical name of a DiT weight format, or a ValueError naming `flag` and the choices."""
    name = dtype_name(dtype) if dtype is not None else ""
    if name not in PARAM_DTYPES:
        raise ValueError(f"{flag}={dtype!r} is not a DiT weight format; choose one of {', '.join(PARAM_DTYPES)}")
    return name


def is_quantized(dtype) -> bool:
    return dtype_name(dtype) in QUANT_DTYPES if dtype is not None else False


def quantize(w, dtype: str):
    """w [..., in, out] (NumPy or JAX) -> (q [..., in, out] of `dtype`, scale [..., out] float32)."""
    name = check_param_dtype(dtype, "quantize dtype")
    if name not in QUANT_DTYPES:
        raise ValueError(f"quantize: {name} is not a quantized format ({', '.join(QUANT_DTYPES)})")
    xp = np if isinstance(w, np.ndarray) else jnp
    w = w.astype(xp.float32)
    amax = xp.max(xp.abs(w), axis=-2)
    scale = xp.where(amax > 0, amax / QMAX[name], 1.0).astype(xp.float32)
    x = w / scale[..., None, :]
    if name == "int8":
        q = xp.clip(xp.round(x), -127, 127).astype(xp.int8)
    else:
        q = xp.clip(x, -QMAX[name], QMAX[name]).astype(ml_dtypes.float8_e4m3fn)
    return q, scale


def dequantize(q, scale, dtype=jnp.float32):
    """q [..., in, out] * scale [..., out], computed in float32 and returned as `dtype`."""
    xp = np if isinstance(q, np.ndarray) else jnp
    return (q.astype(xp.float32) * scale[..., None, :].astype(xp.float32)).astype(dtype)


def is_quantized_kernel(path) -> bool:
    """Whether the leaf at `path` (a tuple of names, scanned or unrolled layout) is a kernel a
    quantized base stores quantized."""
    top = path[0]
    return path[-1] == "kernel" and (top in QUANTIZED_MODULES or top.startswith("blocks_"))


def quantize_params(params: dict, dtype: str) -> dict:
    """A DiT params tree (any float dtype, scanned or unrolled) as a quantized base: the kernels
    `is_quantized_kernel` names quantized with a 'kernel_scale' beside them, every other leaf cast
    to STORAGE_DTYPE. Leaf by leaf (NumPy leaves stay NumPy)."""
    def walk(tree, path):
        out = {}
        for k, v in tree.items():
            if isinstance(v, dict):
                out[k] = walk(v, path + (k,))
            elif is_quantized_kernel(path + (k,)):
                out["kernel"], out["kernel_scale"] = quantize(v, dtype)
            elif k != "kernel_scale":
                out[k] = v.astype(STORAGE_DTYPE) if jnp.issubdtype(v.dtype, jnp.floating) else v
        return out

    return walk(dict(params), ())


def dequantize_params(params: dict, dtype: str) -> dict:
    """A quantized params tree back to one float `dtype` (kernel * kernel_scale; scales dropped)."""
    def walk(tree):
        out = {}
        for k, v in tree.items():
            if isinstance(v, dict):
                out[k] = walk(v)
            elif k == "kernel" and "kernel_scale" in tree:
                out[k] = dequantize(v, tree["kernel_scale"], dtype)
            elif k != "kernel_scale":
                out[k] = v.astype(dtype)
        return out

    return walk(dict(params))
