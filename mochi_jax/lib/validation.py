"""Validation during training: videos of fixed prompts and seeds, their CLIP metrics, and the
held-out flow loss at fixed sigmas (the cheap deterministic curve that tells learning from
overfitting).

    validator = Validator(cfg, dit_cfg, heldout, targets)   # T5 runs here, once, and is freed
    values, videos = validator(step, params, lora, run_dir)   # {'val_loss': ..., 'val/clip_t': ...}

With a `sweep` (mochi_jax/lib/sweep.py) `lora` is the stacked tree of its variants: every variant is
validated in the same calls (the held-out loss vmapped, the videos rendered together from the same
noise), its values named 'variant/<name>/val_loss', ... and its videos written to samples/<name>/.

`cfg` is a training config (configs/lora.py): `cfg.validation` says what to do (`every`, `prompts`,
`seed`, `sampling` settings, `holdout` clips, `loss_sigmas`, optional `clip` scorer) and
`cfg.model` where the VAE, T5 and tokenizer are.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import jax
import numpy as np

from mochi_jax.checkpoints import load_vae, t5_settings, vae_settings
from mochi_jax.lib import metrics, sampling, training
from mochi_jax.lib import sweep as sweep_lib
from mochi_jax.lib.clip import Scorer
from mochi_jax.lib.text import TextEncoder
from mochi_jax.lib.variants import denoise_variants
from mochi_jax.lib.video import write_mp4
from mochi_jax.models.dit import MochiDiT


class Validator:
    """Everything validation needs, prepared once per run (text features, the VAE, the CLIP scorer,
    the jitted held-out loss)."""

    def __init__(self, cfg, dit_cfg, heldout, targets, sweep=None):
        v, m = cfg.validation, cfg.model
        self.cfg, self.dit_cfg, self.heldout, self.targets, self.sweep = cfg, dit_cfg, heldout, targets, sweep
        self.render = v.every > 0 and len(v.prompts) > 0
        self.text = self.vae = self.scorer = None
        if self.render:
            s = v.sampling
            text = TextEncoder.load(m.t5, m.tokenizer, **t5_settings(m))  # T5 comes and goes before the DiT is loaded
            n = len(v.prompts)
            feats, mask = text(list(v.prompts) + [s.negative_prompt] * n, zero_empty=s.zero_empty_negative)
            self.text = (feats[:n], mask[:n]), (feats[n:], mask[n:])
            self.vae = load_vae(m.vae, **vae_settings(m))
            if v.clip.checkpoint:
                self.scorer = Scorer(v.clip.checkpoint, v.clip.tokenizer, v.clip.batch)
                self.prompt_emb = self.scorer.text(list(v.prompts))
        model = MochiDiT(dit_cfg, targets)
        if sweep is None:
            self.loss_fn = jax.jit(functools.partial(training.flow_loss, model, formulation=cfg.loss.formulation))
        else:
            self.loss_fn = sweep_lib.validation_loss_fn(sweep, model, cfg.loss.formulation)

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
            videos = self.videos(step, params, lora, run_dir)  # one list per variant
            paths = [p for per_variant in videos for p, _ in per_variant]
            if self.scorer is not None:
                scores = []
                for per_variant in videos:
                    per = [metrics.video_metrics(f, self.scorer.images(f), self.prompt_emb[i])
                           for i, (_, f) in enumerate(per_variant)]
                    scores.append({f"val/{k}": np.mean([p[k] for p in per]) for k in per[0]})
                values.update({k: (float(scores[0][k]) if self.sweep is None else np.array([s[k] for s in scores]))
                               for k in scores[0]})
        if self.sweep is not None:
            values = sweep_lib.per_variant(self.sweep, values)
        return values, paths

    def videos(self, step: int, params, lora, run_dir: Path) -> list[list[tuple[str, np.ndarray]]]:
        """Render the validation prompts with fixed seeds; per variant (one without a sweep) a list of
        (path, uint8 frames) (process 0 writes)."""
        v = self.cfg.validation
        s = v.sampling
        cond, uncond = self.text
        seeds = [v.seed + i for i in range(len(v.prompts))]
        noise = sampling.initial_noise(seeds, sampling.latent_shape(s.num_frames, s.height, s.width))
        sigmas = sampling.sigma_schedule(s.steps, s.threshold_noise)
        if self.sweep is None:
            zs, folders = [sampling.denoise(self.dit_cfg, params, noise, cond, uncond, sigmas, s.guidance,
                                            lora=(lora, self.targets), progress=jax.process_index() == 0)], \
                [run_dir / "samples"]
        else:  # every variant in one vmapped denoising loop, as evaluate renders LoRAs
            zs = denoise_variants(self.dit_cfg, params, sweep_lib.effective(self.sweep, lora), self.targets, noise,
                                  cond, uncond, sigmas, s.guidance)
            folders = [run_dir / "samples" / name for name in self.sweep.names]
        out = []
        for z, folder in zip(zs, folders):
            frames = sampling.decode_frames(*self.vae, z, tiled=s.tiled_decode)
            out.append([])
            for i, clip in enumerate(frames):
                path = folder / f"step{step:06d}_prompt{i}_seed{seeds[i]}.mp4"
                if jax.process_index() == 0:
                    write_mp4(path, clip, fps=s.fps)
                out[-1].append((str(path), clip))
        return out


def is_validation_row(row: dict) -> bool:
    """Whether a metrics.jsonl row holds validation values (what a Validator returns: val_loss,
    val_loss/sigma_*, val/*, each also as variant/<name>/...) rather than training ones."""
    keys = [re.sub(r"^variant/[^/]+/", "", k) for k in row if k != "step"]
    return bool(keys) and all(k == "val_loss" or k.startswith(("val_loss/", "val/")) for k in keys)
