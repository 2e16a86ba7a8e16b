"""Video metrics for comparing a LoRA with its base model, as pure NumPy functions.

Embeddings are CLIP features (one row per frame, unnormalised; every function normalises them),
cos(u, v) = u . v / (|u| |v|). With f_t the embedding of frame t (t = 0 .. T-1), e a text embedding:

    clip_t(f, e)                  = 1/T  sum_t cos(f_t, e)                       prompt alignment
    clip_score(f, e)              = 1/T  sum_t 2.5 * max(cos(f_t, e), 0)         CLIPScore (Hessel et al.
                                    2021, w = 2.5), per frame, then the mean over frames
    consecutive_consistency(f)    = 1/(T-1) sum_{t>=1} cos(f_{t-1}, f_t)
    subject_consistency(f)        = 1/(T-1) sum_{t>=1} (max(0, cos(f_{t-1}, f_t)) + max(0, cos(f_0, f_t))) / 2
                                    (VBench's formula; VBench uses DINO features, we use CLIP's)
    flicker(x)                    = (255 - mean |x_{t+1} - x_t|) / 255  over all pairs, pixels, channels
                                    of uint8 frames (VBench's temporal flickering score, 1 = static)
    clip_i(f, g)                  = 1/(T N) sum_{t,n} cos(f_t, g_n)              likeness to N reference frames
    style_probe(f, s)             = 1/T  sum_t cos(f_t, s)                       CLIP-T against a style text

`video_metrics` computes all of them for one video (`METRICS` names them). `mean_ci95(values)` gives the mean and the half-width of its 95% confidence interval,
t_{0.975, n-1} * s / sqrt(n), with the Student-t quantile computed here (no SciPy).
"""

from __future__ import annotations

import math

import numpy as np


