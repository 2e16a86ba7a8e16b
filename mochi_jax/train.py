"""LoRA fine-tuning of the Mochi DiT: `python -m mochi_jax.train --config=configs/lora.py[:preset]`.

The loop is mochi_jax/lib/trainer.py (setup, steps, validation, export); the loss, optimizer and
training step are mochi_jax/lib/training.py; every knob is in configs/lora.py.
"""

from __future__ import annotations

from pathlib import Path

from mochi_jax import cli, demo
from mochi_jax.checkpoints.files import writable_dir
from mochi_jax.lib import trainer
from mochi_jax.lib.cache import Cache


def train(cfg) -> Path:
    """Run (or resume) the training described by `cfg`; the demo preset first makes its inputs, and
    remat='auto' is resolved here to the setting the compiler says fits (printed, recorded in the run
    directory, and in the run's config.json)."""
    demo.ensure(cfg)
    writable_dir(cfg.run_dir)  # a read-only or misplaced run folder fails now, not at the first checkpoint
    if cfg.model.remat == "auto":
        choice = trainer.resolve_auto_remat(cfg, *trainer.largest_latent(Cache(cfg.cache)))
        cfg.model.remat, cfg.model.remat_groups = choice.remat, choice.groups
        trainer.log(f"remat auto -> {choice.describe()}" if choice.tried else
                    f"remat auto -> {choice.groups or choice.remat} (picked for these settings before: "
                    f"{trainer.REMAT_RECORD} in the run directory)")
    return trainer.train(cfg)


def main():
    cli.run("configs/lora.py", train, "training configuration: configs/lora.py[:preset]", command="mochi_jax.train")


if __name__ == "__main__":
    main()
