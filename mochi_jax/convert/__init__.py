"""Checkpoint converters (PyTorch safetensors -> our orbax checkpoints)."""

from __future__ import annotations

from mochi_jax.convert import dit as _dit
from mochi_jax.convert.clip import convert_clip, load_clip
from mochi_jax.convert.common import ConversionError, TensorSource, read_metadata, write
from mochi_jax.convert.t5 import convert_t5, load_t5
from mochi_jax.convert.vae import convert_vae, load_vae

__all__ = ["ConversionError", "TensorSource", "convert_clip", "convert_dit", "convert_t5", "convert_vae", "load_clip",
           "load_t5", "load_vae", "read_metadata"]


def convert_dit(src_path, out_dir, dtype="bfloat16", overwrite=False, progress=True):
    """Convert a genmo or diffusers DiT checkpoint into our orbax layout; returns (out_dir, DiTConfig).

    Every key and shape is checked before anything is written.
    """
    import numpy as np
    import jax.numpy as jnp

    src, layout = _dit.open_dit(src_path)
    cfg = _dit.check(src, layout)
    meta = {"model": "mochi_dit", "source": str(src_path), "source_layout": layout, "config": cfg.arch()}
    np_dtype = np.dtype(jnp.dtype(dtype))
    out = write(_dit.plan(cfg, layout), src, out_dir, np_dtype, meta,
                overwrite=overwrite, progress=progress)
    return out, cfg
