"""Clips, images + captions -> the training cache (VAE posteriors and T5 features; format in
mochi_jax/lib/cache.py). The command is `python -m mochi_jax.prepare` (mochi_jax/prepare.py).

Inputs: videos (.mp4 .mov .webm .mkv) and images (.jpg .png .webp), searched recursively, hidden
files ignored. Each needs a caption: a same-named .txt, else a row of the folder's metadata.jsonl /
metadata.csv (or `captions`); `trigger` starts every caption. Each clip takes the bucket (H, W)
with the closest aspect ratio (distance of log(W/H)). An image is a 1-frame clip. A video gives
one or more frame windows at `fps` (`windows.mode`: head, uniform, slide; `plan_windows`), each
the longest of the `num_frames` buckets the clip fills, cover-resized and centre-cropped
(mochi_jax.lib.video) and encoded by the VAE; captions are encoded by T5 in batches of
`text_batch_size`.

Pipeline: `workers` threads decode and resize sources ahead (in order, at most 2 x workers in
flight) while the main thread runs T5 and the VAE; the report gives clips/s and the seconds per
stage (`Clock`). workers=0 reads each source in the main thread when its turn comes.

Robustness: a bad input (no caption, empty caption, zero-byte, unreadable or corrupt, too short,
too small with upscale=False, a window past the end, a metadata row naming a missing file) is
skipped, recorded with its reason in the manifest and listed in the final report; it never stops
the run. Every file is written under a temporary name and renamed, and the manifest is rewritten
after every source (all its windows at once), so a killed run loses at most the sources in flight.
Re-running skips the sources already cached (nothing is re-read or re-validated) unless
`overwrite=True`; a cache made with different content settings (models, fps, frames, windows,
buckets, trigger, ...) is refused rather than mixed.

Devices: by default every local device is used (`devices`, `mesh`; see Models). T5's weights are
FSDP-sharded and each text batch is split between devices; the VAE's weights are replicated and
each clip is split spatially, so one long clip's activations are spread over all devices. The
cache is the same as one device makes (float rounding aside), so either may resume the other.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import csv
import dataclasses
import io
import itertools
import errno
import json
import math
import threading
import time
from pathlib import Path

import imageio_ffmpeg

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from mochi_jax.checkpoints.common import read_metadata, writable_dir
from mochi_jax.checkpoints.vae import load_vae
from mochi_jax.lib import cache as cache_lib
from mochi_jax.lib.text import TextEncoder
from mochi_jax.lib.video import (IMAGE_SUFFIXES, VIDEO_SUFFIXES, VideoError, VideoInfo, VideoReader, from_unit,
                                 load_image, probe, resize_cover, to_unit, write_image, write_mp4)
from mochi_jax.models import sharding as sharding_lib
from mochi_jax.models import t5 as t5_lib
from mochi_jax.models import vae as vae_lib
from mochi_jax.models.layers import Dense, RMSNorm
from mochi_jax.models.t5 import T5Encoder
from mochi_jax.models.vae import latent_frames

# Settings that change what a cached clip holds: an existing cache made with other values is not reused.
CONTENT_KEYS = ("vae", "t5", "tokenizer", "fps", "num_frames", "buckets", "upscale", "max_length",
                "vae_dtype", "t5_dtype", "tiled", "tile_size", "tile_overlap", "windows", "trigger")


class Skip(Exception):
    """A clip that is left out; str() is the reason."""


# ----------------------------------------------------------------------------- inputs

MEDIA_SUFFIXES = VIDEO_SUFFIXES + IMAGE_SUFFIXES
METADATA_NAMES = ("metadata.jsonl", "metadata.csv")
FILE_COLUMNS = ("file_name", "file", "path", "video", "image")  # the first present names the file
TEXT_COLUMNS = ("caption", "text", "prompt")  # the first present holds its caption
WINDOW_MODES = ("head", "uniform", "slide")


def find_sources(input_dir) -> list[Path]:
    """Videos and images under input_dir (recursive, sorted, hidden files and folders ignored)."""
    root = Path(input_dir)
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in MEDIA_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def orphan_captions(input_dir, sources) -> list[Path]:
    """.txt files under input_dir (hidden ones ignored) that caption none of `sources`."""
    root = Path(input_dir)
    captioned = {src.with_suffix("") for src in sources}
    return sorted(p for p in root.rglob("*.txt") if p.is_file() and p.with_suffix("") not in captioned
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def is_image(source: Path) -> bool:
    return source.suffix.lower() in IMAGE_SUFFIXES


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


def find_metadata(input_dir, captions: str = "") -> Path | None:
    """The captions file: `captions` if given (as a path, else relative to input_dir), or
    input_dir/metadata.jsonl or metadata.csv when one is there, or None."""
    root = Path(input_dir)
    if captions:
        for cand in (Path(captions), root / captions):
            if cand.is_file():
                return cand
        raise FileNotFoundError(f"captions file {captions} not found (nor in {root})")
    found = [root / n for n in METADATA_NAMES if (root / n).is_file()]
    if len(found) > 1:
        raise ValueError(f"{root} holds both {' and '.join(p.name for p in found)}; choose one with "
                         "--config.captions=<file>")
    return found[0] if found else None


def read_captions_file(path: Path) -> tuple[dict[Path, tuple[str, str]], list[tuple[str, str]]]:
    """Captions from a metadata.jsonl (one JSON object per line) or .csv (a header row) file: each
    row names a file (column file_name, file, path, video or image; relative to the metadata file's
    folder) and its caption (column caption, text or prompt). Returns ({resolved file: (caption,
    'metadata.jsonl line N')}, skipped [(source, reason)]): rows that cannot be parsed, lack a
    column, name a missing file, a file that is no video or image, or a file named twice."""
    path = Path(path)
    rows, skipped = [], []
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: unreadable captions file ({e})") from e
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        rows = [(reader.line_num, row) for row in reader]
    elif path.suffix.lower() in (".jsonl", ".json"):
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                skipped.append((f"{path}:{n}", f"unreadable metadata row: {e}"))
                continue
            rows.append((n, row))
    else:
        raise ValueError(f"{path}: captions must be a .jsonl or .csv file")
    out: dict[Path, tuple[str, str]] = {}
    for n, row in rows:
        where = f"{path.name} line {n}"
        file_col = next((c for c in FILE_COLUMNS if isinstance(row, dict) and row.get(c)), None)
        text_col = next((c for c in TEXT_COLUMNS if isinstance(row, dict) and c in row), None)
        if file_col is None or text_col is None:
            skipped.append((f"{path}:{n}", f"bad metadata row: needs a file ({', '.join(FILE_COLUMNS)}) and a "
                                           f"caption ({', '.join(TEXT_COLUMNS)}) column, got {row!r}"[:300]))
            continue
        name = str(row[file_col])
        file = (path.parent / name).resolve()
        source = f"{path}:{n} ({name})"
        if not file.is_file():
            skipped.append((source, f"missing file: {name} named in {where} does not exist"))
        elif file.suffix.lower() not in MEDIA_SUFFIXES:
            skipped.append((source, f"not a video or image: {name} named in {where}"))
        elif file in out:
            skipped.append((source, f"duplicate metadata row: {name} already has a caption in {out[file][1]}"))
        else:
            out[file] = (str(row[text_col] or "").strip(), where)
    return out, skipped


class Captions:
    """The caption of each source: its same-named .txt when there is one, else its row in the
    metadata file; `trigger` (if set) starts every caption."""

    def __init__(self, input_dir, captions: str = "", trigger: str = ""):
        self.metadata = find_metadata(input_dir, captions)
        self.rows, self.skipped = read_captions_file(self.metadata) if self.metadata else ({}, [])
        self.trigger = trigger.strip()

    def __call__(self, source: Path) -> str:
        """The caption, or Skip."""
        txt = source.with_suffix(".txt")
        row = self.rows.get(source.resolve())
        if txt.is_file() or row is None:
            try:
                caption = read_caption(source)
            except Skip as e:
                raise Skip(str(e) + (f" and no row in {self.metadata.name}" if self.metadata and "not found" in str(e)
                                     else "")) from e
        else:
            caption, where = row
            if not caption:
                raise Skip(f"empty caption: {where} has no text")
        return with_trigger(caption, self.trigger)


def with_trigger(caption: str, trigger: str) -> str:
    """`trigger caption`, unless the caption already starts with the trigger word."""
    if not trigger or caption == trigger or caption.startswith(trigger + " ") or caption.startswith(trigger + ","):
        return caption
    return f"{trigger} {caption}"


def choose_bucket(height: int, width: int, buckets) -> tuple[int, int]:
    """The (H, W) bucket whose aspect ratio is closest to width/height (in log ratio; first on ties)."""
    return tuple(min(buckets, key=lambda b: abs(math.log((b[1] / b[0]) / (width / height)))))


def frame_buckets(num_frames) -> tuple[int, ...]:
    """num_frames (one count or several) as a sorted tuple of 6k+1 frame counts."""
    counts = (num_frames,) if isinstance(num_frames, (int, np.integer)) else tuple(num_frames)
    if not counts:
        raise ValueError("num_frames needs at least one frame count")
    for n in counts:
        latent_frames(int(n))  # raises unless 6k+1
    return tuple(sorted({int(n) for n in counts}))


def longest_fit(available: int, buckets) -> int | None:
    """The longest frame bucket of at most `available` frames, or None."""
    fits = [n for n in buckets if n <= available]
    return max(fits) if fits else None


def plan_windows(mode: str, total: int, length: int, count: int = 1, stride: int = 0, limit: int = 0) -> list[int]:
    """Start frames (at the prepare fps) of the windows of `length` frames cut from a clip of `total`:
      head     [0]
      uniform  `count` windows spread evenly from the start to the end: round(k * (total - length) /
               (count - 1)) for k = 0 .. count-1 (duplicates merged; count=1: [0])
      slide    0, stride, 2 * stride, ... while the window fits (stride 0 = length: back to back)
    `limit` > 0 keeps the first `limit` windows."""
    if mode not in WINDOW_MODES:
        raise ValueError(f"windows.mode must be one of {WINDOW_MODES}, got {mode!r}")
    if length > total:
        return []
    if mode == "head":
        starts = [0]
    elif mode == "uniform":
        if count < 1:
            raise ValueError(f"windows.count must be positive, got {count}")
        starts = [0] if count == 1 else sorted({round(k * (total - length) / (count - 1)) for k in range(count)})
    else:
        step = stride if stride > 0 else length
        starts = list(range(0, total - length + 1, step))
    return starts[:limit] if limit > 0 else starts


@dataclasses.dataclass
class Sample:
    """One clip to cache: uint8 frames [T, H, W, 3] of `source` from output frame `start` at fps."""
    name: str
    start: int
    frames: np.ndarray


@dataclasses.dataclass
class SourceRead:
    """What reading one source gave: its samples and the reasons any window was left out."""
    name: str
    source: Path
    caption: str
    samples: list
    skips: list  # reasons
    seconds: float = 0.0


def read_source(name: str, source: Path, caption: str, cfg) -> SourceRead:
    """Decode and resize one source into its samples (the work the reading threads do).

    An image is one 1-frame sample. A video takes the aspect bucket closest to its own, then by
    `cfg.windows.mode`: head, its first frames at the longest frame bucket it fills (decoding stops
    there); uniform / slide, windows at the longest frame bucket its duration fills, placed by
    `plan_windows` and read in one pass, each its own sample 'name@<start frame>'. A window the
    video turns out too short for (the container's duration is an estimate) is left out by name."""
    t0 = time.perf_counter()
    read = SourceRead(name, source, caption, [], [])
    try:
        if is_image(source):
            image = load_image(source)
            bucket = choose_bucket(*image.shape[:2], cfg.buckets)
            if not cfg.upscale and (image.shape[0] < bucket[0] or image.shape[1] < bucket[1]):
                raise VideoError(source, "too small", f"{image.shape[1]}x{image.shape[0]} (WxH) is smaller than the "
                                                      f"{bucket[1]}x{bucket[0]} bucket and upscaling is off")
            read.samples.append(Sample(name, 0, resize_cover(image[None], bucket)))
            return read
        counts, w = frame_buckets(cfg.num_frames), cfg.windows
        with VideoReader(source) as r:
            info = r.info
            bucket = choose_bucket(info.height, info.width, cfg.buckets)
            if w.mode == "head":
                frames = r.read(range(counts[-1]), cfg.fps, bucket, cfg.upscale)
                have = next((i for i in range(counts[-1]) if i not in frames), counts[-1])
                length = longest_fit(have, counts)
                if length is None:
                    raise Skip(f"too short: {have} frames at {cfg.fps:g} fps ({r.source_frames} source frames at "
                               f"{info.fps:g} fps), need {counts[0]}")
                read.samples.append(Sample(name, 0, np.stack([frames[i] for i in range(length)])))
                return read
            total = info.frames_at(cfg.fps)
            if total is None:  # no duration in the container: count the frames (a full decode)
                total = count_frames(source, cfg.fps)
            length = longest_fit(total, counts)
            if length is None:
                raise Skip(f"too short: about {total} frames at {cfg.fps:g} fps (duration "
                           f"{info.duration or 0:.2f} s at {info.fps:g} fps), need {counts[0]}")
            starts = plan_windows(w.mode, total, length, w.count, w.stride, w.max)
            frames = r.read({i for s in starts for i in range(s, s + length)}, cfg.fps, bucket, cfg.upscale)
            for s in starts:
                if all(i in frames for i in range(s, s + length)):
                    read.samples.append(Sample(f"{name}@{s:05d}", s, np.stack([frames[i] for i in range(s, s + length)])))
                else:
                    have = sum(i in frames for i in range(s, s + length))
                    read.skips.append(f"window past the end: frames {s}-{s + length - 1} at {cfg.fps:g} fps (from "
                                      f"{s / cfg.fps:.2f} s), the video ended after {have} of them")
    except Skip as e:
        read.skips.append(str(e))
    except VideoError as e:
        read.skips.append(f"{e.kind}: {e.detail}")
    finally:
        read.seconds = time.perf_counter() - t0
    return read


def count_frames(source: Path, fps: float) -> int:
    """Output frames at `fps` in a video, by decoding it all (for containers without a duration)."""
    try:
        n_src, _ = imageio_ffmpeg.count_frames_and_secs(str(source))
        src_fps = probe(source)[2]
    except Exception as e:
        raise VideoError(source, "unreadable", f"cannot count its frames ({type(e).__name__})") from e
    return VideoInfo(1, 1, src_fps, n_src / src_fps).frames_at(fps)


# ----------------------------------------------------------------------------- models

class Models:
    """The VAE and T5 of a prepare config, loaded once, with numpy in and out.

    On one device (cfg.devices=1, or a machine with one) everything lives on that device. On
    several: T5's weights are sharded over `mesh` (cfg.mesh, logical names from t5.logical_axes)
    and each text batch is split over data x fsdp where it divides; the VAE's weights are
    replicated and each clip's pixels are split spatially (`spatial_split`) so one long clip's
    encode is spread over all devices; XLA's SPMD partitioner exchanges the convolution halos and
    all-reduces the GroupNorm statistics. Tiled encoding/decoding is not split (each device runs
    the whole clip)."""

    def __init__(self, cfg):

        for what, path in (("VAE", cfg.vae), ("T5", cfg.t5), ("tokenizer", cfg.tokenizer)):
            if not Path(path).exists():
                raise FileNotFoundError(f"{what} not found at {path}: convert the weights with tools/convert_weights.py "
                                        f"(see the README) or set --config.{what.lower()}=...")
        self.tiled, self.batch = bool(cfg.tiled), int(cfg.text_batch_size)
        self.mesh = prepare_mesh(cfg)
        self._splits, self._t5 = {}, None
        t5_shardings = vae_shardings = self.text_sharding = None
        if self.mesh is not None:

            t5_shardings = _t5_shardings(cfg.t5, self.mesh)
            vae_shardings = NamedSharding(self.mesh, PartitionSpec())  # replicated: every leaf
            # the text batch over every mesh axis that divides it (the T5 computes data-parallel)
            batch_rule = (("batch", tuple(a for a in sharding_lib.AXES if a in self.mesh.shape)),)
            rows = sharding_lib.spec(("batch",), (self.batch,), self.mesh, rules=batch_rule)[0]
            self.text_sharding = NamedSharding(self.mesh, PartitionSpec(rows, None))
        self.vae_cfg, self.vae_params = load_vae(cfg.vae, dtype=cfg.vae_dtype or None, shardings=vae_shardings,
                                                 tile_size=tuple(cfg.tile_size), tile_overlap=tuple(cfg.tile_overlap))
        self.text = TextEncoder.load(cfg.t5, cfg.tokenizer, max_length=cfg.max_length, dtype=cfg.t5_dtype or None,
                                     shardings=t5_shardings)
        self._encode = jax.jit(vae_lib.encode, static_argnames=("cfg", "tiled"))
        self._decode = jax.jit(vae_lib.decode, static_argnames=("cfg", "tiled"))
        if self.mesh is not None:
            split = self.text_sharding.spec[0]
            shape = {k: v for k, v in self.mesh.shape.items() if v > 1}
            print(f"prepare: {self.mesh.devices.size} devices, mesh {shape}: T5 weights sharded, text batches of "
                  f"{self.batch} " + (f"split over {split}" if split else "replicated (the batch does not divide)")
                  + "; VAE weights replicated, " + ("tiled clips encoded whole on every device" if self.tiled
                                                    else "each clip split spatially"))

    # ------------------------------------------------------------------ placement

    def _spatial(self, latent_hw):
        """(sharding, encode, decode) for a clip of latent size (h, w): pixels [1, 3, T, H, W] and
        latents [1, 12, t, h, w] split along the height over dh and the width over dw devices
        (`spatial_split`), copies on any devices left, and the jitted VAE calls with their outputs
        pinned to that sharding. (None, plain jits) on one device or when tiled."""

        key = tuple(int(v) for v in latent_hw)
        if self.mesh is None or self.tiled:
            return None, self._encode, self._decode
        if key not in self._splits:
            n = self.mesh.devices.size
            dh, dw = spatial_split(*key, n)
            if dh * dw < n:
                print(f"prepare: note: a {key[0]}x{key[1]}-latent clip ({8 * key[0]}x{8 * key[1]} pixels) "
                      + (f"splits over {dh * dw} of the {n} devices ({dh} along the height x {dw} along the width; "
                         f"neither side divides further), the other devices compute copies" if dh * dw > 1 else
                         f"cannot be split over the {n} devices (neither latent side divides); every device "
                         "encodes it whole"))
            # the devices in the order of self.mesh, so the replicated weights share the device assignment
            mesh = Mesh(self.mesh.devices.reshape(dh, dw, n // (dh * dw)), ("height", "width", "copies"))
            sh = NamedSharding(mesh, PartitionSpec(None, None, None, "height", "width"))
            self._splits[key] = (sh, jax.jit(vae_lib.encode, static_argnames=("cfg", "tiled"), out_shardings=(sh, sh)),
                                 jax.jit(vae_lib.decode, static_argnames=("cfg", "tiled"), out_shardings=sh))
        return self._splits[key]

    # ------------------------------------------------------------------ encoders

    def encode_call(self, pixels: np.ndarray):
        """(the jitted encode for these pixels [1, 3, T, H, W], the pixels placed for it)."""
        s = self.vae_cfg.spatial_factor
        sh, enc, _ = self._spatial((pixels.shape[-2] // s, pixels.shape[-1] // s))
        return enc, (pixels if sh is None else jax.device_put(pixels, sh))

    def encode_video(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [T, H, W, 3] -> (mean, logvar) float32 [12, t, h, w] in VAE space."""
        enc, pixels = self.encode_call(np.moveaxis(to_unit(frames), -1, 0)[None])  # [1, 3, T, H, W]
        mean, logvar = enc(self.vae_params, pixels, cfg=self.vae_cfg, tiled=self.tiled)
        return np.asarray(mean[0], np.float32), np.asarray(logvar[0], np.float32)

    def decode(self, mean: np.ndarray) -> np.ndarray:
        """VAE-space latents [12, t, h, w] -> uint8 [T, H, W, 3]."""
        sh, _, dec = self._spatial(mean.shape[-2:])
        z = mean[None] if sh is None else jax.device_put(mean[None], sh)
        pixels = dec(self.vae_params, z, cfg=self.vae_cfg, tiled=self.tiled)
        return from_unit(np.moveaxis(np.asarray(pixels[0]), 0, -1))

    def _text_batch(self, prompts: list[str]):
        if self.mesh is None:
            return self.text(prompts)

        if self._t5 is None:
            self._t5 = _batch_split_t5(self.text.cfg, self.text_sharding)
        ids, mask = self.text.tokenizer(prompts)
        return self._t5(self.text.params, *(jax.device_put(a, self.text_sharding) for a in (ids, mask)))

    def encode_text(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Prompts -> (feats float32 [B, L, D], mask bool [B, L]); batches padded to one size (one compile)."""
        padded = list(prompts) + [""] * (-len(prompts) % self.batch)
        feats, masks = zip(*(self._text_batch(padded[i:i + self.batch]) for i in range(0, len(padded), self.batch)))
        n = len(prompts)
        return np.concatenate(feats)[:n].astype(np.float32), np.concatenate(masks)[:n].astype(bool)


def prepare_mesh(cfg):
    """The device mesh of a prepare run (cfg.devices of this process's devices, -1 = all, shaped by
    cfg.mesh), or None when that is one device: then everything runs as on a single-device machine."""

    devices = jax.local_devices()
    want = int(cfg.get("devices", -1))
    if want == 0 or want < -1 or want > len(devices):
        raise ValueError(f"devices={want}: choose -1 (all {len(devices)}) or 1..{len(devices)}")
    devices = devices if want == -1 else devices[:want]
    if len(devices) == 1:
        return None
    sizes = cfg.get("mesh", None)
    sizes = dict(sizes.to_dict() if hasattr(sizes, "to_dict") else sizes or {"fsdp": -1})
    return sharding_lib.make_mesh(sizes, devices)


def spatial_split(latent_h: int, latent_w: int, n: int) -> tuple[int, int]:
    """(dh, dw): how many devices split a clip's latent height and width. Each must divide its side
    (then every encoder resolution, 8, 4, 2 and 1 pixels per latent, divides too) and dh * dw must
    divide n; the most devices win, then the wider split: the width first, then the height, and
    (1, 1) (no split) when neither side divides."""
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    best = (1, 1)
    for dw in divisors:
        for dh in divisors:
            if (n % (dh * dw) or latent_w % dw or latent_h % dh
                    or (dh * dw, dw) <= (best[0] * best[1], best[1])):
                continue
            best = (dh, dw)
    return best


def _batch_split_t5(t5_cfg, text_sharding):
    """The jitted T5 encoder (ids, mask [B, L] -> features, mask) for sharded weights: every Dense
    and RMSNorm sees and returns activations [B, L, features] split along the batch only, as
    `text_sharding` splits ids, and whole along the features. XLA then all-gathers each layer's
    weights as it runs (FSDP) and every device computes its own prompts exactly as one device
    would; left to itself XLA may keep the weights split and add up partial products from the
    devices, which rounds differently (in bfloat16, visibly)."""

    rows = NamedSharding(text_sharding.mesh, PartitionSpec(text_sharding.spec[0], None, None))

    def keep_rows(next_fun, args, kwargs, context):
        if context.method_name != "__call__" or not isinstance(context.module, (Dense, RMSNorm)):
            return next_fun(*args, **kwargs)
        x = jax.lax.with_sharding_constraint(args[0], rows)
        return jax.lax.with_sharding_constraint(next_fun(x, *args[1:], **kwargs), rows)

    @jax.jit
    def run(params, ids, mask):
        with nn.intercept_methods(keep_rows):
            return T5Encoder(t5_cfg).apply({"params": params}, ids, mask)

    return run


def _t5_shardings(path, mesh):
    """NamedShardings for the converted T5 at `path` (stacked layout) from its logical axes, or None
    if `path` is no converted T5 (load_t5 then says what is wrong)."""
    meta = read_metadata(path)
    if meta.get("model") != "t5_encoder" or "config" not in meta:
        return None
    cfg = t5_lib.T5Config.from_dict(meta["config"])
    abstract = t5_lib.abstract_params(cfg)
    return sharding_lib.param_shardings(t5_lib.logical_axes(cfg), abstract, mesh)


def load_models(cfg) -> Models:
    return Models(cfg)


# ----------------------------------------------------------------------------- the run

def settings(cfg) -> dict:
    """The config as plain JSON values (tuples become lists), as stored in the manifest."""
    return json.loads(json.dumps(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)))


def check_config(cfg) -> None:
    frame_buckets(cfg.num_frames)  # raises unless every count is 6k+1
    if not cfg.buckets or any(len(b) != 2 or b[0] % 8 or b[1] % 8 or min(b) <= 0 for b in cfg.buckets):
        raise ValueError(f"buckets must be (H, W) pairs of positive multiples of 8, got {cfg.buckets}")
    if cfg.fps <= 0 or cfg.text_batch_size < 1:
        raise ValueError(f"fps and text_batch_size must be positive, got {cfg.fps} and {cfg.text_batch_size}")
    w = cfg.windows
    if w.mode not in WINDOW_MODES or w.count < 1 or w.stride < 0 or w.max < 0:
        raise ValueError(f"windows: mode one of {WINDOW_MODES}, count >= 1, stride >= 0, max >= 0; got {w}")
    if cfg.workers < 0:
        raise ValueError(f"workers must be >= 0 (0 reads in the main thread), got {cfg.workers}")


# content settings added after the first cache format, with the value an older cache was made with
CONTENT_DEFAULTS = {"windows": {"mode": "head"}, "trigger": ""}


def content(config: dict) -> dict:
    """The content settings of a manifest's config (settings()), normalised: num_frames as one
    count or a sorted list, windows only with the fields its mode uses, new keys at the value older
    caches were made with."""
    out = {k: config.get(k, CONTENT_DEFAULTS.get(k)) for k in CONTENT_KEYS}
    counts = frame_buckets(out["num_frames"]) if out["num_frames"] is not None else ()
    out["num_frames"] = counts[0] if len(counts) == 1 else list(counts)
    w = dict(out["windows"] or {"mode": "head"})
    fields = {"head": (), "uniform": ("count",), "slide": ("stride", "max")}.get(w.get("mode"), tuple(w))
    out["windows"] = {"mode": w.get("mode"), **{k: w.get(k) for k in fields}}
    return out


def _existing(out: Path, cfg, current: dict) -> dict[str, dict]:
    """Clip entries of an earlier run in `out` whose files still exist: {name: entry}."""
    if cfg.overwrite or not (out / cache_lib.MANIFEST).exists():
        return {}
    old = cache_lib.read_manifest(out)
    was, now = content(old.get("config", {})), content(current)
    differ = {k: (was[k], now[k]) for k in CONTENT_KEYS if was[k] != now[k]}
    if differ:
        lines = ", ".join(f"{k}: cached {a!r} vs now {b!r}" for k, (a, b) in differ.items())
        raise ValueError(f"{out} holds a cache made with other settings ({lines}); use another output_dir "
                         "or --config.overwrite=True to re-encode everything")
    return {c["name"]: c for c in old["clips"] if (out / c["file"]).is_file()}


def prepare(cfg) -> dict:
    """Encode input_dir into output_dir; returns the report {'output_dir', 'clips' (all cached names),
    'new' (encoded now), 'reused' (already cached), 'skipped' [{'source', 'reason'}]} and prints it."""
    check_config(cfg)
    input_dir, out = Path(cfg.input_dir), Path(cfg.output_dir)
    if not input_dir.exists():
        raise FileNotFoundError(errno.ENOENT, "input_dir does not exist", str(input_dir))
    if not input_dir.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "input_dir is a file, not a folder of clips", str(input_dir))
    sources = find_sources(input_dir)
    orphans = orphan_captions(input_dir, sources)
    if not sources:  # before any model is loaded
        raise ValueError(f"{input_dir}: no videos or images ({' '.join(MEDIA_SUFFIXES)}) to prepare, so no cache "
                         "to write" + (f"; {len(orphans)} caption(s) without a video: "
                                       + ", ".join(str(p.relative_to(input_dir)) for p in orphans[:10])
                                       + (" ..." if len(orphans) > 10 else "") if orphans else ""))
    writable_dir(out)
    cache_lib.remove_stale_temporaries(out)
    current = settings(cfg)
    done = _existing(out, cfg, current)
    manifest = {"format": cache_lib.FORMAT, "config": current, "clips": [],
                "empty_prompt": cache_lib.EMPTY_PROMPT, "skipped": []}
    report = {"output_dir": str(out), "new": [], "reused": [], "skipped": manifest["skipped"]}

    captions = Captions(input_dir, cfg.captions, cfg.trigger)  # a bad captions file fails before any model loads
    clock = Clock()
    models = None

    def get_models() -> Models:
        nonlocal models
        if models is None:
            with clock("loading models"):
                models = load_models(cfg)
        return models

    def save_manifest():
        manifest["clips"].sort(key=lambda c: c["name"])
        cache_lib.write_manifest(out, manifest)

    seen_shapes = set()  # what has been compiled: "t5" and the VAE's clip shapes
    empty_prompt_due = [bool(cfg.overwrite or not (out / cache_lib.EMPTY_PROMPT).is_file())]

    def encode_empty_prompt():  # with the first clip encoded (no model is loaded for a run that has none)
        if empty_prompt_due[0]:
            feats, mask = get_models().encode_text([""])
            cache_lib.write_arrays(out / cache_lib.EMPTY_PROMPT, {"t5_feats": feats[0], "t5_mask": mask[0]})
            seen_shapes.add("t5")
            empty_prompt_due[0] = False

    manifest["skipped"] += [{"source": str(p), "reason": f"caption without a video: no {p.stem}"
                             f"{'/'.join(MEDIA_SUFFIXES)} beside it"} for p in orphans]
    bar = tqdm(total=len(sources), desc="prepare", unit="source")

    def skip(source, reason: str):
        manifest["skipped"].append({"source": str(source), "reason": reason})

    for source, reason in captions.skipped:  # metadata rows naming missing files, ...
        skip(source, reason)
    done_by_source: dict[str, list[dict]] = {}
    for entry in done.values():
        done_by_source.setdefault(entry.get("source_name", entry["name"]), []).append(entry)
    todo, names = [], {}
    for src in sources:
        name = clip_name(src, input_dir)
        if name in names:
            skip(src, f"duplicate name: {names[name].name} has the same name and caption file")
            bar.update()
        elif name in done_by_source:  # every sample of a source is recorded at once, so all are here
            manifest["clips"] += done_by_source[name]
            report["reused"] += [e["name"] for e in done_by_source[name]]
            bar.update()
        else:
            try:
                todo.append((name, src, captions(src)))
            except Skip as e:
                skip(src, str(e))
                bar.update()
        names.setdefault(name, src)
    save_manifest()

    def encode(group: list[SourceRead]):
        """T5 for the group's captions in one batch, then the VAE for every sample; each source's
        entries go into the manifest together, once all its files are written."""
        m = get_models()
        encode_empty_prompt()
        with clock("T5" if "t5" in seen_shapes else "compile: T5, first batch"):
            feats, masks = m.encode_text([g.caption for g in group])
        seen_shapes.add("t5")
        for g, feat, mask in zip(group, feats, masks):
            tokens = len(m.text.tokenizer.pieces(g.caption)) + 1  # + EOS
            entries = []
            for sample in g.samples:
                stage = "VAE" if sample.frames.shape in seen_shapes else "compile: VAE, first clip of each shape"
                seen_shapes.add(sample.frames.shape)
                with clock(stage):
                    mean, logvar = m.encode_video(sample.frames)
                file = f"clips/{sample.name}.safetensors"
                with clock("writing"):
                    cache_lib.write_arrays(out / file, {"mean": mean, "logvar": logvar, "t5_feats": feat,
                                                        "t5_mask": mask})
                t, h, w = sample.frames.shape[:3]
                entries.append({
                    "name": sample.name, "file": file, "source": str(g.source), "caption": g.caption,
                    "num_frames": int(t), "height": int(h), "width": int(w), "latent_shape": list(mean.shape),
                    "kind": "image" if is_image(g.source) else "video", "source_name": g.name,
                    "start_frame": int(sample.start), "start_s": round(sample.start / cfg.fps, 6),
                    "caption_tokens": int(tokens)})
                if cfg.previews:
                    with clock("previews"):
                        recon = m.decode(mean)
                        both = np.concatenate([sample.frames, recon], axis=2)
                        if is_image(g.source):
                            write_image(out / "previews" / f"{sample.name}.png", both[0])
                        else:
                            write_mp4(out / "previews" / f"{sample.name}.mp4", both, fps=cfg.fps)
            for reason in g.skips:
                skip(g.source, reason)
            manifest["clips"] += entries
            save_manifest()
            report["new"] += [e["name"] for e in entries]
            bar.update()

    group, in_group = [], 0
    clock.start()
    for g in read_sources(todo, cfg, clock):
        if not g.samples:
            for reason in g.skips:
                skip(g.source, reason)
            save_manifest()
            bar.update()
            continue
        group.append(g)
        in_group += len(g.samples)
        if in_group >= cfg.text_batch_size:
            encode(group)
            group, in_group = [], 0
    if group:
        encode(group)
    clock.stop()
    bar.close()
    if manifest["clips"]:
        encode_empty_prompt()  # e.g. a resumed cache whose empty-prompt file went missing
    save_manifest()
    report["clips"] = [c["name"] for c in manifest["clips"]]
    report["sources"] = len(todo)
    report["truncated"] = [{"name": c["name"], "tokens": c["caption_tokens"]} for c in manifest["clips"]
                           if c.get("caption_tokens", 0) > cfg.max_length]
    report["timing"] = clock.summary(len(report["new"]), len(todo), cfg.workers)
    print(format_report(report, cfg.max_length))
    if not manifest["clips"]:
        raise ValueError(f"{input_dir}: none of its {len(sources)} videos and images could be prepared (the "
                         "reasons are listed above)")
    return report


def read_sources(todo, cfg, clock: "Clock"):
    """SourceRead of every (name, source, caption) in `todo`, in order. With cfg.workers > 0, that many
    threads decode and resize ahead (up to 2 x workers sources in flight) while the caller encodes;
    with 0, each source is read in the calling thread when it is needed (one at a time)."""
    if cfg.workers == 0:
        for item in todo:
            g = read_source(*item, cfg)
            clock.add("reading (decode + resize, all threads)", g.seconds)
            yield g
        return
    with concurrent.futures.ThreadPoolExecutor(cfg.workers, thread_name_prefix="prepare-read") as pool:
        pending = collections.deque()
        items = iter(todo)
        for item in itertools.islice(items, 2 * cfg.workers):
            pending.append(pool.submit(read_source, *item, cfg))
        try:
            while pending:
                with clock("waiting for reads"):
                    g = pending.popleft().result()
                clock.add("reading (decode + resize, all threads)", g.seconds)
                for item in itertools.islice(items, 1):
                    pending.append(pool.submit(read_source, *item, cfg))
                yield g
        finally:
            for f in pending:
                f.cancel()


class Clock:
    """Seconds spent per stage (`with clock('VAE'): ...`, or `clock.add` for the reading threads)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.wall = 0.0
        self._lock = threading.Lock()
        self._t0, self._before = 0.0, {}

    def start(self):
        """Begin the timed stretch (the encoding loop) that `summary` reports on."""
        self._t0, self._before = time.perf_counter(), dict(self.seconds)

    def stop(self):
        self.wall = time.perf_counter() - self._t0

    def add(self, stage: str, seconds: float):
        with self._lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    @contextlib.contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - t0)

    def summary(self, clips: int, sources: int, workers: int) -> dict:
        """{'wall_s', 'clips_per_s', 'sources_per_s', 'stages': {stage: seconds}} of the timed stretch.
        The rates leave out model loading and the 'compile: ' stages (the first T5 batch and the
        first clip of each shape, when XLA compiles): steady-state throughput."""
        excluded = sum(v - self._before.get(k, 0.0) for k, v in self.seconds.items()
                       if k == "loading models" or k.startswith("compile: "))
        steady = max(self.wall - excluded, 1e-9)
        return {"wall_s": self.wall, "steady_s": steady, "workers": workers,
                "clips_per_s": clips / steady if clips else 0.0, "sources_per_s": sources / steady if sources else 0.0,
                "stages": dict(self.seconds)}


def format_report(report: dict, max_length: int = 256) -> str:
    lines = [f"prepared {len(report['clips'])} clips in {report['output_dir']} "
             f"({len(report['new'])} encoded now, {len(report['reused'])} already cached), "
             f"{len(report['skipped'])} skipped" + (":" if report["skipped"] else "")]
    lines += [f"  skipped {s['source']}: {s['reason']}" for s in report["skipped"]]
    truncated = report.get("truncated") or []
    if truncated:
        lines.append(f"{len(truncated)} caption(s) longer than the {max_length} T5 tokens were truncated to "
                     f"{max_length}: " + ", ".join(f"{t['name']} ({t['tokens']} tokens)" for t in truncated))
    timing = report.get("timing")
    if timing and report["new"]:
        st = timing["stages"]
        how = f"{timing['workers']} reading threads" if timing["workers"] else "reading one at a time"
        lines.append(f"throughput: {len(report['new'])} clips from {report['sources']} sources in "
                     f"{timing['wall_s']:.1f} s ({how}): {timing['clips_per_s']:.2f} clips/s, "
                     f"{timing['sources_per_s']:.2f} sources/s (model loading and the first clip of each shape left out)")
        lines.append("  time went to: " + ", ".join(f"{k} {v:.1f} s" for k, v in sorted(st.items(), key=lambda kv: -kv[1])))
    return "\n".join(lines)
