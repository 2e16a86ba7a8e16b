"""Count XLA compilations, by function name, through jax.monitoring (no state in the library)."""

import contextlib

import jax

EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def compiled_functions():
    """Within the block, the names of the functions XLA compiles are appended to the yielded list."""
    names = []

    def listener(event, _duration, **kwargs):
        if event == EVENT:
            names.append(str(kwargs.get("fun_name", "")))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield names
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
