"""The training data pipeline: batches of one latent shape from a cache of many.

A cache may hold clips of any mix of latent shapes [12, t, h, w]: spatial buckets, frame counts,
1-frame images. A batch needs one shape, so the loader groups the training clips by shape
("buckets") and plans every epoch from the seed and the epoch number alone:

  1. each bucket's clips are shuffled and cut into global batches of `batch_size`. A bucket whose
     clips do not fill its last batch completes it with clips from the start of its own shuffled
     order: every clip is seen every epoch, nothing is dropped, and up to batch_size - 1 clips of
     that bucket are seen twice (a bucket smaller than a batch repeats its clips to fill one);
  2. the batches of all buckets are shuffled together into the epoch's order, so at each step a
     bucket is drawn in proportion to the batches it has left, i.e. to its share of the clips.

Proportional drawing rather than round-robin: round-robin would show a small bucket as often as a
big one (its clips over-weighted) and leave the end of every epoch to the biggest bucket alone;
a seeded shuffle of the batches keeps any stretch of training a fair sample of the data and the
plan a pure function of (seed, epoch), which is what makes resuming exact.

Several caches (configs/lora.py `datasets`, mochi_jax/lib/cache.py `open_datasets`) are one cache
to the plan: their training clips side by side, each clip with its dataset's `repeats`. A clip of
repeats r is drawn r times per epoch (r entries in its bucket's shuffled order, so a batch may
hold it twice), so a dataset's share of the epoch is its clips x repeats over the sum of all of
them; with every repeats 1 (and for a single cache) the plan is exactly the one without repeats.

Every process computes the same plan and reads only its rows of each global batch (process p of P
takes rows p * B/P ... (p+1) * B/P - 1), so all processes are on the same bucket at every step. The
loader's position is the number of batches taken (`get_state()` / `set_state()`, saved in every
checkpoint): a resumed run sees exactly the batches an uninterrupted one would. Reading runs in
grain's threads, a few batches ahead.
"""

from __future__ import annotations

import dataclasses
import sys
import threading

import grain
import jax
import numpy as np

from mochi_jax.lib.cache import Cache


@dataclasses.dataclass(frozen=True)
class Bucket:
    shape: tuple[int, ...]  # the latent shape [12, t, h, w]
    clips: tuple[int, ...]  # cache indices, ascending
    batches: int  # global batches per epoch: ceil(draws / batch_size)
    repeats: tuple[int, ...] = ()  # draws per epoch of each clip (its dataset's repeats); () = once each

    @property
    def draws(self) -> int:
        """Clips drawn per epoch (before the last batch is filled)."""
        return sum(self.repeats) if self.repeats else len(self.clips)


