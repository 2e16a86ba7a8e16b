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
with fresh noise n at every step. Several caches train together as one (`open_datasets`,
configs/lora.py `datasets`): a MixedCache, each dataset's clips drawn `repeats` times per epoch.
Every file is written under a temporary name (`.<name>.tmp<pid>`) and renamed into place, so a
reader never sees half a file; files get the permissions of any new file (0o666 minus the umask).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Mapping

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

    def clip_repeats(self, num_clips: int) -> list[int] | None:
        """Draws per epoch of each of the first `num_clips` clips: None (once each) for one cache."""
        return None

    def fingerprint(self) -> dict:
        """What the loader's saved position records about the data besides its plan: nothing here."""
        return {}

    def __repr__(self) -> str:
        return f"Cache({str(self.path)!r}, {len(self)} clips, shapes {sorted(self.latent_shapes())})"


# ----------------------------------------------------------------------------- several caches

DATASET_FIELDS = ("cache", "repeats", "holdout")


@dataclasses.dataclass
class Dataset:
    """One cache of a mixture: its first `train` clips train, each drawn `repeats` times per epoch."""
    name: str
    cache: Cache
    repeats: int
    train: int
    holdout: int


class MixedCache:
    """Several caches as one, with Cache's interface (len, [i], entries, path, empty_prompt, source_of,
    latent_shapes, clip_repeats, fingerprint). Its index order: every dataset's training clips
    (datasets by name, each's clips in its cache's order), then every dataset's held-out clips in the
    same order, so `num_train` leading clips train and the rest are the validation clips."""

    def __init__(self, datasets: list[Dataset]):
        if not datasets:
            raise ValueError("MixedCache needs at least one dataset")
        self.datasets = datasets
        self.path = datasets[0].cache.path  # for messages that name "the" cache
        self.index = [(k, j) for k, d in enumerate(datasets) for j in range(d.train)]
        self.num_train = len(self.index)
        self.index += [(k, j) for k, d in enumerate(datasets) for j in range(d.train, len(d.cache))]
        self.entries = [datasets[k].cache.entries[j] for k, j in self.index]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        k, j = self.index[i]
        return self.datasets[k].cache[j]

    def empty_prompt(self) -> tuple[np.ndarray, np.ndarray]:
        return self.datasets[0].cache.empty_prompt()

    def source_of(self, i: int) -> str:
        k, j = self.index[i]
        return f"{self.datasets[k].name}:{self.datasets[k].cache.source_of(j)}"

    def dataset_of(self, i: int) -> str:
        return self.datasets[self.index[i][0]].name

    def latent_shapes(self) -> set[tuple[int, ...]]:
        return set().union(*(d.cache.latent_shapes() for d in self.datasets))

    def clip_repeats(self, num_clips: int) -> list[int]:
        return [self.datasets[k].repeats for k, _ in self.index[:num_clips]]

    def fingerprint(self) -> dict:
        """{'datasets': {name: [training clips, repeats]}}: saved with the loader's position."""
        return {"datasets": {d.name: [d.train, d.repeats] for d in self.datasets}}

    def describe(self) -> list[str]:
        """One line per dataset: its training clips, repeats, share of the epoch's draws, held-out clips."""
        draws = sum(d.train * d.repeats for d in self.datasets)
        return [f"dataset {d.name!r}: {d.train} clips x {d.repeats} repeat{'s' if d.repeats > 1 else ''} = "
                f"{d.train * d.repeats} draws per epoch ({d.train * d.repeats / draws:.1%} of the epoch), "
                f"{len(d.cache) - d.train} held out; {d.cache.path}" for d in self.datasets]

    def __repr__(self) -> str:
        return f"MixedCache({', '.join(f'{d.name}={str(d.cache.path)!r} x{d.repeats}' for d in self.datasets)})"


def _plain(value):
    return value.to_dict() if hasattr(value, "to_dict") else value


