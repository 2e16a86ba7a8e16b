"""Render prompts to mp4: `python -m mochi_jax.sample --config=configs/sample.py[:demo] --config.prompt="..."`.

Loads T5 (prompt and negative prompt are encoded, then T5 is freed), the DiT with any number of
LoRAs (each at its own strength, applied unmerged as one combined adapter, so the frozen weights
stay exact), runs the Euler flow sampler with classifier-free guidance (mochi_jax/lib/sampling.py)
and decodes with the (tiled) VAE. Videos are written as <out_dir>/<prompt slug>_seed<seed>.mp4.
Deterministic for a seed.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import jax
import numpy as np

from mochi_jax import cli, demo
from mochi_jax.checkpoints import dit_config, load_dit, load_vae, t5_settings, vae_settings
from mochi_jax.checkpoints.files import writable_dir
from mochi_jax.checkpoints.runs import load_loras
from mochi_jax.lib import sampling
from mochi_jax.lib.text import TextEncoder
from mochi_jax.lib.video import write_mp4


def slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:n] or "video"


def render(cfg):
    """Yield (seed, uint8 frames [F, H, W, 3]) for cfg.num_videos videos of cfg.prompt."""
    m, s = cfg.model, cfg.sampling
    t0 = time.time()
    shape = sampling.latent_shape(s.num_frames, s.height, s.width)  # validate before loading anything
    sigmas = sampling.sigma_schedule(s.steps, s.threshold_noise)
    dit_cfg = dit_config(m, remat="none", remat_groups="")
    lora = load_loras(cfg.loras, dit_cfg)  # a bad LoRA file fails here, before any heavy work
    text = TextEncoder.load(m.t5, m.tokenizer, **t5_settings(m))
    feats, mask = text([cfg.prompt, s.negative_prompt], zero_empty=s.zero_empty_negative)
    feats, mask = np.asarray(feats), np.asarray(mask)
    del text  # T5 is freed before the DiT is loaded
    _, params = load_dit(m.dit, dtype=dit_cfg.param_dtype, **dit_cfg.settings())
    vae_cfg, vae_params = load_vae(m.vae, **vae_settings(m))
    print(f"loaded models in {time.time() - t0:.1f}s; rendering {cfg.num_videos} video(s) of {s.num_frames} "
          f"frames at {s.height}x{s.width}, {s.steps} steps, cfg {s.guidance}"
          + (f", LoRAs {cfg.loras}" if lora else ""), flush=True)

    seeds = [cfg.seed + i for i in range(cfg.num_videos)]
    for start in range(0, len(seeds), cfg.batch_size):
        batch = seeds[start:start + cfg.batch_size]
        n = len(batch)
        cond = (np.repeat(feats[:1], n, 0), np.repeat(mask[:1], n, 0))
        uncond = (np.repeat(feats[1:], n, 0), np.repeat(mask[1:], n, 0))
        z = sampling.denoise(dit_cfg, params, sampling.initial_noise(batch, shape), cond, uncond, sigmas,
                             s.guidance, lora=lora, progress=True)
        frames = sampling.decode_frames(vae_cfg, vae_params, jax.device_get(z), tiled=s.tiled_decode)
        yield from zip(batch, frames)


def run(cfg) -> list[Path]:
    """Render and write <out_dir>/<prompt slug>_seed<seed>.mp4 for every video; returns the paths."""
    demo.ensure(cfg)
    writable_dir(cfg.out_dir)  # a read-only or misplaced output folder fails now, not after rendering
    paths = []
    for seed, frames in render(cfg):
        paths.append(write_mp4(Path(cfg.out_dir) / f"{slug(cfg.prompt)}_seed{seed}.mp4", frames, fps=cfg.sampling.fps))
        print(f"wrote {paths[-1]}", flush=True)
    return paths


def main():
    cli.run("configs/sample.py", run, "sampling configuration: configs/sample.py[:preset]", command="mochi_jax.sample")


if __name__ == "__main__":
    main()
