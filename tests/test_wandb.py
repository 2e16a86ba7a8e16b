"""Weights & Biases logging (configs/lora.py `wandb`): the trainer's records go to a wandb run as well,
read back here from wandb's own offline file (WANDB_MODE=offline, nothing leaves the machine): the
scalars at their steps, the validation videos, the config; the run's wandb id is kept in the run
directory, so a resumed run continues the same wandb run; wandb enabled but not installed is refused
in one line, exit status 2, before anything is written."""

import json
import os
import signal
import struct
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mochi_jax import cli, demo, train
from mochi_jax.configs import lora as lora_config
from mochi_jax.lib import plots, trainer, training
from mochi_jax.lib.video import write_mp4

pytestmark = pytest.mark.usefixtures("shared_compilations")


def _records(path: Path) -> list:
    """The records of a .wandb file: wandb's log format (a 7-byte header ':W&B', 0xBEE1, version; then
    32 KiB blocks of chunks, each crc32 (4 bytes), length (2), type (1: whole, 2 / 3 / 4: first /
    middle / last part) and data), each record a wandb_internal_pb2.Record."""
    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1, path
    pos, block, out, parts = 7, 32768, [], b""
    while pos < len(data):
        left = block - pos % block
        if left < 7:  # too short for a chunk header: padding to the next block
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zeros: the rest of the block is padding
            pos += left
            continue
        body, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            out.append(body)
        elif kind == 2:
            parts = body
        elif kind == 3:
            parts += body
        else:
            out.append(parts + body)
    proto = pytest.importorskip("wandb.proto.wandb_internal_pb2")  # wandb's own record format
    return [proto.Record.FromString(b) for b in out]


def _offline_runs(wandb_dir: Path, timeout: float = 60.0) -> list[Path]:
    """The offline runs in `wandb_dir`, in launch order, once each one's file is complete: wandb's
    service writes it on after finish() returns, up to the run's exit record."""
    t0 = time.time()
    while True:
        runs = sorted((wandb_dir / "wandb").glob("offline-run-*"))
        files = [next(iter(run.glob("run-*.wandb")), None) for run in runs]
        if all(f is not None and any(r.WhichOneof("record_type") == "exit" for r in _records(f)) for f in files):
            return runs
        assert time.time() - t0 < timeout, f"an offline run of {wandb_dir} has no exit record"
        time.sleep(0.2)


def _history(run_folder: Path) -> list[dict]:
    """The history rows of an offline run: {key: value, '_step': step}, values JSON-decoded."""
    wandb_file, = run_folder.glob("run-*.wandb")
    return [{("/".join(i.nested_key) if i.nested_key else i.key): json.loads(i.value_json) for i in r.history.item}
            for r in _records(wandb_file) if r.WhichOneof("record_type") == "history"]


def _all(run_folder: Path, kind: str) -> list:
    """The records of one kind ('run', 'exit', 'preempting', ...) of an offline run."""
    wandb_file, = run_folder.glob("run-*.wandb")
    return [getattr(r, kind) for r in _records(wandb_file) if r.WhichOneof("record_type") == kind]


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


def test_run_log_rows_and_videos_go_to_the_wandb_run_and_a_second_launch_continues_it(tmp_path, offline):
    """RunLog with a WandbMirror: every row's scalars at its step (training and validation rows of one
    step in one history row), the validation video as a wandb video under its tensorboard tag, the
    config; the wandb id in the run directory, reused by the next launch."""
    cfg = lora_config.get_config()
    cfg.wandb.enabled, cfg.wandb.tags = True, ["unit"]
    run_dir = tmp_path / "myrun"
    run_dir.mkdir()
    mirror = trainer.WandbMirror.start(trainer.wandb_module(cfg), cfg, run_dir)
    run_id = (run_dir / trainer.WANDB_ID).read_text().strip()
    log = trainer.RunLog(run_dir, prompts=["a red ball"], wandb=mirror).open(0)
    video = write_mp4(run_dir / "samples" / "step000002_prompt0_seed12345.mp4",
                      np.zeros((7, 48, 80, 3), np.uint8) + np.arange(7, dtype=np.uint8)[:, None, None, None] * 30)
    log.write(1, {"loss": 1.5, "grad_norm": 0.25, "lr": 1e-4})
    log.write(2, {"loss": 1.25, "grad_norm": 0.5, "lr": 2e-4, "variant/r4/loss": 1.0})
    log.videos(2, [str(video)])
    log.write(2, {"val_loss": 0.75, "val_loss/sigma_0.1": 0.5})
    log.close()
    mirror.finish(0)

    folder, = _offline_runs(offline)
    assert folder.name.endswith(f"-{run_id}")
    run, = _all(folder, "run")
    assert run.run_id == run_id and run.project == "mochi_jax" and run.display_name == "myrun"
    assert list(run.tags) == ["unit"]
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["steps"] == 2000 and config["wandb"]["enabled"] is True and config["lora"]["qkv"]["rank"] == 16
    rows = _history(folder)
    assert [r["_step"] for r in rows] == [1, 2]
    assert {k: rows[0][k] for k in ("loss", "grad_norm", "lr")} == {"loss": 1.5, "grad_norm": 0.25, "lr": 1e-4}
    assert rows[1]["loss"] == 1.25 and rows[1]["variant/r4/loss"] == 1.0 and rows[1]["val_loss"] == 0.75
    assert rows[1]["val_loss/sigma_0.1"] == 0.5
    tag = "val_video/0_a_red_ball"
    assert rows[1][f"{tag}/_type"] == "video-file" and rows[1][f"{tag}/caption"] == "a red ball"
    assert (folder / "files" / rows[1][f"{tag}/path"]).stat().st_size == video.stat().st_size
    assert [e.exit_code for e in _all(folder, "exit")] == [0]

    # the next launch of the run: the same wandb run id; a stop marks it preempted, exit code 75
    mirror = trainer.WandbMirror.start(trainer.wandb_module(cfg), cfg, run_dir)
    assert (run_dir / trainer.WANDB_ID).read_text().strip() == run_id
    log = trainer.RunLog(run_dir, prompts=["a red ball"], wandb=mirror).open(2)
    log.write(3, {"loss": 1.0})
    log.close()
    mirror.finish(trainer.Stopped.exit_status, stopped=True)
    first, second = _offline_runs(offline)
    assert first == folder and second.name.endswith(f"-{run_id}")
    assert _all(second, "run")[0].run_id == run_id
    assert [(r["_step"], r["loss"]) for r in _history(second)] == [(3, 1.0)]
    assert len(_all(second, "preempting")) == 1 and [e.exit_code for e in _all(second, "exit")] == [75]


