"""The training cache written by `mochi_jax.prepare` and read by the trainer.

Layout of a cache folder:

    manifest.json
        {"format": "mochi_jax.cache/1",
         "config": {...the prepare settings...},
         "clips": [{"name", "file": "clips/<name>.safetensors", "source", "caption",
                    "num_frames", "height", "width", "latent_shape": [12, t, h, w],
                    # optional (caches made before frame windows and images lack them):
                    "kind": "video" | "image", "source_name": the source's name (a window's
                    name is "<source_name>@<start frame>"), "start_frame" (at the prepare fps),
                    "start_s", "caption_tokens" (T5 tokens with EOS; > max_length: truncated)}, ...],
         "empty_prompt": "empty_prompt.safetensors",
         "skipped": [{"source", "reason"}, ...]}
    clips/<name>.safetensors
        mean     float32 [12, t, h, w]   VAE posterior mean, in VAE space (not normalised)
        logvar   float32 [12, t, h, w]   its log-variance (clamped to [-30, 20])
        t5_feats float32 [L, D]          T5 features of the caption, padded to L tokens
        t5_mask  bool    [L]             True on real tokens (EOS included)
    empty_prompt.safetensors
        t5_feats float32 [L, D], t5_mask bool [L]   "" encoded as a real prompt (diffusers)

Clips may have any mix of latent shapes (aspect buckets, frame counts, 1-frame images); the
trainer batches each shape apart (mochi_jax/lib/data.py) and draws z = mean + exp(logvar / 2) * n
with fresh noise n at every step. Every file is written under a temporary name
(`.<name>.tmp<pid>`) and renamed into place, so a reader never sees half a file; files get the
permissions of any new file (0o666 minus the umask).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from mochi_jax.checkpoints.files import write_atomically
from mochi_jax.checkpoints.safetensors_io import write_safetensors

FORMAT = "mochi_jax.cache/1"
MANIFEST = "manifest.json"
EMPTY_PROMPT = "empty_prompt.safetensors"
CLIP_KEYS = ("mean", "logvar", "t5_feats", "t5_mask")
TMP_MARK = ".tmp"


class CacheError(ValueError):
    """A missing or malformed cache file; the message names it."""


def write_arrays(path, arrays: dict) -> Path:
    """Save {name: array} as safetensors at `path`, atomically (temporary file, then rename), with
    the permissions of any new file (the umask); errors name `path`."""
    return write_safetensors(path, arrays)


def write_manifest(cache_dir, manifest: dict) -> Path:
    """Write manifest.json atomically (as `write_arrays`)."""
    return write_atomically(Path(cache_dir) / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def remove_stale_temporaries(cache_dir) -> list[Path]:
    """Delete temporary files left by a killed writer (hidden names containing '.tmp')."""
    stale = [p for p in Path(cache_dir).rglob(f".*{TMP_MARK}*") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def read_manifest(cache_dir) -> dict:
    """The parsed manifest of `cache_dir`, checked for the fields the trainer relies on."""
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        raise CacheError(f"{path}: no cache manifest here (write one with `python -m mochi_jax.prepare`)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheError(f"{path}: unreadable manifest ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise CacheError(f"{path}: not a {FORMAT} manifest (format {found!r})")
    clips = manifest.get("clips")
    if not isinstance(clips, list):
        raise CacheError(f"{path}: 'clips' must be a list")
    need = ("name", "file", "latent_shape")
    for i, c in enumerate(clips):
        if not isinstance(c, dict) or any(k not in c for k in need):
            raise CacheError(f"{path}: clip entry {i} lacks one of {need}: {c!r}")
    if not isinstance(manifest.get("empty_prompt"), str):
        raise CacheError(f"{path}: 'empty_prompt' must name a file")
    return manifest


def _load(path: Path, keys) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise CacheError(f"{path}: cache file missing")
    try:
        arrays = load_file(str(path))
    except Exception as e:
        raise CacheError(f"{path}: corrupt cache file ({type(e).__name__}: {e})") from e
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise CacheError(f"{path}: missing arrays {missing} (has {sorted(arrays)})")
    return arrays


class Cache:
    """Read access to a prepared cache: `len(cache)`, `cache[i]` -> {'mean', 'logvar', 't5_feats',
    't5_mask'} numpy arrays, `cache.entries` (the manifest's clip dicts), `cache.empty_prompt()`,
    `cache.latent_shapes()`."""

    def __init__(self, path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.entries: list[dict] = self.manifest["clips"]

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        entry = self.entries[i]
        file = self.path / entry["file"]
        arrays = _load(file, CLIP_KEYS)
        shape = tuple(entry["latent_shape"])
        for k in ("mean", "logvar"):
            if arrays[k].shape != shape:
                raise CacheError(f"{file}: {k} has shape {arrays[k].shape}, the manifest says {shape}")
        return arrays

    def empty_prompt(self) -> tuple[np.ndarray, np.ndarray]:
        """(t5_feats [L, D], t5_mask [L]) of the empty prompt."""
        arrays = _load(self.path / self.manifest["empty_prompt"], ("t5_feats", "t5_mask"))
        return arrays["t5_feats"], arrays["t5_mask"]

    def source_of(self, i: int) -> str:
        """The video or image clip i was cut from (its name for caches that do not record it)."""
        e = self.entries[i]
        return str(e.get("source_name") or e.get("source") or e["name"])

    def training_clips(self, holdout: int) -> int:
        """How many clips (the first ones, by name) train when at least the last `holdout` are held out:
        whole sources only, so frame windows of one video never fall on both sides of the split."""
        if not 0 <= holdout < len(self):
            raise ValueError(f"validation.holdout = {holdout} must leave training clips (the cache {self.path} "
                             f"has {len(self)})")
        k = len(self) - holdout
        while 0 < k < len(self) and self.source_of(k - 1) == self.source_of(k):
            k -= 1
        if k == 0:
            raise ValueError(f"validation.holdout = {holdout}: holding out whole sources takes every clip of the "
                             f"cache {self.path} ({len(self)} clips from {len({self.source_of(i) for i in range(len(self))})}"
                             f" source(s)); lower it or prepare more sources")
        return k

    def latent_shapes(self) -> set[tuple[int, ...]]:
        """The distinct [12, t, h, w] bucket shapes in the cache."""
        return {tuple(e["latent_shape"]) for e in self.entries}

    def __repr__(self) -> str:
        return f"Cache({str(self.path)!r}, {len(self)} clips, shapes {sorted(self.latent_shapes())})"
