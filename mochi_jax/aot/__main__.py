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

from mochi_jax.aot import targets
from mochi_jax.stderr import dropping_stderr

PREFIX = "mochi_jax.aot"


def main():
    targets.compile_only_environment()  # before jax is imported: the imports below load it
    with dropping_stderr(targets.GPU_COMPILER_NOISE):  # the CUDA plugin, when installed, looks for a driver
        from mochi_jax import cli  # noqa: E402 - after the environment is set
        from mochi_jax.aot import fit, report  # noqa: E402

    def command(cfg):
        try:
            r = fit.check(cfg)
        except (ValueError, targets.MissingCompiler) as e:  # BadInput, TargetError and the config checks
            print(f"{PREFIX}: {e}", file=sys.stderr, flush=True)
            sys.exit(2)
        print(r.format(), flush=True)
        if cfg.aot.json:
            print(f"wrote {report.write_json(r, cfg.aot.json)}")
        sys.exit(0 if r.fits else 1)  # 0 fits, 1 does not, 2 bad input

    cli.run("configs/lora.py", command, "a configs/lora.py, sample.py or prepare.py config with an aot block",
            command=PREFIX, show_devices=False)  # flags it cannot take and user errors: one line, exit status 2


if __name__ == "__main__":
    main()
