"""Small synthetic training clips: coloured shapes moving over a plain background, with captions.

    make_clips("runs/demo/clips", n=4)   # clip_000.mp4 + clip_000.txt, ... (deterministic per seed)

Each clip has its own shape (circle or square), colours, size and straight-line motion that
stays inside the frame; its caption says what moves where ("a red circle moves to the
right across a dark blue background"). The demo and the tests train and prepare on these.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mochi_jax.lib.video import write_mp4

COLOURS = {
    "red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (240, 220, 40),
    "white": (245, 245, 245), "orange": (245, 140, 30), "purple": (150, 60, 200), "cyan": (40, 210, 220),
}
BACKGROUNDS = {"black": (10, 10, 10), "dark blue": (15, 25, 70), "grey": (110, 110, 110), "dark green": (15, 60, 25)}


def _direction(vy: float, vx: float) -> str:
    horizontal = "to the right" if vx > 0 else "to the left"
    vertical = "downwards" if vy > 0 else "upwards"
    if abs(vx) >= 2 * abs(vy):
        return horizontal
    if abs(vy) >= 2 * abs(vx):
        return vertical
    return f"{vertical} and {horizontal}"


def render(num_frames: int, size, shape: str, colour, background, radius: float, start, velocity) -> np.ndarray:
    """uint8 [T, H, W, 3]: a `shape` ('circle' | 'square') of `radius` px whose centre moves from
    `start` (y, x) by `velocity` (y, x) px per frame."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = np.arange(num_frames, dtype=np.float32)[:, None]
    centres = np.asarray(start, np.float32) + t * np.asarray(velocity, np.float32)
    frames = np.empty((num_frames, h, w, 3), np.uint8)
    frames[:] = np.asarray(background, np.uint8)
    for i, (cy, cx) in enumerate(centres):
        if shape == "circle":
            inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
        else:
            inside = (np.abs(yy - cy) <= radius) & (np.abs(xx - cx) <= radius)
        frames[i][inside] = np.asarray(colour, np.uint8)
    return frames


def make_clips(folder, n: int = 4, num_frames: int = 25, size=(48, 80), fps: float = 30, seed: int = 0) -> list[Path]:
    """Write n clips `clip_XXX.mp4` with captions `clip_XXX.txt` into `folder`; returns the video paths.

    Clip k depends only on (seed, k, num_frames, size), so the same call writes the same clips.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    h, w = size
    paths = []
    for k in range(n):
        rng = np.random.default_rng([seed, k])
        shape = ("circle", "square")[k % 2]
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
        radius = float(rng.uniform(0.12, 0.22) * min(h, w))
        # A straight path that stays inside the frame: 50-90% of the longest one in this direction.
        span = np.array([h - 1 - 2 * radius, w - 1 - 2 * radius])
        angle = rng.uniform(0, 2 * np.pi)
        unit = np.array([np.sin(angle), np.cos(angle)])  # (y, x), y pointing down
        travel = rng.uniform(0.5, 0.9) * np.min(span / np.maximum(np.abs(unit), 1e-6)) * unit
        start = radius + np.maximum(0, -travel) + rng.uniform(0, 1, 2) * (span - np.abs(travel))
        velocity = travel / max(num_frames - 1, 1)
        frames = render(num_frames, size, shape, COLOURS[colour], BACKGROUNDS[background], radius, start, velocity)
        path = write_mp4(folder / f"clip_{k:03d}.mp4", frames, fps=fps)
        article = "an" if colour[0] in "aeiou" else "a"
        caption = f"{article} {colour} {shape} moves {_direction(*velocity)} across a {background} background"
        (folder / f"clip_{k:03d}.txt").write_text(caption + "\n")
        paths.append(path)
    return paths
