"""Frames -> CLIP pixels, equal to `transformers.CLIPImageProcessor` with its defaults (the PIL path).

    pixels = preprocess(frames)      # uint8 [T, H, W, 3] -> float32 [T, 224, 224, 3]

Per frame: resize with PIL's bicubic filter so the short side is `size` (the long side
int(size * long / short), truncated), centre crop crop_size x crop_size (top = (H - crop) // 2,
zero padding if the frame is smaller), rescale by 1/255 (in float64, then float32), then
(x - mean) / std in float32 with OpenAI's CLIP mean and std. PIL (pillow, a dependency of
imageio) does the resize, so the result is bit-for-bit the processor's. Note OpenAI's original
preprocessing (torchvision Resize + CenterCrop) rounds the crop offset, so odd-sized frames can
differ from it by one pixel of shift; transformers' processor is the one matched here.
"""

from __future__ import annotations

import numpy as np

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resize_short_side(frame: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 with the short side `size`, PIL bicubic."""
    from PIL import Image

    h, w = frame.shape[:2]
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_h, new_w = size, int(size * w / h)
    return np.asarray(Image.fromarray(frame).resize((new_w, new_h), resample=Image.Resampling.BICUBIC))


def center_crop(frame: np.ndarray, crop: int) -> np.ndarray:
    """[H, W, C] -> [crop, crop, C] from offset ((H - crop) // 2, (W - crop) // 2); a side shorter
    than `crop` is first zero-padded to it, the larger half of the padding before."""
    h, w = frame.shape[:2]
    pad_h, pad_w = max(crop - h, 0), max(crop - w, 0)
    if pad_h or pad_w:
        top, left = (pad_h + 1) // 2, (pad_w + 1) // 2
        frame = np.pad(frame, ((top, pad_h - top), (left, pad_w - left), (0, 0)))
        h, w = frame.shape[:2]
    top, left = (h - crop) // 2, (w - crop) // 2
    return frame[top: top + crop, left: left + crop]


def preprocess(frames, size: int = 224, crop_size: int | None = None,
               mean=CLIP_MEAN, std=CLIP_STD) -> np.ndarray:
    """uint8 frames [T, H, W, 3] (or one [H, W, 3]) -> normalised float32 [T, crop, crop, 3]."""
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 RGB frames [T, H, W, 3], got {frames.dtype} {frames.shape}")
    crop = size if crop_size is None else crop_size
    out = np.empty((len(frames), crop, crop, 3), np.float32)
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    for t, frame in enumerate(frames):
        x = center_crop(resize_short_side(frame, size), crop)
        x = (x.astype(np.float64) * (1 / 255)).astype(np.float32)
        out[t] = (x - mean) / std
    return out
