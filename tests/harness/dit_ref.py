"""Test helpers: tiny random diffusers Mochi transformers, written in both checkpoint layouts."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from mochi_jax.models.dit import DiTConfig

# (heads, head_dim, text_width, t5_dim, depth): small but every dimension distinct.
PARITY_CONFIGS = {
    "h2d16": dict(num_heads=2, head_dim=16, text_width=32, t5_dim=32, depth=3),
    "h3d8": dict(num_heads=3, head_dim=8, text_width=16, t5_dim=24, depth=4),
    "h4d8": dict(num_heads=4, head_dim=8, text_width=24, t5_dim=16, depth=3),
}


def our_config(name: str, **kw) -> DiTConfig:
    return DiTConfig(**PARITY_CONFIGS[name], time_embed_dim=32, param_dtype="float32",
                     compute_dtype="float32", remat="none", **kw)


def make_reference(cfg: DiTConfig, seed: int = 0):
    """A diffusers MochiTransformer3DModel with every parameter random (incl. pos_frequencies
    and the q/k norm weights, which the reference initialises to constants)."""
    from diffusers import MochiTransformer3DModel

    torch.manual_seed(seed)
    model = MochiTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        num_layers=cfg.depth, pooled_projection_dim=cfg.text_width, in_channels=cfg.in_channels,
        text_embed_dim=cfg.t5_dim, time_embed_dim=cfg.time_embed_dim)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = 0.5 if ("norm" in name or name == "pos_frequencies") else 1.0 / max(1, p.shape[-1]) ** 0.5
            base = 1.0 if re.search(r"norm_(added_)?[qk]\.weight$", name) else 0.0
            p.copy_(base + std * torch.randn(p.shape, generator=g))
    return model.eval()


def diffusers_to_genmo(sd: dict) -> dict:
    """The test's own diffusers -> genmo key map (independent of mochi_jax.checkpoints)."""
    out = {}
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks."))

    def swap(x):
        h = x.shape[0] // 2
        return torch.cat([x[h:], x[:h]])

    top = {"patch_embed.proj": "x_embedder.proj", "time_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
           "time_embed.timestep_embedder.linear_2": "t_embedder.mlp.2", "time_embed.pooler.to_kv": "t5_y_embedder.to_kv",
           "time_embed.pooler.to_q": "t5_y_embedder.to_q", "time_embed.pooler.to_out": "t5_y_embedder.to_out",
           "time_embed.caption_proj": "t5_yproj", "proj_out": "final_layer.linear"}
    for d, g in top.items():
        for s in ("weight", "bias"):
            out[f"{g}.{s}"] = sd[f"{d}.{s}"]
    out["pos_frequencies"] = sd["pos_frequencies"]
    for s in ("weight", "bias"):
        out[f"final_layer.mod.{s}"] = swap(sd[f"norm_out.linear.{s}"])
    for n in range(depth):
        d, g = f"transformer_blocks.{n}.", f"blocks.{n}."
        last = n == depth - 1
        for s in ("weight", "bias"):
            out[g + f"mod_x.{s}"] = sd[d + f"norm1.linear.{s}"]
            out[g + f"mod_y.{s}"] = sd[d + ("norm1_context.linear_1." if last else "norm1_context.linear.") + s]
            out[g + f"attn.proj_x.{s}"] = sd[d + f"attn1.to_out.0.{s}"]
            if not last:
                out[g + f"attn.proj_y.{s}"] = sd[d + f"attn1.to_add_out.{s}"]
        out[g + "attn.qkv_x.weight"] = torch.cat([sd[d + f"attn1.to_{c}.weight"] for c in "qkv"])
        out[g + "attn.qkv_y.weight"] = torch.cat([sd[d + f"attn1.add_{c}_proj.weight"] for c in "qkv"])
        for ours, theirs in (("q_norm_x", "norm_q"), ("k_norm_x", "norm_k"), ("q_norm_y", "norm_added_q"),
                             ("k_norm_y", "norm_added_k")):
            out[g + f"attn.{ours}.weight"] = sd[d + f"attn1.{theirs}.weight"]
        out[g + "mlp_x.w1.weight"] = swap(sd[d + "ff.net.0.proj.weight"])
        out[g + "mlp_x.w2.weight"] = sd[d + "ff.net.2.weight"]
        if not last:
            out[g + "mlp_y.w1.weight"] = swap(sd[d + "ff_context.net.0.proj.weight"])
            out[g + "mlp_y.w2.weight"] = sd[d + "ff_context.net.2.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def write_both_layouts(model, root: Path) -> tuple[Path, Path]:
    """Save `model` as a sharded diffusers folder and as a genmo-layout dit.safetensors."""
    from safetensors.torch import save_file

    diff_dir = root / "transformer"
    model.save_pretrained(diff_dir, max_shard_size="20KB", safe_serialization=True)
    genmo = root / "dit.safetensors"
    save_file(diffusers_to_genmo(model.state_dict()), str(genmo))
    return diff_dir, genmo


def random_inputs(cfg: DiTConfig, batch=2, frames=2, h=6, w=10, text_len=8, valid=(3, 8), seed=0):
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((batch, cfg.in_channels, frames, h, w)).astype(np.float32)
    feats = rng.standard_normal((batch, text_len, cfg.t5_dim)).astype(np.float32)
    mask = np.zeros((batch, text_len), bool)
    for i, v in enumerate(valid[:batch]):
        mask[i, :v] = True
    sigma = rng.uniform(0.05, 0.95, batch).astype(np.float32)
    timestep = (1000.0 * (1.0 - sigma)).astype(np.float32)
    return latents, feats, mask, timestep


def reference_forward(model, latents, feats, mask, timestep) -> np.ndarray:
    with torch.no_grad():
        out = model(hidden_states=torch.from_numpy(latents), encoder_hidden_states=torch.from_numpy(feats),
                    timestep=torch.from_numpy(timestep), encoder_attention_mask=torch.from_numpy(mask),
                    return_dict=False)[0]
    return out.numpy()


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def lora_delta64(tree, targets, path) -> np.ndarray:
    """(alpha/r) a @ b of one adapted layer in float64, computed here (not by the library)."""
    node = tree
    for k in path:
        node = node[k]
    t = next(t for t in targets if t.matches("/".join(path)))
    return t.scale * np.asarray(node["a"], np.float64) @ np.asarray(node["b"], np.float64)
