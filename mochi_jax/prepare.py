"""Clips + captions -> the training cache (VAE posteriors and T5 features; format in mochi_jax/cache.py).

    python -m mochi_jax.prepare --config=configs/prepare.py --config.input_dir=clips --config.output_dir=cache
    python -m mochi_jax.prepare --config=configs/prepare.py:demo     # tiny random models, synthetic clips

Every video (.mp4 .mov .webm .mkv, searched recursively, hidden files ignored) needs a caption
in a same-named .txt file. Each clip takes the bucket (H, W) with the closest aspect ratio
(distance of log(W/H)); its first `num_frames` frames at `fps` are cover-resized and centre-
cropped to it (mochi_jax.video.read_clip) and encoded by the VAE; captions are encoded by T5 in
batches of `text_batch_size`.

Robustness: a bad clip (no caption, empty caption, zero-byte, unreadable or corrupt, too short,
too small with upscale=False) is skipped, recorded with its reason in the manifest and listed
in the final report; it never stops the run. Every file is written under a temporary name and
renamed, and the manifest is rewritten after every clip, so a killed run loses at most the clip
in flight. Re-running skips the clips already cached (nothing is re-read or re-validated) unless
`overwrite=True`; a cache made with different content settings (models, fps, frames, buckets,
...) is refused rather than mixed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from mochi_jax import cache as cache_lib
from mochi_jax.video import VIDEO_SUFFIXES, VideoError, from_unit, probe, read_clip, to_unit, write_mp4

# Settings that change what a cached clip holds: an existing cache made with other values is not reused.
CONTENT_KEYS = ("vae", "t5", "tokenizer", "fps", "num_frames", "buckets", "upscale", "max_length",
                "vae_dtype", "t5_dtype", "tiled", "tile_size", "tile_overlap")


class Skip(Exception):
    """A clip that is left out; str() is the reason."""


# ----------------------------------------------------------------------------- inputs

def find_sources(input_dir) -> list[Path]:
    """Videos under input_dir (recursive, sorted, hidden files and folders ignored)."""
    root = Path(input_dir)
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def clip_name(source: Path, input_dir) -> str:
    """'sub/clip' for input_dir/sub/clip.mp4."""
    return source.relative_to(input_dir).with_suffix("").as_posix()


def read_caption(video: Path) -> str:
    """The stripped text of video's same-named .txt, or Skip('no caption' | 'empty caption' | ...)."""
    txt = video.with_suffix(".txt")
    if not txt.is_file():
        raise Skip(f"no caption: {txt.name} not found")
    try:
        caption = txt.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise Skip(f"unreadable caption: {txt.name} ({e})") from e
    if not caption:
        raise Skip(f"empty caption: {txt.name} has no text")
    return caption


def choose_bucket(height: int, width: int, buckets) -> tuple[int, int]:
    """The (H, W) bucket whose aspect ratio is closest to width/height (in log ratio; first on ties)."""
    return tuple(min(buckets, key=lambda b: abs(math.log((b[1] / b[0]) / (width / height)))))


# ----------------------------------------------------------------------------- models

