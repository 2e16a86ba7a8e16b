"""Render prompts to mp4: `python -m mochi_jax.sample --config=configs/sample.py[:demo] --config.prompt="..."`.

Loads T5 (prompt and negative prompt are encoded, then T5 is freed), the DiT with any number of
LoRAs (each at its own strength, applied unmerged as one combined adapter, so the frozen weights
stay exact), runs the Euler flow sampler with classifier-free guidance and decodes with the
(tiled) VAE. Videos are written as <out_dir>/<prompt slug>_seed<seed>.mp4. Deterministic for a seed.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np


def parse_loras(spec: str) -> list[tuple[str, float]]:
    """'a.safetensors:0.8,b.safetensors' -> [('a.safetensors', 0.8), ('b.safetensors', 1.0)]."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        path, strength = item, 1.0
        m = re.fullmatch(r"(.+):([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)", item)
        if m:
            path, strength = m.group(1), float(m.group(2))
        out.append((path, strength))
    return out


def load_lora_or_run(path, dit_cfg):
    """(factors, targets) from a LoRA file in any supported format (checked against `dit_cfg`) or
    from a training run directory (its latest checkpoint)."""
    from mochi_jax import lora_io
    from mochi_jax.train import load_run_lora

    p = Path(path)
    if p.is_dir():
        return load_run_lora(p)
    if p.is_file():
        return lora_io.load_lora(p, cfg=dit_cfg)[:2]
    raise FileNotFoundError(f"LoRA {p} does not exist")


def load_loras(spec, dit_cfg):
    """(factors, targets) of the combined adapter for 'path[:strength],...', or None for no LoRA."""
    from mochi_jax import lora_io

    loras = [(*load_lora_or_run(path, dit_cfg), strength)
             for path, strength in (parse_loras(spec) if isinstance(spec, str) else spec)]
    return lora_io.combine(loras) if loras else None


def slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:n] or "video"


def render(cfg):
    """Yield (seed, uint8 frames [F, H, W, 3]) for cfg.num_videos videos of cfg.prompt."""
    import jax

    from mochi_jax import sampling
    from mochi_jax.convert import load_vae
    from mochi_jax.text import TextEncoder
    from mochi_jax.weights import dit_config, load_dit

    t0 = time.time()
    shape = sampling.latent_shape(cfg.num_frames, cfg.height, cfg.width)  # validate before loading anything
    sigmas = sampling.sigma_schedule(cfg.steps, cfg.threshold_noise)
    overrides = dict(compute_dtype=cfg.compute_dtype, attention=cfg.attention, remat="none")
    dit_cfg = dit_config(cfg.dit, param_dtype=cfg.param_dtype, **overrides)
    lora = load_loras(cfg.loras, dit_cfg)  # a bad LoRA file fails here, before any heavy work
    text = TextEncoder.load(cfg.t5, cfg.tokenizer)
    feats, mask = text([cfg.prompt, cfg.negative_prompt], zero_empty=cfg.zero_empty_negative)
    feats, mask = np.asarray(feats), np.asarray(mask)
    del text  # T5 is freed before the DiT is loaded
    _, params = load_dit(cfg.dit, dtype=cfg.param_dtype, **overrides)
    vae_cfg, vae_params = load_vae(cfg.vae, compute_dtype=cfg.compute_dtype)
    print(f"loaded models in {time.time() - t0:.1f}s; rendering {cfg.num_videos} video(s) of {cfg.num_frames} "
          f"frames at {cfg.height}x{cfg.width}, {cfg.steps} steps, cfg {cfg.guidance}"
          + (f", LoRAs {cfg.loras}" if lora else ""), flush=True)

    seeds = [cfg.seed + i for i in range(cfg.num_videos)]
    for start in range(0, len(seeds), cfg.batch_size):
        batch = seeds[start:start + cfg.batch_size]
        n = len(batch)
        cond = (np.repeat(feats[:1], n, 0), np.repeat(mask[:1], n, 0))
        uncond = (np.repeat(feats[1:], n, 0), np.repeat(mask[1:], n, 0))
        z = sampling.denoise(dit_cfg, params, sampling.initial_noise(batch, shape), cond, uncond, sigmas,
                             cfg.guidance, lora=lora, progress=True)
        frames = sampling.decode_frames(vae_cfg, vae_params, jax.device_get(z), tiled=cfg.tiled_decode)
        yield from zip(batch, frames)


def run(cfg) -> list[Path]:
    """Render and write <out_dir>/<prompt slug>_seed<seed>.mp4 for every video; returns the paths."""
    from mochi_jax.video import write_mp4

    paths = []
    for seed, frames in render(cfg):
        paths.append(write_mp4(Path(cfg.out_dir) / f"{slug(cfg.prompt)}_seed{seed}.mp4", frames, fps=cfg.fps))
        print(f"wrote {paths[-1]}", flush=True)
    return paths


def main():
    from mochi_jax import cli

    cli.run("configs/sample.py", run, "sampling configuration: configs/sample.py[:preset]")


if __name__ == "__main__":
    main()
