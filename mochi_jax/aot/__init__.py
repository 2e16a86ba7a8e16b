"""Will it fit? The ahead-of-time fit check: `python -m mochi_jax.aot --config=configs/lora.py
--config.aot.target=v5e-16` compiles a command's exact program for a TPU slice or NVIDIA GPUs on a
CPU host and reports the compiler's memory per device.

    targets.py   the hardware: TPU topologies and GPU target configs, compile-only devices, memory limits
    fit.py       from a command's config to its program (built by the library module that runs it)
    report.py    compile, measure and report
    __main__.py  the command

This package imports nothing at import time, so the command can set up a compile-only environment
(`targets.compile_only_environment`) before jax loads.
"""
