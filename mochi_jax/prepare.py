"""Clips + captions -> the training cache: `python -m mochi_jax.prepare --config=configs/prepare.py[:demo]`.

    python -m mochi_jax.prepare --config=configs/prepare.py --config.input_dir=clips --config.output_dir=cache
    python -m mochi_jax.prepare --config=configs/prepare.py:demo     # tiny random models, synthetic clips

The work is mochi_jax/lib/preparation.py (the resumable run), with mochi_jax/lib/sources.py (reading
clips and captions, bucketing) and mochi_jax/lib/placement.py (the VAE and T5 on the devices).
"""

from __future__ import annotations

from mochi_jax import cli, demo
from mochi_jax.lib import preparation


def prepare(cfg) -> dict:
    """Encode cfg.input_dir into cfg.output_dir (the demo preset first makes its models and clips)."""
    demo.ensure(cfg)
    return preparation.prepare(cfg)


def main():
    cli.run("configs/prepare.py", prepare, "prepare settings: configs/prepare.py[:demo]", command="mochi_jax.prepare")


if __name__ == "__main__":
    main()
