import os
import sys

import pytest

# Tests run on the CPU; keep XLA from grabbing every core of a 2-core CI machine twice over.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# reference harnesses (PyTorch reference runners, subprocess checks) live in tests/harness/
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "harness"))


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
