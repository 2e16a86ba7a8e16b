"""The training data pipeline: a grain dataset over the prepared cache.

Order is a deterministic function of the seed (a global shuffle, reshuffled every epoch); each
process reads only its share of the clips (`process_index::process_count`); the iterator's
position is part of every checkpoint (`loader.get_state()` / `set_state()`), so a resumed run
sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import grain
import jax
import numpy as np

from mochi_jax.cache import Cache

FIELDS = ("mean", "logvar", "t5_feats", "t5_mask")


class _Clips:
    """Random access to the cache's clips as dicts of the training fields."""

    def __init__(self, cache: Cache, indices):
        self.cache, self.indices = cache, list(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        item = self.cache[self.indices[i]]
        return {k: np.asarray(item[k]) for k in FIELDS}


def make_loader(cache: Cache, batch_size: int, seed: int, process_index: int | None = None,
                process_count: int | None = None, threads: int = 2, indices=None):
    """An endless grain iterator of batches {mean, logvar [B, 12, t, h, w], t5_feats [B, L, D],
    t5_mask [B, L]} for this process (batch_size is per process) over the clips `indices` (all)."""
    indices = range(len(cache)) if indices is None else indices
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    shapes = cache.latent_shapes()
    if batch_size > 1 and len(shapes) > 1:
        raise ValueError(f"{cache.path}: clips come in {len(shapes)} latent shapes {sorted(shapes)}; "
                         f"batches of {batch_size} need one shape (prepare with one bucket, or use batch_size 1)")
    if len(indices) < process_count:
        raise ValueError(f"{cache.path}: {len(indices)} training clips cannot feed {process_count} processes")
    ds = grain.MapDataset.source(_Clips(cache, indices))[process_index::process_count]
    ds = ds.shuffle(seed=seed).repeat().batch(batch_size, drop_remainder=True)
    options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)
    return iter(ds.to_iter_dataset(options))
