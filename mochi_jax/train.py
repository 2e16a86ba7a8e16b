"""LoRA fine-tuning of the Mochi DiT: `python -m mochi_jax.train --config=configs/lora.py[:preset]`.

The loop is mochi_jax/lib/trainer.py (setup, steps, validation, export); the loss, optimizer and
training step are mochi_jax/lib/training.py; every knob is in configs/lora.py.
"""

from __future__ import annotations

from pathlib import Path

from mochi_jax import cli, demo
from mochi_jax.lib import trainer


def train(cfg) -> Path:
    """Run (or resume) the training described by `cfg` (trainer.train); the demo preset first makes its inputs."""
    demo.ensure(cfg)
    return trainer.train(cfg)


def main():
    cli.run("configs/lora.py", train, "training configuration: configs/lora.py[:preset]", command="mochi_jax.train")


if __name__ == "__main__":
    main()
