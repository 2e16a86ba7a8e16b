"""Stopping a command early on SIGTERM or SIGINT (Ctrl-C), alike on one process and on many.

`with Signals() as signals:` records the signal. Alone, while `signals.interruptible`, it raises
Interrupted at once, in work that a rerun redoes anyway; the command then raises Stopped (exit
status 75: rerun to continue). Where stopping at once would lose work (a training step and its
checkpoint), or with several processes, where each takes part in the others' collectives and none
may leave alone, the command asks `signals.agreed()` (or calls `signals.stop_point()`) at the
points where it can stop (after a training step, before the first one, between render batches):
every process gets the same answer, so all of them stop at the same point. A second signal takes
Python's default action (SIGINT: KeyboardInterrupt). The trainer, `sample` and `evaluate` use it.
"""

from __future__ import annotations

import contextlib
import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils


class Interrupted(BaseException):
    """A stop signal arrived during work a rerun redoes anyway (set-up, loading, a validation, a render)."""


class Stopped(Exception):
    """The command stopped early on a signal, its finished work kept: rerun the same command to continue."""
    exit_status = 75  # sysexits' EX_TEMPFAIL: try again


class Signals:
    """SIGTERM and SIGINT over a command (see the module docstring). `interruptible` starts True
    with one process and False with several; `name` is the signal's name, "... on another
    process" where another process got it."""

    NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}

    def __init__(self):
        self.signal, self.old, self.elsewhere = None, {}, None
        self.interruptible = jax.process_count() == 1

    def _on_signal(self, signum, _frame):
        # the next one takes Python's default action (SIGINT: KeyboardInterrupt), whatever handler came before
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
        self.signal = signum
        if self.interruptible:
            raise Interrupted(signum)

    @property
    def name(self) -> str:
        if self.signal is None and self.elsewhere is not None:
            return f"{self.NAMES.get(self.elsewhere, self.elsewhere)} on another process"
        return self.NAMES.get(self.signal, str(self.signal))

    @contextlib.contextmanager
    def deferred(self):
        """Not interrupted in this block (e.g. while a file is written whole): a signal is recorded for
        the next `agreed()`."""
        before, self.interruptible = self.interruptible, False
        try:
            yield
        finally:
            self.interruptible = before

    def agreed(self) -> bool:
        """Stop now? This process's signal; with several processes, any process's, the same answer
        in every one of them (one all-gather of a number per call)."""
        if jax.process_count() == 1:
            return self.signal is not None
        signals = np.asarray(multihost_utils.process_allgather(np.int32(self.signal or 0)))
        if self.signal is None and signals.any():
            self.elsewhere = int(signals[np.flatnonzero(signals)[0]])
        return bool(signals.any())

    def stop_point(self) -> None:
        """A point where the command can stop: raises Interrupted when `agreed()` says stop (with
        several processes, every one of them raises here together)."""
        if self.agreed():
            raise Interrupted(self.signal or self.elsewhere)

    def __enter__(self) -> "Signals":
        # Python takes signals on the main thread only. This also replaces the SIGTERM handler that
        # jax.distributed installs (which only records a preemption), so a signal stops the command.
        if threading.current_thread() is threading.main_thread():
            self.old = {sig: signal.signal(sig, self._on_signal) for sig in self.NAMES}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)
