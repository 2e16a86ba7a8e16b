"""`sample` and `evaluate` over two processes, simulated: two processes on this machine join through
jax.distributed (gloo collectives on CPU), 2 devices each, one mesh over all four; process 0 alone
writes, and the files equal those of one process."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest

import eval_ref
from mochi_jax.demo import write_demo_clip, write_demo_models

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "tests" / "harness" / "multihost_sample_check.py"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost_sample")
    write_demo_models(root / "models")
    write_demo_clip(root / "clip", root / "clip_tokenizer")
    (root / "prompts.txt").write_text("a red ball bounces\na blue square slides\n")
    eval_ref.genmo_file(root / "a.safetensors", 1)
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run(command, root, outs, term_at=None, status=0):
    """Run `command` in len(outs) processes, process i writing to outs[i]; with `term_at`, process 1
    gets SIGTERM as its term_at-th denoising call starts."""
    port = _free_port()
    env = dict(os.environ, TERM_AT=str(term_at or ""))
    procs = [subprocess.Popen([sys.executable, str(HARNESS), command, str(i), str(len(outs)), str(port),
                               str(root / "models"), str(out), str(root)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env) for i, out in enumerate(outs)]
    try:
        logs = [p.communicate(timeout=900)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == status, log[-5000:]
    if status == 0:
        assert f"of {len(outs)} with {2 * len(outs)} devices: done" in logs[0], logs[0][-3000:]
    return logs


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def _same_frames(a: Path, b: Path):
    """Two mp4s of the same video, up to a rounding flip of one uint8 level in a few pixels before encoding."""
    x, y = iio.imread(a).astype(int), iio.imread(b).astype(int)
    assert x.shape == y.shape
    assert np.abs(x - y).mean() < 0.5, (a, np.abs(x - y).mean())


@pytest.mark.slow
def test_sample_over_two_processes_writes_each_video_once_as_one_process(root):
    one, two, other = root / "sample_one", root / "sample_two", root / "sample_two_p1"
    _run("sample", root, [one])
    logs = _run("sample", root, [two, other])
    assert "mesh {'fsdp': 4}" in logs[0]
    assert _files(two) == _files(one) == ["a_red_ball_seed12345.mp4", "a_red_ball_seed12346.mp4"]
    assert _files(other) == []  # process 1 writes nothing
    for name in _files(one):
        _same_frames(one / name, two / name)


@pytest.mark.slow
def test_evaluate_over_two_processes_writes_one_report_as_one_process(root):
    """... also when SIGTERM reaches one process mid-run: both stop before the next batch (status 75),
    and the rerun renders only the batches left."""
    one, two, other = root / "eval_one", root / "eval_two", root / "eval_two_p1"
    _run("evaluate", root, [one])
    logs = _run("evaluate", root, [two, other], term_at=2, status=75)  # 4 batches: 2 prompts x 2 seeds
    assert "PROCESS 1: stopped by SIGTERM with 2 of 4 batches rendered" in logs[1], logs[1][-3000:]
    assert "PROCESS 0: stopped by SIGTERM on another process with 2 of 4 batches rendered" in logs[0], logs[0][-3000:]
    assert len(list((two / ".parts").glob("*.npz"))) == 2 and not (two / "report.json").exists()
    logs = _run("evaluate", root, [two, other])
    assert "2 of 4 batches already rendered" in logs[0]
    assert _files(other) == []
    assert _files(two) == _files(one)
    a, b = (json.loads((d / "report.json").read_text()) for d in (one, two))
    assert [r["video"] for r in a["videos"]] == [r["video"] for r in b["videos"]]
    for x, y in zip(a["videos"], b["videos"]):
        for k, v in x["metrics"].items():
            assert y["metrics"][k] == pytest.approx(v, abs=2e-3), (x["video"], k)
    for r in a["videos"]:
        _same_frames(one / r["video"], two / r["video"])
