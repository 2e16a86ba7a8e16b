"""The sharded training step on an 8-device CPU mesh (tests/harness/sharded_checks.py runs in a subprocess,
because the device count must be set before jax starts): two steps equal one device's for data (data 8),
data x FSDP (data 2 x fsdp 4) and sequence parallelism (fsdp 2 x sequence 4, whose 4 devices split the
clips' 18 visual tokens unevenly, and data 4 x sequence 2, which splits them evenly); heads the mesh does
not divide are refused; per-device parameter memory of the compiled step falls as 1/fsdp (fsdp 1, 2, 4
and 8: the steps run above and fsdp 8 alone); checkpoints restore onto other meshes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every test here reads one 8-device harness run (about a minute)

ROOT = Path(__file__).resolve().parents[1]
MESHES = ["data8", "data2_fsdp4", "fsdp2_seq4", "data4_seq2"]


@pytest.fixture(scope="module")
def results():
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "harness" / "sharded_checks.py")], capture_output=True, text=True,
                       timeout=1200, cwd=ROOT)
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    assert r.returncode == 0 and line, r.stdout[-3000:] + r.stderr[-5000:]
    return json.loads(line[0][len("RESULT "):])


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_step_equals_one_device(results, mesh):
    single, got = results["single"], results[mesh]
    assert len(got["loss"]) == len(single["loss"]) == 2, (got, single)  # two steps: the optimizer's update counts
    for a, b in zip(got["loss"], single["loss"]):
        assert abs(a - b) <= 1e-5 * abs(b), (mesh, got["loss"], single["loss"])
    for a, b in zip(got["grad_norm"], single["grad_norm"]):
        assert abs(a - b) <= 1e-5 * abs(b), (mesh, got["grad_norm"], single["grad_norm"])
    assert got["lora_rel"] < 1e-5, got
    if "fsdp" in mesh:  # LoRA factors are sharded like the kernels they adapt
        assert "fsdp" in got["lora_kernel_sharding"]


def test_uneven_sequence_split_is_exact_and_bad_heads_are_refused(results):
    # the equality itself is test_sharded_step_equals_one_device's; here: the splits are what they claim
    uneven, even = results["fsdp2_seq4"], results["data4_seq2"]
    assert uneven["sequence"] == 4 and uneven["tokens"] % 4, uneven  # 18 tokens over 4 devices: padded
    assert even["sequence"] == 2 and even["tokens"] % 2 == 0, even
    for got in (uneven, even):
        assert abs(got["loss"][0] - results["single"]["loss"][0]) <= 1e-5 * abs(results["single"]["loss"][0])
        assert got["lora_rel"] < 1e-5, got
    assert "attention heads: 4 is not divisible" in results["heads_error"]


def test_parameter_memory_falls_with_fsdp(results):
    mem = {int(k): v for k, v in results["memory"].items()}
    assert sorted(mem) == [1, 2, 4, 8] and all(mem[f]["fsdp"] == f for f in mem), mem
    # the programs of the steps that ran are the ones measured (no compile of their own)
    assert all(mem[f]["compiled_again"] == 0 for f in mem if mem[f]["mesh"] != "fsdp8"), mem
    full = mem[1]["param_bytes"]
    # a device's step arguments other than its slice of the batch (which the non-fsdp axes size): the
    # frozen DiT, the LoRA and its optimizer state
    state = {f: mem[f]["argument_bytes"] - mem[f]["batch_shard_bytes"] for f in mem}
    assert state[1] > full, mem
    for f in (2, 4, 8):
        shard = mem[f]["param_shard_bytes"]
        assert shard <= full / f * 1.2, (f, shard, full)  # small replicated leaves (norms, biases) aside
        assert state[f] < state[f // 2] * 0.7, mem


def test_checkpoint_restores_on_another_mesh(results):
    assert sorted(results["restore"]) == ["fsdp2_data4", "single"], results["restore"]
    for name, r in results["restore"].items():
        assert r == {"equal": True, "placed": True}, (name, r)
