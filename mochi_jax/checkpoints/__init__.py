"""Checkpoints: PyTorch safetensors -> our orbax layout (streaming converters), loading and saving
converted models (straight into shardings), LoRA files in every format, and training runs' LoRAs.

    convert_dit / convert_t5 / convert_vae / convert_clip   (tools/convert_weights.py)
    load_dit / load_t5 / load_vae / load_clip, dit_config   (config and params of a converted model)
    vae_settings / t5_settings, vae_config / t5_config      (a command's config block -> load_vae / load_t5
                                                             keywords, or the config without loading)
    lora_read / lora_write                                  (genmo / ComfyUI / kohya / diffusers LoRAs)
    runs                                                    (the LoRA of a training run directory)
"""

from __future__ import annotations

from mochi_jax.checkpoints.clip import convert_clip, load_clip
from mochi_jax.checkpoints.dit import convert_dit, dit_config, load_dit
from mochi_jax.checkpoints.orbax_io import load_model, load_tree, read_metadata, save_model, write
from mochi_jax.checkpoints.safetensors_io import ConversionError, TensorSource
from mochi_jax.checkpoints.t5 import convert_t5, load_t5, t5_config, t5_settings
from mochi_jax.checkpoints.vae import convert_vae, load_vae, vae_config, vae_settings

__all__ = ["ConversionError", "TensorSource", "convert_clip", "convert_dit", "convert_t5", "convert_vae", "dit_config",
           "load_clip", "load_dit", "load_model", "load_t5", "load_tree", "load_vae", "read_metadata", "save_model",
           "t5_config", "t5_settings", "vae_config", "vae_settings", "write"]
