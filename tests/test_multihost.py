"""Multi-host training, simulated: two processes on this machine join through jax.distributed
(gloo collectives on CPU), each reads its share of the clips, orbax writes one checkpoint from
both, process 0 writes metrics and the LoRA files, and the run resumes in 2-process mode."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from mochi_jax.configs import lora as lora_config
from dit_ref import lora_delta64
from mochi_jax import demo
from mochi_jax.checkpoints import runs
from mochi_jax.checkpoints import lora_read

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run_two(demo_root, run_dir, steps, *extra, status=0):
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "harness" / "multihost_check.py"), str(i), str(port),
                               str(demo_root), str(run_dir), str(steps), *map(str, extra)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == status, out[-5000:]
    return outs


@pytest.mark.slow
def test_two_processes_train_checkpoint_and_resume(tmp_path):
    root = tmp_path / "demo"
    demo.ensure(lora_config.demo(lora_config.get_config(), str(root)))
    run = tmp_path / "run"
    # SIGTERM reaches process 1 alone during set-up: both processes finish setting up, then stop
    # before the first step with Stopped's status 75 (rather than process 1 leaving the other to wait)
    outs = _run_two(root, run, 4, 0, status=75)
    assert "PROCESS 1: stopped by SIGTERM before any new step" in outs[1], outs[1][-3000:]
    assert "PROCESS 0: stopped by SIGTERM on another process before any new step" in outs[0], outs[0][-3000:]
    assert not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text().strip()
    # SIGTERM reaches process 1 alone, after it saved step 2: both processes stop after the same step
    # (the next one), save it together and exit with Stopped's status 75
    outs = _run_two(root, run, 4, 2, status=75)
    assert "mesh {'data': 4" in outs[0] and "2 process(es)" in outs[0]
    assert "PROCESS 1: stopped by SIGTERM after step 3" in outs[1], outs[1][-3000:]
    assert "PROCESS 0: stopped by SIGTERM on another process after step 3" in outs[0], outs[0][-3000:]
    outs = _run_two(root, run, steps=4)  # resumes from step 3 in 2-process mode
    assert all("with 4 devices: done" in o for o in outs)
    assert "resumed from" in outs[0] and "at step 3" in outs[0]

    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]  # process 0 alone writes, once per step
    assert all(np.isfinite(x["loss"]) for x in lines)
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [2, 3, 4]
    # the checkpoint written by two processes restores in this single-device process and equals
    # the LoRA file process 0 exported from the gathered factors
    factors, targets = runs.load_run_lora(run)
    exported, exp_targets, _ = lora_read.load_lora(run / "lora.safetensors", depth=3)
    for path in [("blocks", "attn", "qkv_x"), ("last_block", "attn", "proj_x")]:
        d = lora_delta64(factors, targets, path)
        assert np.abs(d).max() > 0  # trained
        np.testing.assert_allclose(lora_delta64(exported, exp_targets, path), d, rtol=1e-6, atol=1e-9)
    assert jax.process_count() == 1
