"""What prepare reads: the sources under input_dir, their captions, buckets and frame windows.

Inputs: videos (.mp4 .mov .webm .mkv) and images (.jpg .png .webp), searched recursively, hidden
files ignored. Each needs a caption: a same-named .txt, else a row of the folder's metadata.jsonl /
metadata.csv (or `captions`); `trigger` starts every caption. Or input_dir names a musubi-tuner
metadata file (a .jsonl of {"video_path" | "image_path": ..., "caption": ...} lines, paths absolute or
relative to its folder): the sources are exactly the files its lines name, captioned by their lines
(`read_metadata_input`; a malformed line is an error naming the file and line). Each clip takes the bucket (H, W)
with the closest aspect ratio (distance of log(W/H)). An image is a 1-frame clip. A video gives
one or more frame windows at `fps` (`windows.mode`: head, uniform, slide; `plan_windows`), each
the longest of the `num_frames` buckets the clip fills, cover-resized and centre-cropped
(mochi_jax.lib.video); `read_source` does that work for one source (prepare's reading threads
call it). A bad input raises or records `Skip` with its reason; it never stops the run.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import time
from pathlib import Path

import imageio_ffmpeg
import numpy as np

from mochi_jax.lib.video import (IMAGE_SUFFIXES, VIDEO_SUFFIXES, VideoError, VideoInfo, VideoReader, load_image, probe,
                                 resize_cover)
from mochi_jax.models.vae import latent_frames


class Skip(Exception):
    """A clip that is left out; str() is the reason."""


MEDIA_SUFFIXES = VIDEO_SUFFIXES + IMAGE_SUFFIXES
METADATA_NAMES = ("metadata.jsonl", "metadata.csv")
# the first present names the file (video_path / image_path: musubi-tuner's metadata)
FILE_COLUMNS = ("file_name", "file", "path", "video", "image", "video_path", "image_path")
TEXT_COLUMNS = ("caption", "text", "prompt")  # the first present holds its caption
WINDOW_MODES = ("head", "uniform", "slide")


MUSUBI_FILE_KEYS = ("video_path", "image_path")


def is_metadata_input(input_dir) -> bool:
    """Whether input_dir names a musubi-tuner metadata .jsonl file rather than a folder."""
    p = Path(input_dir)
    return p.suffix.lower() == ".jsonl" and p.is_file()


def _text_of(path: Path, what: str) -> str:
    """A UTF-8 text file's contents (a byte-order mark dropped); a ValueError naming it otherwise."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: unreadable {what} ({e})") from e


def _json_lines(text: str):
    """(line number from 1, the line, its JSON value or the JSONDecodeError) of each non-blank line."""
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield n, line, json.loads(line)
            except json.JSONDecodeError as e:
                yield n, line, e


def read_metadata_input(path) -> tuple[dict[Path, tuple[str, str]], list[tuple[str, str]]]:
    """musubi-tuner's metadata as prepare's input: one JSON object per line, {"video_path": ...,
    "caption": ...} or {"image_path": ..., "caption": ...} (other keys ignored), the path absolute or
    relative to the file's folder; blank lines are passed over. Returns ({resolved file: (caption,
    '<name> line N')}, skipped [(source, reason)]: a line naming a missing file, a file that is no
    video or image, or a file named before), in line order. Malformed lines (not a JSON object, no or
    both path keys, a path that is not a string, no caption string) raise one ValueError naming the
    file and every bad line."""
    path = Path(path)
    text = _text_of(path, "metadata file")
    out: dict[Path, tuple[str, str]] = {}
    skipped, bad = [], []
    for n, line, row in _json_lines(text):
        if isinstance(row, json.JSONDecodeError):
            bad.append(f"line {n}: not JSON ({row.msg} at column {row.colno})")
            continue
        keys = [k for k in MUSUBI_FILE_KEYS if isinstance(row, dict) and k in row]
        if not isinstance(row, dict) or len(keys) != 1:
            bad.append(f"line {n}: needs one of \"video_path\" or \"image_path\", got {line.strip()[:200]}")
            continue
        name, caption = row[keys[0]], row.get("caption")
        if not isinstance(name, str) or not name.strip():
            bad.append(f"line {n}: {keys[0]} must be a path, got {name!r}")
            continue
        if not isinstance(caption, str):
            bad.append(f"line {n}: needs a \"caption\" string, got {caption!r}"[:300])
            continue
        suffix = Path(name).suffix.lower()  # the file's kind is its suffix's, whichever key names it
        file = (path.parent / Path(name).expanduser()).resolve()
        where, source = f"{path.name} line {n}", f"{path}:{n} ({name})"
        if not file.is_file():
            skipped.append((source, f"missing file: {name} named in {where} does not exist"
                                    + (" (a folder of frames is not supported)" if file.is_dir() else "")))
        elif suffix not in MEDIA_SUFFIXES:
            skipped.append((source, f"not a video or image: {name} named in {where}"))
        elif file in out:
            skipped.append((source, f"duplicate metadata row: {name} already has a caption in {out[file][1]}"))
        else:
            out[file] = (caption.strip(), where)
    if bad:
        raise ValueError(f"{path}: {len(bad)} malformed line{'s' if len(bad) > 1 else ''} (musubi-tuner metadata: "
                         f"one JSON object per line with \"video_path\" or \"image_path\" and \"caption\"):\n  "
                         + "\n  ".join(bad))
    return out, skipped


