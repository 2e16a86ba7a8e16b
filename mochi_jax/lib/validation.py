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

A prompt is a string, or a dict {"prompt": ..., "num_frames": ..., "height": ..., "width": ...,
"seed": ...} giving any of those for that video alone (the rest: `validation.sampling`, and seed
`validation.seed` + its index, as a string gets). `validation_prompts` resolves and checks them (one
ValueError naming the entry and the key); the videos of one shape are rendered together, each shape
compiling its own sampler. Video i is samples/[<variant>/]step<N>_prompt<i>_seed<its seed>.mp4.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
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
        self.prompts = validation_prompts(v)
        self.render = v.every > 0 and len(self.prompts) > 0
        self.text = self.vae = self.scorer = None
        if self.render:
            s = v.sampling
            text = TextEncoder.load(m.t5, m.tokenizer, **t5_settings(m))  # T5 comes and goes before the DiT is loaded
            n, texts = len(self.prompts), [p.text for p in self.prompts]
            feats, mask = text(texts + [s.negative_prompt] * n, zero_empty=s.zero_empty_negative)
            # per shape: (its prompts, their (features, mask), their negative prompts' (features, mask))
            self.text = []
            for group in by_shape(self.prompts):
                idx = [p.index for p in group]
                self.text.append((group, (_take_rows(feats, idx), _take_rows(mask, idx)),
                                  (_take_rows(feats, idx, n), _take_rows(mask, idx, n))))
            self.vae = load_vae(m.vae, **vae_settings(m))
            if v.clip.checkpoint:
                self.scorer = Scorer(v.clip.checkpoint, v.clip.tokenizer, v.clip.batch)
                self.prompt_emb = self.scorer.text(texts)
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
        """Render the validation prompts with fixed seeds, one batch per shape (`by_shape`); per
        variant (one without a sweep) a list of (path, uint8 frames) in prompt order (process 0 writes)."""
        s = self.cfg.validation.sampling
        sigmas = sampling.sigma_schedule(s.steps, s.threshold_noise)
        if self.sweep is None:
            folders = [run_dir / "samples"]
        else:
            folders = [run_dir / "samples" / name for name in self.sweep.names]
        out = [[None] * len(self.prompts) for _ in folders]
        for group, cond, uncond in self.text:
            noise = sampling.initial_noise([p.seed for p in group], sampling.latent_shape(*group[0].shape))
            if self.sweep is None:
                zs = [sampling.denoise(self.dit_cfg, params, noise, cond, uncond, sigmas, s.guidance,
                                       lora=(lora, self.targets), progress=jax.process_index() == 0)]
            else:  # every variant in one vmapped denoising loop, as evaluate renders LoRAs
                zs = denoise_variants(self.dit_cfg, params, sweep_lib.effective(self.sweep, lora), self.targets,
                                      noise, cond, uncond, sigmas, s.guidance)
            for per_variant, z, folder in zip(out, zs, folders):
                frames = sampling.decode_frames(*self.vae, z, tiled=s.tiled_decode)
                for p, clip in zip(group, frames):
                    path = folder / f"step{step:06d}_prompt{p.index}_seed{p.seed}.mp4"
                    if jax.process_index() == 0:
                        write_mp4(path, clip, fps=s.fps)
                    per_variant[p.index] = (str(path), clip)
        return out


# ----------------------------------------------------------------------------- the prompts

PROMPT_KEYS = ("prompt", "num_frames", "height", "width", "seed")  # what a dict entry of validation.prompts may set


@dataclasses.dataclass(frozen=True)
class ValidationPrompt:
    """An entry of validation.prompts with its settings resolved."""
    index: int  # its place in validation.prompts: the video's file name and tensorboard tag
    text: str
    num_frames: int
    height: int
    width: int
    seed: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.num_frames, self.height, self.width


def validation_prompts(v) -> list[ValidationPrompt]:
    """The entries of `v.prompts` (a `validation` block) resolved: a string is a prompt with
    `v.sampling`'s num_frames, height and width and seed `v.seed` + its index; a dict
    {"prompt": ..., "num_frames": ..., "height": ..., "width": ..., "seed": ...} sets any of those but
    the prompt for its video alone. A wrong entry, key or value is one ValueError naming the entry
    (validation.prompts[i]) and the key."""
    s, out = v.sampling, []
    for i, entry in enumerate(v.prompts):
        where = f"validation.prompts[{i}]"
        if isinstance(entry, str):
            given = {"prompt": entry}
        elif isinstance(entry, Mapping) or hasattr(entry, "to_dict"):
            given = dict(entry.to_dict() if hasattr(entry, "to_dict") else entry)
        else:
            raise ValueError(f"{where}: {entry!r} is neither a prompt (a string) nor a dict of "
                             f"{', '.join(PROMPT_KEYS)}")
        for key in given:
            if key not in PROMPT_KEYS:
                near = difflib.get_close_matches(str(key), PROMPT_KEYS, n=1)
                raise ValueError(f"{where}: unknown key {key!r}" + (f" (did you mean {near[0]!r}?)" if near else "")
                                 + f"; an entry may set {', '.join(PROMPT_KEYS)}")
        if not isinstance(given.get("prompt"), str):
            raise ValueError(f"{where}: " + (f"'prompt' must be a string, got {given['prompt']!r}" if "prompt" in given
                                             else f"no 'prompt' in {given!r}; an entry needs its prompt"))
        values = {}
        for key, default, origin in (("num_frames", s.num_frames, "validation.sampling.num_frames"),
                                     ("height", s.height, "validation.sampling.height"),
                                     ("width", s.width, "validation.sampling.width"),
                                     ("seed", v.seed + i, "validation.seed")):
            value = given.get(key, default)
            name = f"{where}[{key!r}]" if key in given else f"{where}: {key} (from {origin})"
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            value = int(value)
            if key == "num_frames" and (value < 1 or (value - 1) % 6):
                raise ValueError(f"{name} must be 6k+1 (7, 13, 19, 25, 31, 37, ...), got {value}")
            if key in ("height", "width") and (value < 16 or value % 16):
                raise ValueError(f"{name} must be a positive multiple of 16 (VAE x8, patch x2), got {value}")
            if key == "seed" and value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value}")
            values[key] = value
        out.append(ValidationPrompt(i, given["prompt"], **values))
    return out


def by_shape(prompts) -> list[list[ValidationPrompt]]:
    """The prompts grouped by (num_frames, height, width), in order of first appearance: the videos
    rendered in one batch (one compiled sampler per shape)."""
    groups: dict = {}
    for p in prompts:
        groups.setdefault(p.shape, []).append(p)
    return list(groups.values())


def _take_rows(x, idx, offset: int = 0):
    """Rows `offset` + idx of `x`, by static slices (a run of consecutive rows is one slice)."""
    idx = [offset + i for i in idx]
    if idx == list(range(idx[0], idx[0] + len(idx))):
        return x[idx[0]:idx[0] + len(idx)]
    return jnp.concatenate([x[i:i + 1] for i in idx])


def is_validation_row(row: dict) -> bool:
    """Whether a metrics.jsonl row holds validation values (what a Validator returns: val_loss,
    val_loss/sigma_*, val/*, each also as variant/<name>/...) rather than training ones."""
    keys = [re.sub(r"^variant/[^/]+/", "", k) for k in row if k != "step"]
    return bool(keys) and all(k == "val_loss" or k.startswith(("val_loss/", "val/")) for k in keys)
