"""Will it fit? `python -m mochi_jax.aot --config=configs/lora.py --config.aot.target=v5e-16`

Compiles a command's exact program ahead of time for a TPU slice (libtpu's compiler) or NVIDIA GPUs
(the CUDA plugin's compiler) on this CPU host, with no accelerator and no weights, and prints the
compiler's memory per device: arguments, temporaries, outputs, the total against the device's
memory, and the compile time. The program is the config's own: configs/lora.py -> the training
step (its mesh, batch, LoRA, optimizer, attention and remat), configs/sample.py -> one sampler
step, configs/prepare.py -> the VAE encode or (--config.aot.what=t5) T5. See configs/aot.py.

Exit status: 0 it fits, 1 it does not (the numbers say by how much), 2 bad input (one line).
"""

from __future__ import annotations

import sys

PREFIX = "mochi_jax.aot"


def run(cfg) -> int:
    from mochi_jax import fit, targets

    try:
        report = fit.check(cfg)
    except (ValueError, targets.MissingCompiler) as e:  # BadInput, TargetError and the config checks are ValueErrors
        print(f"{PREFIX}: {e}", file=sys.stderr, flush=True)
        return 2
    print(report.format(), flush=True)
    if cfg.aot.json:
        print(f"wrote {fit.write_json(report, cfg.aot.json)}")
    return 0 if report.fits else 1


def main():
    from mochi_jax import targets

    targets.compile_only_environment()  # before jax is imported
    from mochi_jax import cli

    def command(cfg):
        sys.exit(run(cfg))  # 0 fits, 1 does not, 2 bad input

    cli.run("configs/lora.py", command, "a configs/lora.py, sample.py or prepare.py config with an aot block",
            command=PREFIX)  # flags it cannot take and user errors: one line, exit status 2


if __name__ == "__main__":
    main()
