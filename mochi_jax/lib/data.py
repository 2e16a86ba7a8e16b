"""The training data pipeline: a grain dataset over the prepared cache.

Order is a deterministic function of the seed (a global shuffle, reshuffled every epoch); each
process reads only its share of the clips (`process_index::process_count`); the iterator's
position is part of every checkpoint (`loader.get_state()` / `set_state()`), so a resumed run
sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import grain
import jax

from mochi_jax.lib.cache import Cache


def make_loader(cache: Cache, batch_size: int, seed: int, num_clips: int | None = None, threads: int = 2):
    """An endless grain iterator of batches {mean, logvar [B, 12, t, h, w], t5_feats [B, L, D],
    t5_mask [B, L]} for this process (batch_size is per process), over the first `num_clips` clips
    (all by default; the trainer holds the last ones out for validation)."""
    num_clips = len(cache) if num_clips is None else num_clips
    shapes = cache.latent_shapes()
    if batch_size > 1 and len(shapes) > 1:
        raise ValueError(f"{cache.path}: clips come in {len(shapes)} latent shapes {sorted(shapes)}; "
                         f"batches of {batch_size} need one shape (prepare with one bucket, or use batch_size 1)")
    if num_clips < jax.process_count():
        raise ValueError(f"{cache.path}: {num_clips} training clips cannot feed {jax.process_count()} processes")
    ds = grain.MapDataset.source(cache)[:num_clips][jax.process_index()::jax.process_count()]
    ds = ds.shuffle(seed=seed).repeat().batch(batch_size, drop_remainder=True)
    options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)
    return iter(ds.to_iter_dataset(options))
