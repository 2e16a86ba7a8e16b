"""One training run on a prepared cache with the demo's tiny models, for tests/test_data.py (run in a
subprocess so it can be killed). Arguments: demo root (holding models/), cache folder, run folder,
steps, global batch size, and optionally kill_at: the process SIGKILLs itself when the loader is
asked for a batch after kill_at batches (mid-run, whatever checkpoint is in flight). Checkpoints
every 2 steps, logs every step, no validation."""

import os
import signal
import sys

from mochi_jax.configs import lora as lora_config
from mochi_jax.lib import data, trainer


def kill_at(n: int):
    real_next = data.Loader.__next__

    def next_or_die(self):
        if self.position >= n:
            print(f"killing myself after {n} batches", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return real_next(self)

    data.Loader.__next__ = next_or_die


def main():
    root, cache, run_dir, steps, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    if len(sys.argv) > 6:
        kill_at(int(sys.argv[6]))
    cfg = lora_config.demo(lora_config.get_config(), root)
    del cfg.demo  # the cache is given: nothing to make
    cfg.cache, cfg.run_dir, cfg.steps, cfg.batch_size = cache, run_dir, steps, batch
    cfg.log_every, cfg.checkpoint.every = 1, 2
    cfg.validation.every, cfg.validation.holdout = 0, 0
    trainer.train(cfg)


if __name__ == "__main__":
    sys.exit(main())