class Plan:
    """Which clips make global batch g: a deterministic function of (seed, the clips' shapes,
    their repeats, batch_size). `plan.batch(g)` -> cache indices [batch_size], `plan.bucket_of(g)`
    -> its shape. `repeats` (one int >= 1 per clip; None = 1 each) draws clip i repeats[i] times
    per epoch."""

    def __init__(self, shapes: list[tuple[int, ...]], batch_size: int, seed: int, repeats=None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not shapes:
            raise ValueError("no training clips")
        if repeats is not None:
            repeats = [int(r) for r in repeats]
            if len(repeats) != len(shapes) or min(repeats) < 1:
                raise ValueError(f"repeats must give every one of the {len(shapes)} clips a count >= 1")
            if all(r == 1 for r in repeats):
                repeats = None  # the plan without repeats, exactly
        self.batch_size, self.seed, self.num_clips = int(batch_size), int(seed), len(shapes)
        self.repeats = repeats
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, s in enumerate(shapes):
            groups.setdefault(tuple(int(v) for v in s), []).append(i)
        self.buckets = []
        for s, idx in sorted(groups.items()):
            reps = tuple(repeats[i] for i in idx) if repeats else ()
            draws = sum(reps) if reps else len(idx)
            self.buckets.append(Bucket(s, tuple(idx), -(-draws // self.batch_size), reps))
        self.draws = sum(b.draws for b in self.buckets)  # clip draws per epoch (num_clips without repeats)
        self.epoch_batches = sum(b.batches for b in self.buckets)
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()

    def epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """(clips int [epoch_batches, batch_size], bucket number int [epoch_batches]) of epoch e."""
        with self._lock:
            if e not in self._epochs:
                if len(self._epochs) > 2:
                    self._epochs.pop(min(self._epochs))
                self._epochs[e] = self._make_epoch(e)
            return self._epochs[e]

    def _make_epoch(self, e: int):
        rng = np.random.default_rng(np.random.SeedSequence([self.seed % 2 ** 32, e]))
        rows, which = [], []
        for k, b in enumerate(self.buckets):
            # a clip of repeats r is r entries of the shuffled order (all 1: the order without repeats)
            order = rng.permutation(np.repeat(np.asarray(b.clips), b.repeats) if b.repeats else np.asarray(b.clips))
            # complete the last batch from the start of this bucket's order (cycling if it is short)
            order = np.resize(order, b.batches * self.batch_size)
            rows.append(order.reshape(b.batches, self.batch_size))
            which += [k] * b.batches
        perm = rng.permutation(self.epoch_batches)
        return np.concatenate(rows)[perm], np.asarray(which)[perm]

    def batch(self, g: int) -> np.ndarray:
        clips, _ = self.epoch(g // self.epoch_batches)
        return clips[g % self.epoch_batches]

    def bucket_of(self, g: int) -> tuple[int, ...]:
        _, which = self.epoch(g // self.epoch_batches)
        return self.buckets[which[g % self.epoch_batches]].shape

    def fingerprint(self) -> dict:
        out = {"clips": self.num_clips, "batch_size": self.batch_size, "seed": self.seed,
               "epoch_batches": self.epoch_batches}
        if self.repeats:  # only with repeats: the fingerprint of a plan without them is unchanged
            out["draws"] = self.draws
        return out

    def describe(self) -> str:
        """One line per bucket: shape, clips (and draws with repeats), batches per epoch, clips
        repeated to fill."""
        lines = [f"{self.num_clips} training clips"
                 + (f" ({self.draws} draws per epoch with repeats)" if self.repeats else "")
                 + f" in {len(self.buckets)} latent shape(s), batches of "
                 f"{self.batch_size}, {self.epoch_batches} batches per epoch:"]
        for b in self.buckets:
            extra = b.batches * self.batch_size - b.draws
            lines.append(f"  [{', '.join(map(str, b.shape))}]: {len(b.clips)} clips"
                         + (f" ({b.draws} draws)" if b.repeats else "") + f", {b.batches} batches"
                         + (f" ({extra} clip(s) seen twice to fill the last)" if extra else ""))
        return "\n".join(lines)


class Loader:
    """An endless iterator of this process's rows of the global batches: {mean, logvar [b, 12, t, h, w],
    t5_feats [b, L, D], t5_mask [b, L]} with b = batch_size / process_count, one latent shape per
    batch. `get_state()` / `set_state()` give and restore the position (a JSON-able dict)."""

    def __init__(self, cache: Cache, batch_size: int, seed: int, num_clips: int | None = None, threads: int = 2,
                 process_index: int | None = None, process_count: int | None = None):
        self.cache = cache
        num_clips = len(cache) if num_clips is None else int(num_clips)
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if batch_size % self.process_count:
            raise ValueError(f"batch_size {batch_size} must divide by the {self.process_count} processes")
        if num_clips < 1:
            raise ValueError(f"{cache.path}: no training clips")
        # several datasets (cache.MixedCache): each clip's repeats, and which datasets, in the position
        self.plan = Plan([cache.entries[i]["latent_shape"] for i in range(num_clips)], batch_size, seed,
                         repeats=cache.clip_repeats(num_clips))
        self._about = cache.fingerprint()
        self.rows = batch_size // self.process_count
        self.threads = threads
        self._start(0)

    def _start(self, next_batch: int):
        ds = grain.MapDataset.range(sys.maxsize).map(self._load)
        options = grain.ReadOptions(num_threads=self.threads, prefetch_buffer_size=2 * self.threads)
        self._it = iter(ds.to_iter_dataset(options))
        if next_batch:
            self._it.set_state({"next_index": int(next_batch)})

    def _load(self, g: int) -> dict[str, np.ndarray]:
        """This process's rows of global batch g."""
        lo = self.process_index * self.rows
        clips = [self.cache[int(i)] for i in self.plan.batch(g)[lo:lo + self.rows]]
        return {k: np.stack([c[k] for c in clips]) for k in clips[0]}

    def indices(self, g: int) -> np.ndarray:
        """The cache indices of global batch g (all processes' rows)."""
        return self.plan.batch(g)

    @property
    def position(self) -> int:
        """The number of batches taken so far."""
        return int(self._it.get_state()["next_index"])

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def fingerprint(self) -> dict:
        """What the plan is made from (saved with the position; {} of a plain cache adds nothing)."""
        return {**self.plan.fingerprint(), **self._about}

    def get_state(self) -> dict:
        return {"next_batch": self.position, **self.fingerprint()}

    def set_state(self, state: dict) -> None:
        """Continue at state['next_batch'] (also accepts the grain state of earlier versions, whose
        'next_index' counted batches too). A plan made for other clips, batch size or seed is
        continued at the same batch count, with a warning: the order then differs from the first run's."""
        next_batch = state.get("next_batch", state.get("next_index", 0))
        mine = self.fingerprint()
        differ = {k: (state[k], v) for k, v in mine.items() if k in state and state[k] != v}
        if differ or "next_batch" not in state:
            what = ", ".join(f"{k} {a} then, {b} now" for k, (a, b) in differ.items()) or "an older loader"
            print(f"[mochi_jax.lib.data] note: the checkpoint's data position was saved with {what}; continuing at "
                  f"batch {next_batch} of the current plan (the clip order differs from the interrupted run's)",
                  flush=True)
        self._start(int(next_batch))


def make_loader(cache: Cache, batch_size: int, seed: int, num_clips: int | None = None, threads: int = 2,
                process_index: int | None = None, process_count: int | None = None) -> Loader:
    """The loader over the first `num_clips` clips of `cache` (all by default; the trainer holds the
    last ones out for validation) in global batches of `batch_size` (see the module docstring);
    this process reads batch_size / process_count rows of each. `cache` may be several datasets in
    one (cache.open_datasets: their training clips first, each with its dataset's repeats)."""
    return Loader(cache, batch_size, seed, num_clips, threads, process_index, process_count)