class Models:
    """The VAE and T5 of a prepare config, loaded once, with numpy in and out."""

    def __init__(self, cfg):
        import jax

        from mochi_jax.convert.vae import load_vae
        from mochi_jax.models import vae as vae_lib
        from mochi_jax.text import TextEncoder

        for what, path in (("VAE", cfg.vae), ("T5", cfg.t5), ("tokenizer", cfg.tokenizer)):
            if not Path(path).exists():
                raise FileNotFoundError(f"{what} not found at {path}: convert the weights with tools/convert_weights.py "
                                        f"(see the README) or set --config.{what.lower()}=...")
        self.vae_cfg, self.vae_params = load_vae(cfg.vae, dtype=cfg.vae_dtype or None,
                                                 tile_size=tuple(cfg.tile_size), tile_overlap=tuple(cfg.tile_overlap))
        self.text = TextEncoder.load(cfg.t5, cfg.tokenizer, max_length=cfg.max_length, dtype=cfg.t5_dtype or None)
        self.tiled, self.batch = bool(cfg.tiled), int(cfg.text_batch_size)
        self._encode = jax.jit(vae_lib.encode, static_argnames=("cfg", "tiled"))
        self._decode = jax.jit(vae_lib.decode, static_argnames=("cfg", "tiled"))

    def encode_video(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [T, H, W, 3] -> (mean, logvar) float32 [12, t, h, w] in VAE space."""
        pixels = np.moveaxis(to_unit(frames), -1, 0)[None]  # [1, 3, T, H, W]
        mean, logvar = self._encode(self.vae_params, pixels, cfg=self.vae_cfg, tiled=self.tiled)
        return np.asarray(mean[0], np.float32), np.asarray(logvar[0], np.float32)

    def decode(self, mean: np.ndarray) -> np.ndarray:
        """VAE-space latents [12, t, h, w] -> uint8 [T, H, W, 3]."""
        pixels = self._decode(self.vae_params, mean[None], cfg=self.vae_cfg, tiled=self.tiled)
        return from_unit(np.moveaxis(np.asarray(pixels[0]), 0, -1))

    def encode_text(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Prompts -> (feats float32 [B, L, D], mask bool [B, L]); batches padded to one size (one compile)."""
        padded = list(prompts) + [""] * (-len(prompts) % self.batch)
        feats, masks = zip(*(self.text(padded[i:i + self.batch]) for i in range(0, len(padded), self.batch)))
        n = len(prompts)
        return np.concatenate(feats)[:n].astype(np.float32), np.concatenate(masks)[:n].astype(bool)


def load_models(cfg) -> Models:
    return Models(cfg)


# ----------------------------------------------------------------------------- the run

def settings(cfg) -> dict:
    """The config as plain JSON values (tuples become lists), as stored in the manifest."""
    return json.loads(json.dumps(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)))


def check_config(cfg) -> None:
    from mochi_jax.models.vae import latent_frames

    latent_frames(int(cfg.num_frames))  # raises unless 6k+1
    if not cfg.buckets or any(len(b) != 2 or b[0] % 8 or b[1] % 8 or min(b) <= 0 for b in cfg.buckets):
        raise ValueError(f"buckets must be (H, W) pairs of positive multiples of 8, got {cfg.buckets}")
    if cfg.fps <= 0 or cfg.text_batch_size < 1:
        raise ValueError(f"fps and text_batch_size must be positive, got {cfg.fps} and {cfg.text_batch_size}")


def make_demo(cfg) -> None:
    """Write the tiny random models into the folder holding cfg.vae (vae/, t5/, tokenizer/, dit/) and,
    if input_dir has no videos, synthetic clips, both only where missing."""
    from mochi_jax.demo import write_demo_models
    from mochi_jax.synthetic import make_clips

    write_demo_models(Path(cfg.vae).parent)
    if not Path(cfg.input_dir).is_dir() or not find_sources(cfg.input_dir):
        h, w = cfg.buckets[0]
        make_clips(cfg.input_dir, n=cfg.demo_clips, num_frames=max(25, cfg.num_frames), size=(h, w), fps=cfg.fps)


def _existing(out: Path, cfg, current: dict) -> dict[str, dict]:
    """Clip entries of an earlier run in `out` whose files still exist: {name: entry}."""
    if cfg.overwrite or not (out / cache_lib.MANIFEST).exists():
        return {}
    old = cache_lib.read_manifest(out)
    differ = {k: (old.get("config", {}).get(k), current[k]) for k in CONTENT_KEYS
              if old.get("config", {}).get(k) != current[k]}
    if differ:
        lines = ", ".join(f"{k}: cached {a!r} vs now {b!r}" for k, (a, b) in differ.items())
        raise ValueError(f"{out} holds a cache made with other settings ({lines}); use another output_dir "
                         "or --config.overwrite=True to re-encode everything")
    return {c["name"]: c for c in old["clips"] if (out / c["file"]).is_file()}