def _integer(name: str, field: str, value, least: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
        raise ValueError(f"datasets.{name}.{field} = {value!r}: must be an integer >= {least} ({what})")
    return int(value)


def read_datasets(datasets: Mapping, holdout: int) -> list[Dataset]:
    """configs/lora.py `datasets` ({name: {cache, repeats = 1, holdout = `holdout`}}) opened and
    checked, by name. A missing or malformed cache, a repeats < 1, a holdout that leaves a dataset no
    training clips, an unknown field, or caches whose captions cannot share a batch (T5 features of
    other shapes) raise one ValueError naming the dataset and the field."""
    datasets = _plain(datasets)
    if not isinstance(datasets, Mapping):
        raise ValueError(f"datasets must be {{name: {{'cache': path, 'repeats': n}}}}, got {datasets!r}")
    out = []
    for name in sorted(datasets, key=str):
        spec = _plain(datasets[name])
        if not isinstance(spec, Mapping):
            raise ValueError(f"datasets.{name} must be {{'cache': path, 'repeats': n}}, got {spec!r}")
        unknown = sorted(set(map(str, spec)) - set(DATASET_FIELDS))
        if unknown:
            raise ValueError(f"datasets.{name}: unknown field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                             f"(a dataset takes {', '.join(DATASET_FIELDS)})")
        path = spec.get("cache")
        if not isinstance(path, str) or not path:
            raise ValueError(f"datasets.{name}.cache = {path!r}: must name a cache folder (made by "
                             f"`python -m mochi_jax.prepare`)")
        repeats = _integer(name, "repeats", spec.get("repeats", 1), 1,
                           "each clip is drawn that many times per epoch")
        held = _integer(name, "holdout", spec.get("holdout", holdout), 0, "clips held out for validation")
        try:
            cache = Cache(path)
        except CacheError as e:
            raise CacheError(f"datasets.{name}.cache = {path!r}: {e}") from None
        if not len(cache):
            raise CacheError(f"datasets.{name}.cache = {path!r}: the cache holds no clips")
        try:
            train = cache.training_clips(held)
        except ValueError as e:
            raise ValueError(f"datasets.{name}.holdout = {held}: {e}") from None
        out.append(Dataset(str(name), cache, repeats, train, held))
    if not out:
        raise ValueError("datasets is empty")
    shapes = {d.name: cache_text_shape(d.cache) for d in out}
    if len(set(shapes.values())) > 1:
        raise ValueError("datasets " + ", ".join(f"{n}: T5 features {list(s)}" for n, s in shapes.items())
                         + ": their captions cannot share a batch; prepare every dataset with the same t5 and "
                           "max_length")
    return out


def cache_text_shape(cache: Cache) -> tuple[int, ...]:
    """The shape [L, D] of the cache's T5 features (its first clip's)."""
    return tuple(cache[0]["t5_feats"].shape)


def open_datasets(cache: str, datasets: Mapping | None, holdout: int):
    """The trainer's data: (cache, training clips, lines to log). Without `datasets`, the one cache
    at `cache` with its last clips held out (Cache.training_clips); with them, a MixedCache of all of
    them (read_datasets), the last `holdout` clips of every dataset held out unless the dataset sets its
    own. Its first `training clips` clips train; the rest are held out for validation."""
    datasets = _plain(datasets) or {}
    if not datasets:
        one = Cache(cache)
        n_train = one.training_clips(holdout)  # the last clips (by name) are held out, whole sources
        lines = []
        if len(one) - n_train > holdout:
            lines.append(f"validation.holdout = {holdout}: {len(one) - n_train} clips held out, so that no source "
                         f"has frame windows on both sides")
        return one, n_train, lines
    mixed = MixedCache(read_datasets(datasets, holdout))
    lines = [f"{len(mixed.datasets)} datasets (the `cache` field is not read when `datasets` is set):",
             *("  " + line for line in mixed.describe())]
    for key in ("vae", "t5", "tokenizer"):
        used = {d.name: d.cache.manifest.get("config", {}).get(key) for d in mixed.datasets}
        if len({json.dumps(v) for v in used.values()}) > 1:
            lines.append(f"note: the datasets were prepared with different {key} settings ("
                         + ", ".join(f"{n}: {v}" for n, v in used.items()) + "); mix caches of one model only")
    return mixed, mixed.num_train, lines
