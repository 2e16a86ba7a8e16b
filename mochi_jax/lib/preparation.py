"""Clips, images + captions -> the training cache (VAE posteriors and T5 features; format in
mochi_jax/lib/cache.py). The command is `python -m mochi_jax.prepare` (mochi_jax/prepare.py).

What is read and how (sources, captions, buckets, frame windows) is mochi_jax/lib/sources.py; where
the VAE and T5 run (one device or several) is mochi_jax/lib/placement.py; this module is the run.
Captions are encoded by T5 in batches of `text_batch_size`, each clip by the VAE.

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

Devices: by default every local device is used (`devices`, `mesh`; see placement.py). The cache is
the same as one device makes (float rounding aside), so either may resume the other.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import errno
import itertools
import json
import threading
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mochi_jax.checkpoints.files import writable_dir
from mochi_jax.lib import cache as cache_lib
from mochi_jax.lib.placement import Models
from mochi_jax.lib.sources import (MEDIA_SUFFIXES, WINDOW_MODES, Captions, Skip, SourceRead, clip_name, find_sources,
                                   frame_buckets, is_image, is_metadata_input, orphan_captions, read_source)
from mochi_jax.lib.video import write_image, write_mp4

# Settings that change what a cached clip holds: an existing cache made with other values is not reused.
CONTENT_KEYS = ("vae", "t5", "tokenizer", "fps", "num_frames", "buckets", "upscale", "max_length",
                "vae_dtype", "vae_compute_dtype", "t5_dtype", "t5_compute_dtype", "tiled", "tile_size",
                "tile_overlap", "windows", "trigger")


def load_models(cfg) -> Models:
    """The VAE and T5 of `cfg`, placed on its devices (placement.Models); prepare loads them here,
    with the first clip to encode."""
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
CONTENT_DEFAULTS = {"windows": {"mode": "head"}, "trigger": "", "vae_compute_dtype": "float32",
                    "t5_compute_dtype": "bfloat16"}


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
    if not input_dir.is_dir() and not is_metadata_input(input_dir):
        raise NotADirectoryError(errno.ENOTDIR, "input_dir is a file: give a folder of clips or a metadata .jsonl", str(input_dir))
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
