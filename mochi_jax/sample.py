"""Render prompts to mp4: `python -m mochi_jax.sample --config=configs/sample.py[:demo] --config.prompt="..."`
(or `--config.prompt_file=prompts.txt`, one prompt per line).

Loads T5 (every prompt and the negative prompt are encoded, then T5 is freed), the DiT with any
number of LoRAs (each at its own strength, applied unmerged as one combined adapter, so the frozen
weights stay exact) and the VAE, once; runs the Euler flow sampler with classifier-free guidance
(mochi_jax/lib/sampling.py) over the device mesh of `cfg.mesh`, as training does: the weights
sharded by the same rules, the videos and the two guidance branches of a batch split over the data
and fsdp axes where they divide them, else the visual tokens; then decodes with the (tiled) VAE.
Videos are written as <out_dir>/<prompt slug>_seed<seed>.mp4 (with a prompt file,
<out_dir>/<n>_<prompt slug>_seed<seed>.mp4, n the prompt's number in the file). Deterministic for a seed, on any mesh and
batch size. With several processes (one per host) every process renders and process 0 writes.
SIGTERM or Ctrl-C stops it with status 75 (lib/stopping.py): alone at once, with several processes
all of them before the next batch; the videos written so far stay.
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
from mochi_jax.lib import placement, sampling
from mochi_jax.lib.stopping import Interrupted, Signals, Stopped
from mochi_jax.lib.text import TextEncoder, read_prompts
from mochi_jax.lib.video import write_mp4
from mochi_jax.models import sharding as sharding_lib


def slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:n] or "video"


def prompts_of(cfg) -> list[tuple[str, str]]:
    """(file name stem, prompt) for every prompt: cfg.prompt alone, or each line of cfg.prompt_file,
    numbered in file order (stable across runs, unique even when prompts share a slug)."""
    if not cfg.get("prompt_file"):
        return [(slug(cfg.prompt), cfg.prompt)]
    prompts = read_prompts(cfg.prompt_file)
    width = len(str(len(prompts)))
    return [(f"{i + 1:0{width}d}_{slug(p)}", p) for i, p in enumerate(prompts)]


def jobs_of(n_prompts: int, seeds: list[int], batch_size: int) -> list[list[tuple[int, int]]]:
    """(prompt index, seed) pairs, prompt by prompt, in batches of `batch_size` (the last one short)."""
    pairs = [(p, s) for p in range(n_prompts) for s in seeds]
    return [pairs[i:i + batch_size] for i in range(0, len(pairs), batch_size)]


def render(cfg, signals: Signals | None = None):
    """Yield (file name stem, seed, uint8 frames [F, H, W, 3]) for cfg.num_videos seeds of every prompt;
    before each batch, a stop signal to any process (`signals`) raises Interrupted."""
    m, s = cfg.model, cfg.sampling
    t0 = time.time()
    shape = sampling.latent_shape(s.num_frames, s.height, s.width)  # validate before loading anything
    sigmas = sampling.sigma_schedule(s.steps, s.threshold_noise)
    if cfg.batch_size < 1 or cfg.num_videos < 1:
        raise ValueError(f"batch_size ({cfg.batch_size}) and num_videos ({cfg.num_videos}) must be >= 1")
    prompts = prompts_of(cfg)
    dit_cfg = dit_config(m, remat="none", remat_groups="")
    note = placement.cpu_note(dit_cfg.width)
    if note:
        print(f"mochi_jax.sample: {note}", flush=True)
    mesh = sharding_lib.make_mesh(cfg.mesh.to_dict())
    lora = load_loras(cfg.loras, dit_cfg)  # a bad LoRA file fails here, before any heavy work
    factors, targets = lora if lora is not None else ({}, ())
    place = sampling.placement(dit_cfg, targets, mesh)  # a mesh the heads do not divide fails here too
    text = TextEncoder.load(m.t5, m.tokenizer, **t5_settings(m))
    feats, mask = text([p for _, p in prompts] + [s.negative_prompt], zero_empty=s.zero_empty_negative)
    feats, mask = np.asarray(feats), np.asarray(mask)
    del text  # T5 is freed before the DiT is loaded
    _, params = load_dit(m.dit, dtype=dit_cfg.param_dtype, shardings=place.params, **dit_cfg.settings())
    factors = jax.device_put(factors, place.lora)
    vae_cfg, vae_params = load_vae(m.vae, shardings=place.replicated, **vae_settings(m))
    print(f"loaded models in {time.time() - t0:.1f}s; rendering {cfg.num_videos} video(s) of each of {len(prompts)} "
          f"prompt(s), {s.num_frames} frames at {s.height}x{s.width}, {s.steps} steps, cfg {s.guidance}"
          + (f", LoRAs {cfg.loras}" if lora else "") + "; "
          + sampling.describe_mesh(mesh, sampling.dit_rows(cfg.batch_size, s.guidance), dit_cfg.num_heads), flush=True)

    seeds = [cfg.seed + i for i in range(cfg.num_videos)]
    for batch in jobs_of(len(prompts), seeds, cfg.batch_size):
        if signals is not None:
            signals.stop_point()
        padded = batch + [batch[-1]] * (cfg.batch_size - len(batch))  # one compiled batch shape
        rows = [p for p, _ in padded]
        cond = (feats[rows], mask[rows])
        uncond = (np.repeat(feats[-1:], len(rows), 0), np.repeat(mask[-1:], len(rows), 0))
        z = sampling.denoise(dit_cfg, params, sampling.initial_noise([sd for _, sd in padded], shape), cond, uncond,
                             sigmas, s.guidance, lora=(factors, targets), progress=jax.process_index() == 0)
        frames = sampling.decode_frames(vae_cfg, vae_params, z, tiled=s.tiled_decode)
        for (p, seed), video in zip(batch, frames):
            yield prompts[p][0], seed, video


def run(cfg) -> list[Path]:
    """Render and write every video (process 0 writes); returns the paths. Raises Stopped on SIGTERM
    or SIGINT (see the module docstring)."""
    placement.start(cfg.get("distributed"))  # several hosts: joined before any device is used
    demo.ensure(cfg)
    writable_dir(cfg.out_dir)  # a read-only or misplaced output folder fails now, not after rendering
    paths = []
    with Signals() as signals:
        try:
            for stem, seed, frames in render(cfg, signals):
                path = Path(cfg.out_dir) / f"{stem}_seed{seed}.mp4"
                if jax.process_index() == 0:
                    with signals.deferred():  # counted below once written
                        write_mp4(path, frames, fps=cfg.sampling.fps)
                    print(f"wrote {path}", flush=True)
                paths.append(path)
        except Interrupted:
            raise Stopped(f"stopped by {signals.name} after writing {len(paths)} video(s) to {cfg.out_dir}; "
                          f"a rerun renders every video again") from None
    return paths


def main():
    cli.run("configs/sample.py", run, "sampling configuration: configs/sample.py[:preset]", command="mochi_jax.sample")


if __name__ == "__main__":
    main()
