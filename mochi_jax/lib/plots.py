"""Pictures of a training run for people: the curves PNG and the tensorboard animation of a video.

    plot_curves(rows, run_dir / "curves.png", title=run_dir.name)   # rows: metrics.jsonl's dicts
    summary = gif_summary("val_video/0_a_red_ball", frames, fps=30)  # a tensorboard image (an animated GIF)

curves.png: the training loss (the logged interval means, solid) and the held-out validation loss
(dashed, dots) against the step, the learning rate below; a sweep (keys variant/<name>/loss, ...)
draws one colour per variant. It is written under a temporary name in the same folder and renamed
over the old one, so a viewer never sees half a file. matplotlib (its Agg canvas, no pyplot) is
imported on first use: the trainer pays for it only when it plots.

The GIF: tensorboardX's `add_video` needs moviepy to encode one; Pillow does it here, and the
Summary carries it as an image, which tensorboard's IMAGES tab plays.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from pathlib import Path

import numpy as np

from mochi_jax.lib.video import VideoReader

CURVES = "curves.png"  # in a run directory
_VARIANT = re.compile(r"^variant/(?P<name>[^/]+)/(?P<key>loss|val_loss|lr)$")


def read_rows(path) -> list[dict]:
    """The rows of a metrics.jsonl ({"step": int, ...} per line); lines that are not one (torn by a
    kill, damaged) are skipped."""
    rows = []
    for line in Path(path).read_bytes().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def series(rows) -> dict[str, dict[str, tuple[list, list]]]:
    """{variant: {"loss" | "val_loss" | "lr": (steps, values)}} in step order, finite values only;
    a run of one LoRA is the variant "" (keys loss, val_loss, lr), a sweep's variants are named by
    their keys variant/<name>/loss, ... A step logged twice keeps its last value."""
    points: dict[str, dict[str, dict[int, float]]] = {}
    for row in rows:
        for k, v in row.items():
            if k in ("loss", "val_loss", "lr"):
                name, key = "", k
            else:
                m = _VARIANT.match(k)
                if m is None:
                    continue
                name, key = m["name"], m["key"]
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                points.setdefault(name, {}).setdefault(key, {})[row["step"]] = float(v)
    return {name: {key: (sorted(p), [p[s] for s in sorted(p)]) for key, p in keys.items()}
            for name, keys in points.items()}


def plot_curves(rows, path, title: str = "") -> Path | None:
    """Draw `rows` (metrics.jsonl dicts) into the PNG `path` (see the module's docstring), atomically;
    None (nothing written) when no row has a loss to draw."""
    data = series(rows)
    data = {name: keys for name, keys in data.items() if "loss" in keys or "val_loss" in keys}
    if not data:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    has_lr = any("lr" in keys for keys in data.values())
    fig = Figure(figsize=(8, 5.5 if has_lr else 4.2), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    if has_lr:
        ax, ax_lr = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    else:
        ax, ax_lr = fig.subplots(1, 1), None
    colours = [f"C{i % 10}" for i in range(len(data))]
    for colour, (name, keys) in zip(colours, data.items()):  # the order the rows name them (config order)
        who = f"{name} " if name else ""
        if "loss" in keys:
            ax.plot(*keys["loss"], color=colour, lw=1.5, label=f"{who}training loss")
        if "val_loss" in keys:
            ax.plot(*keys["val_loss"], color=colour, lw=1.2, ls="--", marker="o", ms=4,
                    label=f"{who}validation loss")
        if ax_lr is not None and "lr" in keys:
            ax_lr.plot(*keys["lr"], color=colour, lw=1.2, label=name or None)
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, ncols=2 if len(data) > 2 else 1)
    if title:
        ax.set_title(title, fontsize=10)
    if ax_lr is not None:
        ax_lr.set_ylabel("learning rate")
        ax_lr.grid(True, alpha=0.3)
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        ax_lr.set_xlabel("step")
    else:
        ax.set_xlabel("step")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ----------------------------------------------------------------------------- tensorboard

def gif_bytes(frames, fps: float) -> bytes:
    """uint8 frames [T, H, W, 3] as an animated GIF that loops (Pillow; each frame's own palette)."""
    frames = np.asarray(frames, np.uint8)
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    out = io.BytesIO()
    images[0].save(out, format="GIF", save_all=True, append_images=images[1:], loop=0,
                   duration=max(20, round(1000 / fps)), optimize=False, disposal=1)
    return out.getvalue()


def gif_summary(tag: str, frames, fps: float):
    """A tensorboard Summary holding `frames` as one animated GIF image under `tag` (what
    tensorboardX's add_video writes, without moviepy): add it with
    `writer._get_file_writer().add_summary(summary, step)`."""
    from tensorboardX.proto.summary_pb2 import Summary

    _, h, w, c = np.shape(frames)
    image = Summary.Image(height=h, width=w, colorspace=c, encoded_image_string=gif_bytes(frames, fps))
    return Summary(value=[Summary.Value(tag=tag, image=image)])


def fit_within(height: int, width: int, longest: int) -> tuple[int, int]:
    """(h, w) scaled down (never up) so that the longer side is at most `longest`, both even."""
    s = min(1.0, longest / max(height, width))
    return max(2, round(height * s / 2) * 2), max(2, round(width * s / 2) * 2)


TB_VIDEO_SIDE = 320  # the longer side of a validation video in tensorboard (pixels; never upscaled)
_SAMPLE = re.compile(r"^step(?P<step>\d+)_prompt(?P<prompt>\d+)_seed(?P<seed>-?\d+)$")


def video_tag(path, prompts=()) -> str | None:
    """The tensorboard tag of a validation video samples/[<variant>/]step<N>_prompt<i>_seed<s>.mp4:
    'val_video/<i>_<the prompt, slugged>' ('variant/<name>/val_video/...' in a sweep); None for a
    file not named so."""
    path = Path(path)
    m = _SAMPLE.match(path.stem)
    if m is None:
        return None
    i = int(m["prompt"])
    text = prompts[i] if i < len(prompts) else ""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", str(text).lower()).strip("_")[:48]
    tag = f"val_video/{i}" + (f"_{slug}" if slug else "")
    return tag if path.parent.name == "samples" else f"variant/{path.parent.name}/{tag}"


def read_video(path, longest: int = TB_VIDEO_SIDE) -> tuple[np.ndarray, float]:
    """(uint8 frames [T, H, W, 3] scaled down so the longer side is at most `longest`, fps) of a video."""
    with VideoReader(path) as r:
        fps = r.info.fps
        got = r.read(range(100_000), fps, fit_within(r.info.height, r.info.width, longest))
    return np.stack([got[i] for i in sorted(got)]), fps