def prepare(cfg) -> dict:
    """Encode input_dir into output_dir; returns the report {'output_dir', 'clips' (all cached names),
    'new' (encoded now), 'reused' (already cached), 'skipped' [{'source', 'reason'}]} and prints it."""
    from tqdm import tqdm

    check_config(cfg)
    if cfg.get("make_demo"):
        make_demo(cfg)
    input_dir, out = Path(cfg.input_dir), Path(cfg.output_dir)
    if not input_dir.is_dir():
        raise FileNotFoundError(f"input_dir {input_dir} is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    cache_lib.remove_stale_temporaries(out)
    current = settings(cfg)
    done = _existing(out, cfg, current)
    manifest = {"format": cache_lib.FORMAT, "config": current, "clips": [],
                "empty_prompt": cache_lib.EMPTY_PROMPT, "skipped": []}
    report = {"output_dir": str(out), "new": [], "reused": [], "skipped": manifest["skipped"]}

    models = None

    def get_models() -> Models:
        nonlocal models
        if models is None:
            models = load_models(cfg)
        return models

    def save_manifest():
        manifest["clips"].sort(key=lambda c: c["name"])
        cache_lib.write_manifest(out, manifest)

    if cfg.overwrite or not (out / cache_lib.EMPTY_PROMPT).is_file():
        feats, mask = get_models().encode_text([""])
        cache_lib.write_arrays(out / cache_lib.EMPTY_PROMPT, {"t5_feats": feats[0], "t5_mask": mask[0]})

    sources = find_sources(input_dir)
    bar = tqdm(total=len(sources), desc="prepare", unit="clip")

    def skip(source, reason: str):
        manifest["skipped"].append({"source": str(source), "reason": reason})
        bar.update()

    todo, names = [], {}
    for src in sources:
        name = clip_name(src, input_dir)
        if name in names:
            skip(src, f"duplicate name: {names[name].name} has the same name and caption file")
        elif name in done:
            manifest["clips"].append(done[name])
            report["reused"].append(name)
            bar.update()
        else:
            todo.append((name, src))
        names.setdefault(name, src)

    for start in range(0, len(todo), cfg.text_batch_size):
        ready = []  # (name, source, caption, frames) of clips that read fine
        for name, src in todo[start:start + cfg.text_batch_size]:
            try:
                caption = read_caption(src)
                bucket = choose_bucket(*probe(src)[:2], cfg.buckets)
                ready.append((name, src, caption, read_clip(src, cfg.num_frames, cfg.fps, bucket, cfg.upscale)))
            except Skip as e:
                skip(src, str(e))
            except VideoError as e:
                skip(src, f"{e.kind}: {e.detail}")
        save_manifest()
        if not ready:
            continue
        feats, masks = get_models().encode_text([r[2] for r in ready])
        for (name, src, caption, frames), feat, mask in zip(ready, feats, masks):
            mean, logvar = get_models().encode_video(frames)
            file = f"clips/{name}.safetensors"
            cache_lib.write_arrays(out / file, {"mean": mean, "logvar": logvar, "t5_feats": feat, "t5_mask": mask})
            manifest["clips"].append({
                "name": name, "file": file, "source": str(src), "caption": caption,
                "num_frames": int(frames.shape[0]), "height": int(frames.shape[1]), "width": int(frames.shape[2]),
                "latent_shape": list(mean.shape)})
            save_manifest()
            if cfg.previews:
                recon = get_models().decode(mean)
                write_mp4(out / "previews" / f"{name}.mp4", np.concatenate([frames, recon], axis=2), fps=cfg.fps)
            report["new"].append(name)
            bar.update()
    bar.close()
    save_manifest()
    report["clips"] = [c["name"] for c in manifest["clips"]]
    print(format_report(report))
    return report


def format_report(report: dict) -> str:
    lines = [f"prepared {len(report['clips'])} clips in {report['output_dir']} "
             f"({len(report['new'])} encoded now, {len(report['reused'])} already cached), "
             f"{len(report['skipped'])} skipped" + (":" if report["skipped"] else "")]
    lines += [f"  skipped {s['source']}: {s['reason']}" for s in report["skipped"]]
    return "\n".join(lines)


def main():
    from mochi_jax import cli

    cli.run("configs/prepare.py", prepare, "prepare settings: configs/prepare.py[:demo]")


if __name__ == "__main__":
    main()
