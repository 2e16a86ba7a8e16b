"""`cpu_devices(n)`: this process runs on n simulated CPU devices. Call it before jax is imported (the
multi-device harnesses do, first thing). The count is added to XLA_FLAGS, so the flags the test
session set (tests/conftest.py: the -O0 compiles) stay."""

import os


def cpu_devices(n: int) -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
