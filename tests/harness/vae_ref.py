"""Test helpers: tiny random diffusers AutoencoderKLMochi models, written in both checkpoint layouts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from mochi_jax.models.vae import VAEConfig

# Small but with every count distinct where it matters: channels divisible by 32 (GroupNorm groups
# and attention head size), layer counts that differ between stages (the decoder reads them
# backwards), and attention flags that differ from the released (False, True, True, True, True).
PARITY_CONFIGS = {
    "c32": dict(encoder_channels=(32, 32, 64, 64), decoder_channels=(32, 64, 64, 64),
                layers_per_block=(1, 1, 1, 1, 1)),
    "c64": dict(encoder_channels=(32, 64, 64, 96), decoder_channels=(64, 64, 96, 128),
                layers_per_block=(2, 1, 1, 2, 1), encoder_attention=(True, False, True, True, False)),
}


def our_config(name: str, **kw) -> VAEConfig:
    return VAEConfig(**PARITY_CONFIGS[name], param_dtype="float32", compute_dtype="float32", **kw)


def make_reference(cfg: VAEConfig, seed: int = 0):
    """A diffusers AutoencoderKLMochi with every parameter random, norms included (their default
    weight 1 / bias 0 would hide a swapped scale and bias)."""
    from diffusers import AutoencoderKLMochi

    torch.manual_seed(seed)
    model = AutoencoderKLMochi(
        encoder_block_out_channels=cfg.encoder_channels, decoder_block_out_channels=cfg.decoder_channels,
        latent_channels=cfg.latent_channels, layers_per_block=cfg.layers_per_block,
        temporal_expansions=cfg.temporal_expansions, spatial_expansions=cfg.spatial_expansions,
        add_attention_block=cfg.encoder_attention)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.3 * torch.randn(p.shape, generator=g))
            else:
                fan_in = int(np.prod(p.shape[1:])) if p.ndim > 1 else p.shape[0]
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
    return model.eval()


def state_dict_np(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def params_from_state_dict(cfg: VAEConfig, sd: dict) -> dict:
    """Our params straight from a diffusers state dict (the converter's leaves, no files)."""
    import jax.numpy as jnp

    from mochi_jax.checkpoints.orbax_io import nest
    from mochi_jax.checkpoints.vae import plan

    class Source:
        def get(self, key):
            return sd[key]

    return nest({leaf.path: jnp.asarray(leaf.build(Source())) for leaf in plan(cfg, "diffusers")})


def write_diffusers(sd: dict, root: Path, shards: int = 1) -> Path:
    """A diffusers repo root with vae/ (optionally sharded with an index); returns the root."""
    from safetensors.numpy import save_file

    vae = root / "vae"
    vae.mkdir(parents=True)
    keys = sorted(sd)
    if shards == 1:
        save_file({k: sd[k] for k in keys}, str(vae / "diffusion_pytorch_model.safetensors"))
        return root
    weight_map = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_file({k: sd[k] for k in part}, str(vae / name))
        weight_map.update({k: name for k in part})
    (vae / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    return root


# ----------------------------------------------------------------------------- genmo layout

_RES = {"norm1.norm_layer": "stack.0", "conv1.conv": "stack.2", "norm2.norm_layer": "stack.3", "conv2.conv": "stack.5"}


def diffusers_to_genmo(sd: dict, layers_per_block) -> tuple[dict, dict]:
    """The test's own diffusers -> genmo map (independent of mochi_jax.checkpoints): (encoder, decoder) dicts."""
    n = list(layers_per_block)
    nd = len(n) - 2
    enc, dec = {}, {}
    qkv: dict[str, dict[str, np.ndarray]] = {}

    def block_slot(part, stage, idx):
        """genmo prefix of resnet `idx` of diffusers stage `stage` (e.g. 'down_blocks.1')."""
        if part == "encoder":
            if stage == "block_in":
                return f"layers.{1 + idx}"
            if stage == "block_out":
                return f"layers.{1 + n[0] + nd + idx}"
            j = int(stage.split(".")[1])
            return f"layers.{1 + n[0] + j}.layers.{1 + idx}"
        if stage == "block_in":
            return f"blocks.0.{1 + idx}"
        if stage == "block_out":
            return f"blocks.{nd + 1}.{idx}"
        j = int(stage.split(".")[1])
        return f"blocks.{1 + j}.blocks.{idx}"

    for key, value in sd.items():
        part, rest = key.split(".", 1)
        out = enc if part == "encoder" else dec
        m = re.fullmatch(r"(block_in|block_out|(?:down|up)_blocks\.\d+)\.(resnets|norms|attentions)\.(\d+)\.(.+)", rest)
        if m:
            stage, kind, idx, tail = m.group(1), m.group(2), int(m.group(3)), m.group(4)
            slot = block_slot(part, stage, idx)
            if kind == "resnets":
                mod, leaf = tail.rsplit(".", 1)
                out[f"{slot}.{_RES[mod]}.{leaf}"] = value
            elif kind == "norms":
                out[f"{slot}.attn_block.norm.{tail.rsplit('.', 1)[1]}"] = value
            elif tail.startswith("to_out.0."):
                out[f"{slot}.attn_block.attn.out.{tail.rsplit('.', 1)[1]}"] = value
            else:  # to_q / to_k / to_v weights, fused below
                qkv.setdefault(f"{slot}.attn_block.attn.qkv.weight", {})[tail[3]] = value
            continue
        m = re.fullmatch(r"down_blocks\.(\d+)\.conv_in\.conv\.(weight|bias)", rest)
        if m:
            enc[f"layers.{1 + n[0] + int(m.group(1))}.layers.0.{m.group(2)}"] = value
            continue
        m = re.fullmatch(r"up_blocks\.(\d+)\.proj\.(weight|bias)", rest)
        if m:
            dec[f"blocks.{1 + int(m.group(1))}.proj.{m.group(2)}"] = value
            continue
        simple = {"encoder.proj_in.weight": "layers.0.weight", "encoder.proj_in.bias": "layers.0.bias",
                  "encoder.norm_out.norm_layer.weight": "output_norm.weight",
                  "encoder.norm_out.norm_layer.bias": "output_norm.bias",
                  "encoder.proj_out.weight": "output_proj.weight",
                  "decoder.conv_in.weight": "blocks.0.0.weight", "decoder.conv_in.bias": "blocks.0.0.bias",
                  "decoder.proj_out.weight": "output_proj.weight", "decoder.proj_out.bias": "output_proj.bias"}
        out[simple[key]] = value
    for k, parts in qkv.items():
        (enc if k.startswith("layers.") else dec)[k] = np.concatenate([parts["q"], parts["k"], parts["v"]], axis=0)
    return enc, dec


def write_genmo(sd: dict, layers_per_block, folder: Path) -> Path:
    from safetensors.numpy import save_file

    enc, dec = diffusers_to_genmo(sd, layers_per_block)
    folder.mkdir(parents=True)
    save_file(enc, str(folder / "encoder.safetensors"))
    save_file(dec, str(folder / "decoder.safetensors"))
    return folder


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
