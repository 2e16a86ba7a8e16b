"""The training loop makes no hidden host transfer.

A few steps of the demo model run through the trainer's own loop (`trainer.run_steps`: the batch's
placement on the mesh, the step, the metrics' logging, the last checkpoint) under
`jax.transfer_guard("disallow")`: explicit transfers (jax.device_put,
jax.make_array_from_process_local_data, jax.device_get) pass, implicit ones raise.

XLA's guard sees both directions on a GPU or TPU. On the CPU backend it sees only host-to-device
transfers (a numpy batch handed to the jitted step, a Python number turned into a device array):
a CPU device array already lives in host memory, so float(x) or np.asarray(x) copies nothing and
the guard is never asked. `no_implicit_transfers` adds a stand-in for that half on the test's
thread: reading a device array's value (float, int, bool, formatting, tolist) outside
jax.device_get raises, and so does handing a device array to numpy in the trainer module (numpy
reads CPU arrays through the buffer protocol, which no Python hook sees).
"""

import contextlib
import json
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mochi_jax import demo
from mochi_jax.configs import lora as lora_config
from mochi_jax.lib import trainer
from mochi_jax.lib.validation import Validator

pytestmark = pytest.mark.usefixtures("shared_compilations")


class ImplicitTransfer(RuntimeError):
    """The CPU stand-in's error: a device array read on the host without jax.device_get."""


class _HostOnlyNumpy:
    """numpy for the trainer module: its functions refuse a device array (call `check` first)."""

    def __init__(self, check):
        self._check = check

    def __getattr__(self, name):
        attr = getattr(np, name)
        if not callable(attr) or isinstance(attr, type):
            return attr

        def call(*args, **kwargs):
            if any(isinstance(a, jax.Array) for a in (*args, *kwargs.values())):
                self._check(f"np.{name} of a device array")
            return attr(*args, **kwargs)

        return call


@contextlib.contextmanager
def no_implicit_transfers(monkeypatch):
    """XLA's transfer guard at 'disallow', plus the device-to-host stand-in for the CPU backend (see
    the module docstring), both for the calling thread only: grain's and orbax's threads are theirs."""
    thread, explicit = threading.get_ident(), threading.local()
    array_type = type(jnp.zeros(()))
    value = array_type._value  # the property behind float(x), int(x), bool(x), f"{x}", x.tolist()
    device_get = jax.device_get

    def check(what):
        if threading.get_ident() == thread and not getattr(explicit, "on", False):
            raise ImplicitTransfer(f"implicit device-to-host transfer: {what} outside jax.device_get")

    def guarded_value(x):
        check(f"the value of a device array {x.dtype}{list(x.shape)}")
        return value.fget(x)

    def explicit_get(tree):
        before = getattr(explicit, "on", False)
        explicit.on = True
        try:
            return device_get(tree)
        finally:
            explicit.on = before

    monkeypatch.setattr(array_type, "_value", property(guarded_value))
    monkeypatch.setattr(jax, "device_get", explicit_get)
    monkeypatch.setattr(trainer, "np", _HostOnlyNumpy(check))
    with jax.transfer_guard("disallow"):
        yield


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    """The demo's models, clips and cache, made once for this module."""
    root = tmp_path_factory.mktemp("demo")
    demo.ensure(lora_config.demo(lora_config.get_config(), str(root)))
    return root


@contextlib.contextmanager
def prepared_run(root, name, steps=3):
    """What trainer.train builds before its loop (set up outside the guard: loading is not the loop),
    for `steps` steps that all log; yields (run, validator, records)."""
    cfg = lora_config.demo(lora_config.get_config(), str(root))
    cfg.run_dir = str(Path(root) / name)
    cfg.steps, cfg.log_every = steps, 1
    cfg.checkpoint.every = steps
    cfg.validation.every = 0
    run = trainer.setup(cfg)
    validator = Validator(cfg, run.dit_cfg, run.heldout, run.targets, run.sweep)
    trainer.load_state(run)
    records = trainer.RunLog(run.run_dir, run.main).open(0)
    try:
        yield run, validator, records
    finally:
        records.close()
        run.manager.close()


@pytest.mark.slow
def test_training_steps_make_no_implicit_transfer(demo_root, monkeypatch):
    with prepared_run(demo_root, "guarded") as (run, validator, records):
        with no_implicit_transfers(monkeypatch):
            assert trainer.run_steps(run, validator, records)
    rows = [json.loads(x) for x in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(isinstance(r[k], float) and np.isfinite(r[k]) for r in rows for k in ("loss", "grad_norm", "lr"))
    assert (run.run_dir / "checkpoints" / "3").is_dir()


def test_the_guard_sees_a_batch_left_on_the_host(demo_root, monkeypatch):
    """The check can fail: a numpy batch handed to the jitted step is an implicit host-to-device
    transfer (what the loop would do without placing its batches)."""
    with prepared_run(demo_root, "host_batch") as (run, validator, records):
        with no_implicit_transfers(monkeypatch):
            monkeypatch.setattr(jax, "make_array_from_process_local_data", lambda sharding, x: x)
            with pytest.raises(Exception, match="Disallowed host-to-device transfer"):
                trainer.run_steps(run, validator, records)


def test_the_guard_sees_metrics_read_without_device_get(demo_root, monkeypatch):
    """The check can fail: the step's metrics read on the host without jax.device_get are an implicit
    device-to-host transfer, on CPU too."""
    with prepared_run(demo_root, "implicit_read") as (run, validator, records):
        with no_implicit_transfers(monkeypatch):
            fetch = jax.device_get
            monkeypatch.setattr(jax, "device_get", lambda tree: tree if isinstance(tree, dict) else fetch(tree))
            with pytest.raises(ImplicitTransfer, match="np.atleast_1d of a device array"):
                trainer.run_steps(run, validator, records)
