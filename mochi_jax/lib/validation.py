"""Validation during training: videos of fixed prompts and seeds, their CLIP metrics, and the
held-out flow loss at fixed sigmas (the cheap deterministic curve that tells learning from
overfitting).

    validator = Validator(cfg, dit_cfg, heldout)   # T5 runs here, once, and is freed
    values = validator(step, params, lora, targets, run_dir)   # {'val_loss': ..., 'val/clip_t': ...}

`cfg` is a training config (configs/lora.py): `cfg.validation` says what to do (`every`, `prompts`,
`seed`, `sampling` settings, `holdout` clips, `loss_sigmas`, optional `clip` scorer) and
`cfg.model` where the VAE, T5 and tokenizer are.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import numpy as np

from mochi_jax.checkpoints import load_vae
from mochi_jax.lib import metrics, sampling, training
from mochi_jax.lib.clip import Scorer
from mochi_jax.lib.text import TextEncoder
from mochi_jax.lib.video import write_mp4
from mochi_jax.models.dit import MochiDiT


class Validator:
    """Everything validation needs, prepared once per run (text features, the VAE, the CLIP scorer,
    the jitted held-out loss)."""

    def __init__(self, cfg, dit_cfg, heldout, targets):
        v, m = cfg.validation, cfg.model
        self.cfg, self.dit_cfg, self.heldout, self.targets = cfg, dit_cfg, heldout, targets
        self.render = v.every > 0 and len(v.prompts) > 0
        self.text = self.vae = self.scorer = None
        if self.render:
            s = v.sampling
            text = TextEncoder.load(m.t5, m.tokenizer)  # T5 comes and goes before the DiT is loaded
            n = len(v.prompts)
            feats, mask = text(list(v.prompts) + [s.negative_prompt] * n, zero_empty=s.zero_empty_negative)
            self.text = (feats[:n], mask[:n]), (feats[n:], mask[n:])
            self.vae = load_vae(m.vae, compute_dtype=m.compute_dtype)
            if v.clip.checkpoint:
                self.scorer = Scorer(v.clip.checkpoint, v.clip.tokenizer, v.clip.batch)
                self.prompt_emb = self.scorer.text(list(v.prompts))
        model = MochiDiT(dit_cfg, targets)
        self.loss_fn = jax.jit(functools.partial(training.flow_loss, model, formulation=cfg.loss.formulation))

    def due(self, step: int) -> bool:
        every = self.cfg.validation.every
        return every > 0 and (step % every == 0 or step == self.cfg.steps)

    def __call__(self, step: int, params, lora, run_dir: Path) -> tuple[dict, list[str]]:
        """(metric values, paths of the videos written) at `step`."""
        v, values, paths = self.cfg.validation, {}, []
        if self.heldout:
            values.update(training.validation_loss(self.loss_fn, params, lora, self.heldout, v.loss_sigmas,
                                                   self.cfg.seed))
        if self.render:
            videos = self.videos(step, params, lora, run_dir)
            paths = [p for p, _ in videos]
            if self.scorer is not None:
                per = [metrics.video_metrics(f, self.scorer.images(f), self.prompt_emb[i])
                       for i, (_, f) in enumerate(videos)]
                values.update({f"val/{k}": float(np.mean([p[k] for p in per])) for k in per[0]})
        return values, paths

    def videos(self, step: int, params, lora, run_dir: Path) -> list[tuple[str, np.ndarray]]:
        """Render the validation prompts with fixed seeds; [(path, uint8 frames)] (process 0 writes)."""
        v = self.cfg.validation
        s = v.sampling
        cond, uncond = self.text
        seeds = [v.seed + i for i in range(len(v.prompts))]
        noise = sampling.initial_noise(seeds, sampling.latent_shape(s.num_frames, s.height, s.width))
        z = sampling.denoise(self.dit_cfg, params, noise, cond, uncond,
                             sampling.sigma_schedule(s.steps, s.threshold_noise), s.guidance, lora=(lora, self.targets))
        frames = sampling.decode_frames(*self.vae, z, tiled=s.tiled_decode)
        out = []
        for i, clip in enumerate(frames):
            path = run_dir / "samples" / f"step{step:06d}_prompt{i}_seed{seeds[i]}.mp4"
            if jax.process_index() == 0:
                write_mp4(path, clip, fps=s.fps)
            out.append((str(path), clip))
        return out


def is_validation_row(row: dict) -> bool:
    """Whether a metrics.jsonl row holds validation values (what a Validator returns: val_loss,
    val_loss/sigma_*, val/*) rather than training ones."""
    keys = set(row) - {"step"}
    return bool(keys) and all(k == "val_loss" or k.startswith(("val_loss/", "val/")) for k in keys)
