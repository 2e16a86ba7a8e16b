"""Run by tests/test_data.py in a subprocess with 4 simulated CPU devices (XLA_FLAGS must be set before
jax is imported): the trainer on a cache of several latent shapes with global batch 4 over a
(data=2, fsdp=2) mesh. Arguments: demo root (holding models/), cache folder, run folder, steps. Prints the
trainer's log and one RESULT line: the shape of every global batch the loader planned and the step
metrics."""

import sys

from simulated import cpu_devices

cpu_devices(4)

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402

from mochi_jax.configs import lora as lora_config  # noqa: E402
from mochi_jax.lib import trainer  # noqa: E402


def main():
    root, cache, run_dir, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    assert jax.device_count() == 4
    cfg = lora_config.demo(lora_config.get_config(), root)
    del cfg.demo
    cfg.cache, cfg.run_dir, cfg.steps, cfg.batch_size = cache, run_dir, steps, 4
    cfg.mesh.data, cfg.mesh.fsdp = 2, 2
    cfg.log_every, cfg.checkpoint.every = 1, steps
    cfg.validation.every, cfg.validation.holdout = 0, 0
    run = trainer.setup(cfg)
    plan = [{"clips": [int(i) for i in run.loader.indices(g)], "shape": list(run.loader.plan.bucket_of(g))}
            for g in range(steps)]
    trainer.train(cfg)  # a fresh setup: the loader above was only looked at
    metrics = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    print("RESULT " + json.dumps({"plan": plan, "metrics": metrics, "epoch_batches": run.loader.plan.epoch_batches,
                                  "mesh": dict(run.mesh.shape)}))


if __name__ == "__main__":
    sys.exit(main())
