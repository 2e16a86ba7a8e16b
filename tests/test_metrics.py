"""Video metrics: known answers, invariances, and each formula recomputed independently with torch."""

import math

import numpy as np
import pytest
import torch

from mochi_jax.lib import metrics as M


def smooth_clip(t: int = 16, d: int = 32, seed: int = 0) -> np.ndarray:
    """Embeddings along a slow great-circle arc (consecutive frames close) plus small noise."""
    rng = np.random.default_rng(seed)
    u, v = np.linalg.qr(rng.standard_normal((d, 2)))[0].T
    angles = np.linspace(0, 1.2, t)
    return (np.cos(angles)[:, None] * u + np.sin(angles)[:, None] * v
            + 0.01 * rng.standard_normal((t, d))).astype(np.float32)


def test_identical_frames():
    emb = np.tile(np.random.default_rng(0).standard_normal((1, 16)), (8, 1))
    frames = np.tile(np.random.default_rng(1).integers(0, 256, (1, 6, 10, 3), dtype=np.uint8), (5, 1, 1, 1))
    assert M.consecutive_consistency(emb) == pytest.approx(1.0, abs=1e-12)
    assert M.subject_consistency(emb) == pytest.approx(1.0, abs=1e-12)
    assert M.flicker(frames) == 1.0
    assert M.clip_t(emb, emb[0]) == pytest.approx(1.0) and M.clip_score(emb, emb[0]) == pytest.approx(2.5)
    assert M.clip_i(emb, emb[:3]) == pytest.approx(1.0)


def test_flicker_known_answer():
    frames = np.zeros((3, 4, 4, 3), np.uint8)
    frames[1] = 255  # 0 -> 255 -> 0: every pixel changes fully
    assert M.flicker(frames) == 0.0
    frames[1] = 51  # |diff| 51 everywhere: 1 - 51/255
    assert M.flicker(frames) == pytest.approx(0.8)


def test_order_changes_consistency_not_clip_t():
    emb = smooth_clip()
    text = np.random.default_rng(3).standard_normal(32)
    shuffled = emb[np.random.default_rng(4).permutation(len(emb))]
    reversed_ = emb[::-1]
    for other in (shuffled, reversed_):
        assert M.clip_t(other, text) == pytest.approx(M.clip_t(emb, text), abs=1e-12)
        assert M.clip_score(other, text) == pytest.approx(M.clip_score(emb, text), abs=1e-12)
        assert M.clip_i(other, emb[:4]) == pytest.approx(M.clip_i(emb, emb[:4]), abs=1e-12)
    smooth = M.consecutive_consistency(emb)
    assert smooth > 0.99
    assert M.consecutive_consistency(shuffled) < smooth - 0.05
    assert M.subject_consistency(shuffled) < M.subject_consistency(emb)
    # reversing keeps the set of consecutive pairs, hence the consecutive consistency
    assert M.consecutive_consistency(reversed_) == pytest.approx(smooth, abs=1e-12)


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(torch.as_tensor(a, dtype=torch.float64),
                                                 torch.as_tensor(b, dtype=torch.float64), dim=-1, eps=0)


def test_formulas_against_torch():
    rng = np.random.default_rng(5)
    f = rng.standard_normal((9, 24)).astype(np.float32) * rng.uniform(0.5, 3, (9, 1)).astype(np.float32)
    e = rng.standard_normal(24).astype(np.float32)
    refs = rng.standard_normal((5, 24)).astype(np.float32)
    frames = rng.integers(0, 256, (6, 7, 5, 3), dtype=np.uint8)
    per_frame = _cos(f, e[None])
    assert (per_frame < 0).any()  # the clamp of CLIPScore matters here
    assert M.clip_t(f, e) == pytest.approx(per_frame.mean().item(), abs=1e-12)
    assert M.clip_score(f, e) == pytest.approx((2.5 * per_frame.clamp(min=0)).mean().item(), abs=1e-12)
    assert M.style_probe(f, e) == pytest.approx(per_frame.mean().item(), abs=1e-12)
    assert M.consecutive_consistency(f) == pytest.approx(_cos(f[:-1], f[1:]).mean().item(), abs=1e-12)
    subject = sum((max(0.0, _cos(f[i - 1], f[i]).item()) + max(0.0, _cos(f[0], f[i]).item())) / 2
                  for i in range(1, len(f))) / (len(f) - 1)
    assert M.subject_consistency(f) == pytest.approx(subject, abs=1e-12)
    pairs = torch.stack([_cos(g, r) for g in f for r in refs])
    assert M.clip_i(f, refs) == pytest.approx(pairs.mean().item(), abs=1e-12)
    x = torch.as_tensor(frames, dtype=torch.float64)
    assert M.flicker(frames) == pytest.approx(((255 - (x[1:] - x[:-1]).abs().mean()) / 255).item(), abs=1e-12)


def test_t_quantile_and_ci():
    table = {(0.975, 1): 12.7062, (0.975, 4): 2.7764, (0.975, 30): 2.0423, (0.995, 10): 3.1693, (0.95, 2): 2.9200}
    for (p, df), t in table.items():
        assert M.t_quantile(p, df) == pytest.approx(t, abs=1e-4), (p, df)
    mean, half = M.mean_ci95([1, 2, 3, 4, 5])
    assert mean == 3.0 and half == pytest.approx(2.7764451051977934 * math.sqrt(2.5) / math.sqrt(5), rel=1e-9)
    mean, half = M.mean_ci95([0.7])
    assert mean == 0.7 and math.isnan(half)
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 7, 20, 99, 500):
        for p in (0.9, 0.975, 0.999):
            assert M.t_quantile(p, df) == pytest.approx(scipy_stats.t.ppf(p, df), rel=1e-9)


def test_refuses_bad_input():
    with pytest.raises(ValueError, match="T >= 2"):
        M.consecutive_consistency(np.ones((1, 4)))
    with pytest.raises(ValueError, match="uint8"):
        M.flicker(np.zeros((3, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="no values"):
        M.mean_ci95([])