def test_enabled_without_wandb_installed_is_one_line_and_exit_status_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails as when it is not installed
    cfg = lora_config.get_config()
    cfg.run_dir = str(tmp_path / "run")
    cfg.wandb.enabled = True
    with pytest.raises(ValueError) as e:
        train.train(cfg)
    assert cli.fail("mochi_jax.train", e.value) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mochi_jax.train: wandb.enabled is set but wandb cannot be "
                                                   "imported"), err
    assert "pip install -e '.[wandb]'" in err and "--config.wandb.enabled=False" in err
    assert not (tmp_path / "run").exists()  # nothing written
    cfg.wandb.enabled = False  # off: wandb is never imported
    assert trainer.wandb_module(cfg) is None


def test_an_unknown_wandb_mode_is_refused_at_once(tmp_path):
    cfg = lora_config.get_config()
    cfg.run_dir = str(tmp_path / "run")
    cfg.wandb.enabled, cfg.wandb.mode = True, "ofline"
    with pytest.raises(ValueError, match=r"^wandb.mode = 'ofline': choose online, offline, disabled or ''"):
        train.train(cfg)
    assert not (tmp_path / "run").exists()


def _signal_at_step(monkeypatch, n: int):
    """SIGTERM arrives while step n runs (the run finishes the step, saves it and stops)."""
    make = training.make_train_step

    def make_signalled(*args, **kwargs):
        step_fn = make(*args, **kwargs)

        def step(state, params, batch):
            if int(state["step"]) + 1 == n:
                os.kill(os.getpid(), signal.SIGTERM)
            return step_fn(state, params, batch)
        return step
    monkeypatch.setattr(training, "make_train_step", make_signalled)


@pytest.mark.slow
def test_a_training_run_logs_to_wandb_and_its_resume_continues_the_same_wandb_run(tmp_path_factory, offline,
                                                                                   monkeypatch):
    """The demo for 4 steps, stopped by SIGTERM in step 3 and resumed: both launches log to the one
    wandb run (two offline folders of one id), the loss at every step, the validation loss and video
    at step 4; the stopped launch ends preempted (exit code 75), the resumed one done (0)."""
    root = tmp_path_factory.mktemp("demo")
    cfg = lora_config.demo(lora_config.get_config(), str(root))
    cfg.run_dir = str(root / "run")
    cfg.steps, cfg.log_every = 4, 1
    cfg.checkpoint.every = 2
    cfg.validation.every = 4
    cfg.validation.sampling.update(dict(num_frames=7, steps=2))
    cfg.wandb.enabled = True
    demo.ensure(cfg)
    with monkeypatch.context() as m:
        _signal_at_step(m, 3)
        with pytest.raises(trainer.Stopped):
            train.train(cfg)
    run_id = (Path(cfg.run_dir) / trainer.WANDB_ID).read_text().strip()
    train.train(cfg)
    assert (Path(cfg.run_dir) / trainer.WANDB_ID).read_text().strip() == run_id
    first, second = _offline_runs(offline)
    assert [_all(f, "run")[0].run_id for f in (first, second)] == [run_id, run_id]
    assert _all(first, "run")[0].display_name == "run"
    assert [r["_step"] for r in _history(first) if "loss" in r] == [1, 2, 3]
    assert [e.exit_code for e in _all(first, "exit")] == [75] and _all(first, "preempting")
    rows = _history(second)
    assert [r["_step"] for r in rows if "loss" in r] == [4]
    last = rows[-1]
    assert last["_step"] == 4 and np.isfinite(last["val_loss"])
    tag = plots.video_tag("samples/step000004_prompt0_seed12345.mp4", cfg.validation.prompts)
    assert last[f"{tag}/_type"] == "video-file" and (second / "files" / last[f"{tag}/path"]).is_file()
    assert [e.exit_code for e in _all(second, "exit")] == [0]
    metrics = [json.loads(x) for x in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    logged = {(r["_step"], k): v for f in (first, second) for r in _history(f) for k, v in r.items()
              if not k.startswith("_") and not k.startswith("val_video/")}
    assert logged == {(r["step"], k): v for r in metrics for k, v in r.items() if k != "step"}  # the same scalars