def find_sources(input_dir) -> list[Path]:
    """Videos and images under input_dir (recursive, sorted, hidden files and folders ignored), or
    those a metadata .jsonl input names (read_metadata_input; resolved, in line order)."""
    if is_metadata_input(input_dir):
        return list(read_metadata_input(input_dir)[0])
    root = Path(input_dir)
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in MEDIA_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def orphan_captions(input_dir, sources) -> list[Path]:
    """.txt files under input_dir (hidden ones ignored) that caption none of `sources` (none for a
    metadata .jsonl input, whose lines hold the captions)."""
    if is_metadata_input(input_dir):
        return []
    root = Path(input_dir)
    captioned = {src.with_suffix("") for src in sources}
    return sorted(p for p in root.rglob("*.txt") if p.is_file() and p.with_suffix("") not in captioned
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def is_image(source: Path) -> bool:
    return source.suffix.lower() in IMAGE_SUFFIXES


def clip_name(source: Path, input_dir) -> str:
    """'sub/clip' for input_dir/sub/clip.mp4. For a metadata .jsonl input, the path relative to the
    file's folder; a source outside that folder is named by its absolute path under '_abs/'
    ('/data/a.mp4' -> '_abs/data/a')."""
    if is_metadata_input(input_dir):
        root, source = Path(input_dir).resolve().parent, Path(source).resolve()
        if source.is_relative_to(root):
            return source.relative_to(root).with_suffix("").as_posix()
        return "/".join(("_abs", *source.with_suffix("").parts[1:]))
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
    text = _text_of(path, "captions file")
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        rows = [(reader.line_num, row) for row in reader]
    elif path.suffix.lower() in (".jsonl", ".json"):
        for n, _, row in _json_lines(text):
            if isinstance(row, json.JSONDecodeError):
                skipped.append((f"{path}:{n}", f"unreadable metadata row: {row}"))
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
    metadata file; for a metadata .jsonl input, its line alone. `trigger` (if set) starts every
    caption."""

    def __init__(self, input_dir, captions: str = "", trigger: str = ""):
        self.lines_only = is_metadata_input(input_dir)
        if self.lines_only:
            if captions:
                raise ValueError(f"captions = {captions!r}: input_dir {input_dir} is a metadata file, whose lines "
                                 "hold the captions; leave captions empty")
            self.metadata = Path(input_dir)
            self.rows, self.skipped = read_metadata_input(self.metadata)
        else:
            self.metadata = find_metadata(input_dir, captions)
            self.rows, self.skipped = read_captions_file(self.metadata) if self.metadata else ({}, [])
        self.trigger = trigger.strip()

    def __call__(self, source: Path) -> str:
        """The caption, or Skip."""
        txt = source.with_suffix(".txt")
        row = self.rows.get(source.resolve())
        if self.lines_only and row is None:
            raise Skip(f"no caption: no line of {self.metadata.name} names {source}")
        if not self.lines_only and (txt.is_file() or row is None):
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