def _unit(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _frames(image_emb, at_least: int = 1) -> np.ndarray:
    f = _unit(image_emb)
    if f.ndim != 2 or len(f) < at_least:
        raise ValueError(f"expected frame embeddings [T >= {at_least}, D], got shape {f.shape}")
    return f


def _frame_cos(image_emb, text_emb) -> np.ndarray:
    """cos(f_t, e) for every frame: [T]."""
    return _frames(image_emb) @ _unit(text_emb)


def clip_t(image_emb, text_emb) -> float:
    """Mean over frames of cos(frame, text): image_emb [T, D], text_emb [D]."""
    return float(np.mean(_frame_cos(image_emb, text_emb)))


def clip_score(image_emb, text_emb, w: float = 2.5) -> float:
    """CLIPScore: w * max(cos(frame, text), 0) for each frame, then the mean over frames."""
    return float(np.mean(w * np.maximum(_frame_cos(image_emb, text_emb), 0.0)))


def consecutive_consistency(image_emb) -> float:
    """Mean cos(f[t-1], f[t]) over the T-1 consecutive pairs: 1 for identical frames."""
    f = _frames(image_emb, 2)
    return float(np.mean(np.sum(f[:-1] * f[1:], axis=-1)))


def subject_consistency(image_emb) -> float:
    """VBench: mean over t >= 1 of (max(0, cos(f[t-1], f[t])) + max(0, cos(f[0], f[t]))) / 2."""
    f = _frames(image_emb, 2)
    prev = np.maximum(np.sum(f[:-1] * f[1:], axis=-1), 0.0)
    first = np.maximum(f[1:] @ f[0], 0.0)
    return float(np.mean((prev + first) / 2))


def flicker(frames) -> float:
    """(255 - mean |frame[t+1] - frame[t]|) / 255 for uint8 frames [T, H, W, 3]: 1 = no change."""
    x = np.asarray(frames)
    if x.ndim != 4 or len(x) < 2 or x.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames [T >= 2, H, W, C], got {x.dtype} {x.shape}")
    diffs = [np.mean(np.abs(x[t + 1].astype(np.int16) - x[t].astype(np.int16))) for t in range(len(x) - 1)]
    return float((255.0 - np.mean(diffs)) / 255.0)


def clip_i(gen_emb, ref_emb) -> float:
    """Mean cos over every (generated frame, reference frame) pair: gen_emb [T, D], ref_emb [N, D]."""
    return float(np.mean(_frames(gen_emb) @ _frames(ref_emb).T))


def style_probe(image_emb, style_text_emb) -> float:
    """Mean cos(frame, style text), e.g. the text "a watercolor painting": CLIP-T against a style."""
    return clip_t(image_emb, style_text_emb)


# ----------------------------------------------------------------------------- confidence intervals

def t_two_sided(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer df >= 1 (Abramowitz & Stegun 26.7.3-4, exact):
    with theta = atan(t / sqrt(df)), s = sin(theta), c = cos(theta),
      df odd:  2/pi * (theta + s * (c + 2/3 c^3 + ... + (2*4*..*(df-3))/(1*3*..*(df-2)) c^(df-2)))  (df=1: 2 theta/pi)
      df even: s * (1 + 1/2 c^2 + 1*3/(2*4) c^4 + ... + (1*3*..*(df-3))/(2*4*..*(df-2)) c^(df-2))."""
    if df < 1 or int(df) != df:
        raise ValueError(f"df must be a positive integer, got {df}")
    df = int(df)
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2:
        term = total = math.cos(theta)
        for k in range(3, df - 1, 2):
            term *= c2 * (k - 1) / k
            total += term
        return 2 / math.pi * (theta + (s * total if df > 1 else 0.0))
    term = total = 1.0
    for k in range(2, df - 1, 2):
        term *= c2 * (k - 1) / k
        total += term
    return s * total


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with df degrees of freedom (p in (0.5, 1)), by bisection on
    the exact CDF `t_two_sided`: t_quantile(0.975, 4) = 2.7764."""
    if not 0.5 < p < 1:
        raise ValueError(f"p must be in (0.5, 1), got {p}")
    target = 2 * p - 1
    lo, hi = 0.0, 1.0
    while t_two_sided(hi, df) < target:
        lo, hi = hi, 2 * hi
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_two_sided(mid, df) < target:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return (lo + hi) / 2


def mean_ci95(values) -> tuple[float, float]:
    """(mean, half-width of the 95% interval) = (m, t_{0.975, n-1} * s / sqrt(n)), s the sample
    standard deviation (ddof 1). One value has no interval: the half-width is nan."""
    x = np.asarray(values, np.float64).ravel()
    if x.size == 0:
        raise ValueError("mean_ci95 of no values")
    mean = float(np.mean(x))
    if x.size < 2:
        return mean, float("nan")
    return mean, t_quantile(0.975, x.size - 1) * float(np.std(x, ddof=1)) / math.sqrt(x.size)


METRICS = {  # name -> what it measures (report legends)
    "clip_t": "mean cos(frame, prompt) of CLIP embeddings",
    "clip_score": "CLIPScore, 2.5 * max(cos(frame, prompt), 0), mean over frames",
    "consecutive_consistency": "mean cos(frame t-1, frame t) of CLIP embeddings",
    "subject_consistency": "VBench subject consistency on CLIP embeddings (previous and first frame)",
    "flicker": "(255 - mean |frame t+1 - frame t|) / 255 in pixels, 1 = static",
    "clip_i": "mean cos(frame, reference frame) of CLIP embeddings (needs references)",
    "style": "mean cos(frame, style prompt) of CLIP embeddings (needs a style prompt)",
}


def video_metrics(frames, image_emb, prompt_emb, ref_emb=None, style_emb=None) -> dict[str, float]:
    """Every metric of one video (see METRICS): uint8 frames, their CLIP embeddings, the prompt's,
    optionally reference frames' and a style prompt's."""
    out = {"clip_t": clip_t(image_emb, prompt_emb), "clip_score": clip_score(image_emb, prompt_emb),
           "consecutive_consistency": consecutive_consistency(image_emb),
           "subject_consistency": subject_consistency(image_emb), "flicker": flicker(frames)}
    if ref_emb is not None:
        out["clip_i"] = clip_i(image_emb, ref_emb)
    if style_emb is not None:
        out["style"] = style_probe(image_emb, style_emb)
    return out
