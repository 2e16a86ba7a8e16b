import os
import shutil
import sys
import tempfile

import pytest

# Tests run on the CPU; keep XLA from grabbing every core of a 2-core CI machine twice over.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests' programs are tiny and compile far more than they run: LLVM at -O0 compiles them in about two thirds
# of the time. It changes the machine code only (XLA's HLO passes and the buffers stay the same; a result may differ
# in its last bits from an -O2 build, as between CPUs); the pytest-xdist workers and the commands tests run inherit
# it (a harness that adds its device count to XLA_FLAGS keeps it).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
# reference harnesses (PyTorch reference runners, subprocess checks) live in tests/harness/
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "harness"))


def pytest_configure(config):
    """One JAX persistent compilation cache for the session, empty at its start: the tests, pytest-xdist's
    workers and every command a test runs in a subprocess inherit it through the environment (set here,
    before any of them imports jax), so the same tiny programs compile once per session, not once per
    process. A cache hit runs the very executable a compile would make."""
    if hasattr(config, "workerinput") or "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return  # a worker inherits its controller's; a cache set by the caller is kept
    folder = tempfile.mkdtemp(prefix="mochi_jax_tests_compilations_")
    config._mochi_jax_cache = folder
    os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"


def pytest_unconfigure(config):
    folder = getattr(config, "_mochi_jax_cache", None)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def shared_compilations(tmp_path_factory):
    """For modules whose in-process runs compile the same programs again (each run builds its own
    jitted functions; `pytestmark = pytest.mark.usefixtures("shared_compilations")`): JAX's
    persistent compilation cache, in a folder of the module's, lets them compile once."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")  # the last one is set when the cache starts
    saved = {name: getattr(jax.config, name) for name in names}
    compilation_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("compilations")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield
    compilation_cache.reset_cache()
    for name, value in saved.items():
        jax.config.update(name, value)


@pytest.fixture
def small_disk(tmp_path):
    """small_disk(kib) -> a folder on a tmpfs of that size, to fill up (root with mount rights only;
    skipped elsewhere)."""
    import subprocess

    mounted = []

    def make(kib: int):
        d = tmp_path / f"disk{len(mounted)}"
        d.mkdir()
        if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(d)],
                                               capture_output=True).returncode:
            pytest.skip("cannot mount a small tmpfs here")
        mounted.append(d)
        return d

    yield make
    for d in mounted:
        subprocess.run(["umount", str(d)], check=False)


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """wandb offline, its files in a folder of the test's (skipped without wandb: pip install -e '.[test]')."""
    pytest.importorskip("wandb")
    folder = tmp_path / "wandb_dir"
    folder.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(folder))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return folder
