"""The sharded training step on an 8-device CPU mesh (tests/harness/sharded_checks.py runs in a subprocess,
because the device count must be set before jax starts): equal to one device for data, FSDP and
sequence parallelism, uneven token splits, per-device parameter memory falling as 1/fsdp, and
checkpoints restored onto other meshes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every test here reads one 8-device harness run (tens of seconds)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def results():
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "harness" / "sharded_checks.py")], capture_output=True, text=True,
                       timeout=1200, cwd=ROOT)
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    assert r.returncode == 0 and line, r.stdout[-3000:] + r.stderr[-5000:]
    return json.loads(line[0][len("RESULT "):])


@pytest.mark.parametrize("mesh", ["data8", "data2_fsdp4", "fsdp2_seq4", "data2_seq4"])
def test_sharded_step_equals_one_device(results, mesh):
    single, got = results["single"], results[mesh]
    for a, b in zip(got["loss"], single["loss"]):
        assert abs(a - b) <= 1e-5 * abs(b), (mesh, got["loss"], single["loss"])
    for a, b in zip(got["grad_norm"], single["grad_norm"]):
        assert abs(a - b) <= 1e-5 * abs(b), (mesh, got["grad_norm"], single["grad_norm"])
    assert got["lora_rel"] < 1e-5, got
    if "fsdp" in mesh:  # LoRA factors are sharded like the kernels they adapt
        assert "fsdp" in got["lora_kernel_sharding"]


def test_uneven_sequence_split_is_exact_and_bad_heads_are_refused(results):
    single, sharded = results["uneven"]["loss"]
    assert abs(single - sharded) <= 1e-5 * abs(single) and results["uneven"]["lora_rel"] < 1e-5
    assert "attention heads: 4 is not divisible" in results["heads_error"]


def test_parameter_memory_falls_with_fsdp(results):
    mem = {int(k): v for k, v in results["memory"].items()}
    full = mem[1]["param_bytes"]
    for f in (2, 4, 8):
        shard = mem[f]["param_shard_bytes"]
        assert shard <= full / f * 1.2, (f, shard, full)  # small replicated leaves (norms, biases) aside
        assert mem[f]["argument_bytes"] < mem[f // 2]["argument_bytes"] * 0.7, mem


def test_checkpoint_restores_on_another_mesh(results):
    for name, r in results["restore"].items():
        assert r == {"equal": True, "placed": True}, (name, r)
