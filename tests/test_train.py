"""The training loop end to end on the demo: outputs, exact resume after SIGKILL and SIGTERM,
records that read as one run after a kill (metrics, tensorboard, the end-of-run validation and
export), half-deleted checkpoints, LoRA targets the files cannot hold, stopping on non-finite losses."""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file
from tensorboardX.proto import event_pb2

from mochi_jax.configs import lora as lora_config
from dit_ref import lora_delta64
from wandb_records import all_of, history, offline_runs
from mochi_jax import cli, demo, train
from mochi_jax.aot import fit
from mochi_jax.checkpoints import dit_config, runs
from mochi_jax.checkpoints import lora_read, lora_write
from mochi_jax.lib import plots, trainer, training
from mochi_jax.lib.validation import Validator
from mochi_jax.models import lora as lora_lib
from mochi_jax.models import sharding
from mochi_jax.models.dit import abstract_variables

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("shared_compilations")


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    """The demo's models, clips and cache, made once for this module."""
    root = tmp_path_factory.mktemp("demo")
    demo.ensure(lora_config.demo(lora_config.get_config(), str(root)))
    return root


def _cfg(root, run, **kw):
    cfg = lora_config.demo(lora_config.get_config(), str(root))
    cfg.run_dir = str(Path(root) / run)
    cfg.update(kw)
    return cfg


def _lora(run_dir):
    return jax.tree_util.tree_map(np.asarray, runs.load_run_lora(run_dir)[0])


def _rows(run_dir):
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _tensorboard(tb_dir) -> list[tuple[str, int]]:
    """(tag, step) of every scalar as TensorBoard shows them: the event files in name order, where
    a SessionLog.START event at step s (what SummaryWriter's purge_step writes) drops the events
    read so far at steps >= s."""
    seen = []
    for path in sorted(Path(tb_dir).iterdir()):
        data, i = path.read_bytes(), 0
        while i < len(data):  # TFRecords: length (uint64), its crc, the Event proto, its crc
            n = struct.unpack("<Q", data[i:i + 8])[0]
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                seen = [(tag, step) for tag, step in seen if step < event.step]
            seen += [(v.tag, event.step) for v in event.summary.value]
    return seen


class Killed(Exception):
    """Stands for a SIGKILL at a chosen point of an in-process run."""


def _raise_killed(*args, **kwargs):
    raise Killed


def _kill_before_step(monkeypatch, n: int):
    """The run is 'killed' when it starts step n: steps 1 .. n-1 are done and logged."""
    make = training.make_train_step

    def make_killable(*args, **kwargs):
        step_fn = make(*args, **kwargs)

        def step(state, params, batch):
            if int(state["step"]) + 1 == n:
                raise Killed
            return step_fn(state, params, batch)
        return step
    monkeypatch.setattr(training, "make_train_step", make_killable)


@pytest.mark.slow
def test_demo_run_leaves_checkpoint_metrics_lora_and_video(demo_root):
    clip, clip_tok = Path(demo_root) / "clip", Path(demo_root) / "clip_tokenizer"
    demo.write_demo_clip(clip, clip_tok)
    cfg = _cfg(demo_root, "full", steps=12, log_every=4)
    cfg.checkpoint.every = 6
    cfg.validation.every = 12
    cfg.validation.clip.checkpoint, cfg.validation.clip.tokenizer = str(clip), str(clip_tok)
    run = train.train(cfg)
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [6, 12]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if "loss" in x]
    assert [x["step"] for x in train_lines] == [4, 8, 12]
    assert all(np.isfinite(x["loss"]) and x["lr"] > 0 and x["steps_per_s"] > 0 for x in train_lines)
    val = [x for x in lines if "val_loss" in x]
    assert len(val) == 1 and val[0]["step"] == 12
    assert set(val[0]) >= {"val_loss", "val_loss/sigma_0.1", "val_loss/sigma_0.9", "val/clip_t",
                           "val/consecutive_consistency", "val/subject_consistency", "val/flicker"}
    assert all(np.isfinite(v) for v in val[0].values())
    assert any((run / "tensorboard").iterdir())
    videos = list((run / "samples").glob("step000012_*.mp4"))
    assert len(videos) == 1 and videos[0].stat().st_size > 0
    # the pictures: curves.png, and the validation video in tensorboard (a GIF, tagged by its prompt)
    from PIL import Image

    with Image.open(run / "curves.png") as im:
        assert im.format == "PNG" and im.width >= 600
    assert ("val_video/0_" + cfg.validation.prompts[0].lower().replace(" ", "_")[:48], 12) in \
        _tensorboard(run / "tensorboard")
    # the exported LoRA (genmo format, alpha folded) is the trained one
    factors, targets = runs.load_run_lora(run)
    loaded, loaded_targets, _ = lora_read.load_lora(run / "lora.safetensors", depth=3)
    for path in [("blocks", "attn", "qkv_x"), ("last_block", "attn", "proj_x")]:
        np.testing.assert_allclose(lora_delta64(loaded, loaded_targets, path), lora_delta64(factors, targets, path),
                                   rtol=1e-6, atol=1e-8)
    assert (run / "lora_diffusers.safetensors").is_file()


SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from mochi_jax.configs import lora as lora_config
    from mochi_jax import cli, train
    cfg = lora_config.demo(lora_config.get_config(), {demo!r})
    cfg.run_dir = {run!r}
    cfg.steps = {steps}
    cfg.log_every = 1
    cfg.checkpoint.every = 3
    cfg.validation.every = 0
    try:
        train.train(cfg)
    except Exception as e:
        sys.exit(cli.fail("mochi_jax.train", e))  # as the command ends
""")


def _launch(demo_root, run, steps):
    script = SCRIPT.format(root=str(ROOT), demo=str(demo_root), run=str(Path(demo_root) / run), steps=steps)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for_checkpoint(run_dir: Path, proc, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        ckpts = run_dir / "checkpoints"
        if ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir()):
            return
        if proc.poll() is not None:
            raise AssertionError("training finished before it could be interrupted:\n" + proc.stdout.read())
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_interrupted_run_resumes_bit_for_bit(demo_root, sig):
    steps = 30
    straight = _launch(demo_root, "straight", steps)
    out, _ = straight.communicate(timeout=600)
    assert straight.returncode == 0, out

    name = f"interrupted_{sig.name}"
    proc = _launch(demo_root, name, steps)
    _wait_for_checkpoint(Path(demo_root) / name, proc)
    proc.send_signal(sig)
    out1, _ = proc.communicate(timeout=300)
    if sig == signal.SIGTERM:
        assert proc.returncode == trainer.Stopped.exit_status and "which is saved" in out1, out1
    else:
        assert proc.returncode == -signal.SIGKILL
    resumed = _launch(demo_root, name, steps)
    out2, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out2
    assert "resumed from" in out2, out2
    a, b = _lora(Path(demo_root) / "straight"), _lora(Path(demo_root) / name)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
    # the records read as one run: every step logged once, here and in tensorboard
    assert [x["step"] for x in _rows(Path(demo_root) / name)] == list(range(1, steps + 1))
    assert sorted(step for tag, step in _tensorboard(Path(demo_root) / name / "tensorboard")
                  if tag == "loss") == list(range(1, steps + 1))


def test_resumed_run_logs_read_as_one_run(demo_root, monkeypatch):
    """Steps logged after the last checkpoint by a killed run are logged again by the resumed one:
    metrics.jsonl and tensorboard keep one row per step (the torn last line of the kill too)."""
    cfg = _cfg(demo_root, "relog", steps=6, log_every=1)
    cfg.checkpoint.every = 4
    cfg.validation.every = 0
    with monkeypatch.context() as m:
        _kill_before_step(m, 6)
        with pytest.raises(Killed):
            train.train(cfg)
    run = Path(cfg.run_dir)
    assert runs.complete_steps(run / "checkpoints") == [4]
    assert [x["step"] for x in _rows(run)] == [1, 2, 3, 4, 5]
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # the kill came in the middle of a line
    train.train(cfg)
    rows = _rows(run)
    assert [x["step"] for x in rows] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(x["loss"]) for x in rows)
    scalars = _tensorboard(run / "tensorboard")
    assert len(list((run / "tensorboard").iterdir())) == 2  # one event file per launch
    assert len(scalars) == len(set(scalars)), sorted(scalars)
    assert sorted(step for tag, step in scalars if tag == "loss") == [1, 2, 3, 4, 5, 6]


def test_run_log_drops_an_unfinished_validation_of_the_restored_step(tmp_path):
    """A kill after the validation of a checkpoint's step wrote its row but before it was marked
    done: the resumed run validates that step again, so that row goes, the training row stays."""
    log = trainer.RunLog(tmp_path).open(0)
    for step in range(1, 7):
        log.write(step, {"loss": float(step)})
        if step in (2, 4):
            log.write(step, {"val_loss": 0.5, "val/clip_t": 0.25})
            if step == 2:
                log.mark_validated(step)
    log.close()
    log = trainer.RunLog(tmp_path)
    assert log.validated(2) and not log.validated(4)
    log.open(4, redo_validation=True)
    log.write(4, {"val_loss": 0.75})
    log.mark_validated(4)
    log.close()
    assert _rows(tmp_path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0},
                               {"step": 2, "val_loss": 0.5, "val/clip_t": 0.25}, {"step": 3, "loss": 3.0},
                               {"step": 4, "loss": 4.0}, {"step": 4, "val_loss": 0.75}]
    assert sorted(_tensorboard(tmp_path / "tensorboard")) == sorted(
        [("loss", s) for s in (1, 2, 3, 4)] + [("val_loss", 2), ("val/clip_t", 2), ("val_loss", 4)])
    assert json.loads((tmp_path / "progress.json").read_text()) == {"validated": [2, 4]}


def test_damaged_run_records_are_dropped_or_rebuilt_with_a_line_naming_the_file(tmp_path, capsys):
    """A non-UTF-8 or torn last line of metrics.jsonl is dropped, a truncated progress.json rebuilt
    (its only use: not validating the resumed step twice), each named in one line; the resume goes on."""
    log = trainer.RunLog(tmp_path).open(0)
    for step in (1, 2):
        log.write(step, {"loss": float(step)})
    log.write(2, {"val_loss": 0.5})
    log.mark_validated(2)
    log.close()
    with open(tmp_path / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 3, "loss": \xff\xfe}\n{"step": 3, "lo')
    (tmp_path / "progress.json").write_text('{"validated": [')
    capsys.readouterr()
    log = trainer.RunLog(tmp_path)
    assert not log.validated(2)
    log.open(2, redo_validation=True).close()
    out = capsys.readouterr().out
    assert f"{tmp_path / 'progress.json'} is damaged; it is rebuilt" in out, out
    assert f"{tmp_path / 'metrics.jsonl'}: 2 damaged lines (torn by a kill?) dropped" in out, out
    assert _rows(tmp_path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}]
    assert json.loads((tmp_path / "progress.json").read_text()) == {"validated": []}


def test_end_of_run_work_is_redone_after_a_kill(demo_root, monkeypatch, capsys):
    """Killed after the final checkpoint, during the final validation: the resumed run renders the
    videos and logs the validation loss; killed again before the LoRA export: the next run writes
    the LoRA files without validating a second time."""
    cfg = _cfg(demo_root, "endwork", steps=2, log_every=1)
    cfg.checkpoint.every = 2
    cfg.validation.every = 2
    cfg.validation.sampling.update(dict(num_frames=7, steps=2))
    run = Path(cfg.run_dir)
    with monkeypatch.context() as m:
        m.setattr(Validator, "videos", _raise_killed)
        with pytest.raises(Killed):
            train.train(cfg)
    assert runs.complete_steps(run / "checkpoints") == [2]
    assert not list(run.glob("samples/*.mp4")) and not [x for x in _rows(run) if "val_loss" in x]

    with monkeypatch.context() as m:
        m.setattr(trainer, "export", _raise_killed)
        with pytest.raises(Killed):
            train.train(cfg)
    assert "validation after this checkpoint did not finish" in capsys.readouterr().out
    video, = run.glob("samples/step000002_*.mp4")
    rendered = video.stat().st_mtime_ns
    assert [x["step"] for x in _rows(run) if "val_loss" in x] == [2]
    assert not (run / "lora.safetensors").exists()

    calls = []
    with monkeypatch.context() as m:
        call = Validator.__call__
        m.setattr(Validator, "__call__", lambda self, *a: calls.append(a[0]) or call(self, *a))
        train.train(cfg)
    assert calls == [] and video.stat().st_mtime_ns == rendered
    assert (run / "lora.safetensors").is_file() and (run / "lora_diffusers.safetensors").is_file()
    assert [(x["step"], "val_loss" in x) for x in _rows(run)] == [(1, False), (2, False), (2, True)]
    assert sorted(step for tag, step in _tensorboard(run / "tensorboard") if tag == "val_loss") == [2]


def test_resume_passes_over_a_half_deleted_checkpoint(demo_root, capsys):
    """A kill during orbax's clean-up of an old checkpoint leaves a step folder without its
    metadata, which orbax still lists: the run resumes from the newest complete checkpoint, says
    so, and removes the leftovers (orbax's temporary folders too)."""
    cfg = _cfg(demo_root, "halfdeleted", steps=4, log_every=1)
    cfg.checkpoint.every = 2
    cfg.validation.every = 0
    run = Path(train.train(cfg))
    ckpts = run / "checkpoints"
    (ckpts / "4" / runs.COMPLETE_MARKER).unlink()
    shutil.copytree(ckpts / "2", ckpts / "4.orbax-checkpoint-tmp-1795975061")
    capsys.readouterr()
    train.train(cfg)
    out = capsys.readouterr().out
    assert "checkpoint step 4 in" in out and "resuming from step 2, the newest complete checkpoint" in out, out
    assert f"resumed from {ckpts} at step 2" in out, out
    assert sorted(p.name for p in ckpts.iterdir()) == ["2", "4"] and runs.complete_steps(ckpts) == [2, 4]
    assert [x["step"] for x in _rows(run)] == [1, 2, 3, 4]


@pytest.mark.parametrize("pattern", ["final_layer/linear", "t5_yproj", "x_embedder"])
def test_targets_the_lora_files_cannot_hold_are_refused_before_training(demo_root, pattern):
    cfg = _cfg(demo_root, "unwritable", steps=1)
    cfg.validation.every = 0
    cfg.lora.extra = dict(pattern=pattern, rank=2, alpha=2.0)
    with pytest.raises(ValueError) as e:
        train.train(cfg)
    msg = str(e.value)
    assert msg.startswith(f"LoRA target 'extra' (pattern '{pattern}') adapts {pattern}, which neither LoRA file"), msg
    assert "genmo / ComfyUI lora.safetensors and diffusers" in msg and "--config.lora.extra.rank=0" in msg
    assert "\n" not in msg
    assert not runs.complete_steps(Path(cfg.run_dir) / "checkpoints")


def test_visual_only_lora_is_exported(demo_root):
    """No *_y layers: the genmo file gets the zero qkv_y / proj_y adapters genmo's loader expects,
    sized from the DiT config."""
    cfg = _cfg(demo_root, "visual_only", steps=3)  # the first update has warmup's lr 0: b is still zero
    cfg.validation.every = 0
    cfg.lora.qkv.pattern, cfg.lora.out.pattern = "attn/qkv_x$", "attn/proj_x$"
    run = train.train(cfg)
    factors, targets = runs.load_run_lora(run)
    for name in ("lora.safetensors", "lora_diffusers.safetensors"):
        loaded, loaded_targets, _ = lora_read.load_lora(run / name, depth=3)
        for path in [("blocks", "attn", "qkv_x"), ("last_block", "attn", "proj_x")]:
            np.testing.assert_allclose(lora_delta64(loaded, loaded_targets, path),
                                       lora_delta64(factors, targets, path), rtol=1e-6, atol=1e-8)
    raw = load_file(str(run / "lora.safetensors"))  # the zero text-stream adapters are in the file (the
    assert not np.any(raw["blocks.0.attn.qkv_y.lora_B"])  # reader drops them again as adding nothing)


def test_exporters_take_the_dit_config(demo_root):
    """A LoRA on the last block only: its depth is not in the factors, the DiT config gives it."""
    dit_cfg = dit_config(str(Path(demo_root) / "models" / "dit"))
    targets = (lora_lib.LoraTarget(r"^last_block/attn/qkv_y$", rank=2, alpha=4.0),)
    rng = np.random.default_rng(0)
    tree = jax.tree_util.tree_map(lambda x: rng.standard_normal(x.shape).astype(np.float32),
                                  abstract_variables(dit_cfg, targets)["lora"])
    path = ("last_block", "attn", "qkv_y")
    for save in (lora_write.save_genmo, lora_write.save_diffusers):
        f = save(Path(demo_root) / f"last_only_{save.__name__}.safetensors", tree, targets, cfg=dit_cfg)
        loaded, loaded_targets, _ = lora_read.load_lora(f, cfg=dit_cfg)
        np.testing.assert_allclose(lora_delta64(loaded, loaded_targets, path), lora_delta64(tree, targets, path),
                                   rtol=1e-6, atol=1e-8)


def test_run_stops_after_repeated_non_finite_losses(demo_root, monkeypatch):
    cfg = _cfg(demo_root, "nan", steps=20, max_bad_steps=3)
    cfg.checkpoint.every = 2
    cfg.validation.every = 0
    cfg.optim.lr = 1e30  # the first update overflows the LoRA factors: every later loss is inf / nan
    with pytest.raises(trainer.Diverged, match="non-finite losses in a row") as e:
        train.train(cfg)
    assert cli.fail("mochi_jax.train", e.value) == 3  # one line, the status that means "diverged"
    run = Path(cfg.run_dir)
    factors, _ = runs.load_run_lora(run)  # the last checkpoint is intact and readable
    assert (run / "checkpoints").is_dir()


def test_existing_run_without_resume_is_refused(demo_root):
    cfg = _cfg(demo_root, "twice", steps=2)
    cfg.validation.every = 0
    train.train(cfg)
    cfg.resume = False
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train.train(cfg)


def test_the_fit_check_lowers_the_trainers_step(demo_root):
    """The fit check's train program for a config and the trainer's real step on its real inputs (the
    frozen base, the train state, a placed batch of the cache) lower to the same HLO text."""
    cfg = _cfg(demo_root, "hlo", steps=1)
    run = trainer.setup(cfg)
    trainer.load_state(run)
    batch = {k: jax.make_array_from_process_local_data(run.shardings["batch"][k], x)
             for k, x in next(run.loader).items()}
    with sharding.activate(run.mesh):
        real = run.step_fn.jitted.lower(run.state, run.params, batch).as_text()
    _, t, h, w = batch["mean"].shape[1:]
    program = fit.train_program(cfg, run.dit_cfg, jax.devices(), (6 * (t - 1) + 1, 8 * h, 8 * w),
                                batch["t5_feats"].shape[1])
    assert program.lower().as_text() == real


def _hold_lock(run_dir: Path) -> subprocess.Popen:
    """Another process holding the run directory's lock (as a trainer does)."""
    script = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); from mochi_jax.checkpoints import runs; "
              f"lock = runs.RunLock({str(run_dir)!r}).__enter__(); print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_trainer_on_a_run_is_refused_and_a_killed_ones_lock_is_not_stuck(demo_root):
    """While a trainer holds the run directory, another is refused with one line naming the holder
    and touches nothing; when the holder is SIGKILLed its lock goes with it."""
    cfg = _cfg(demo_root, "locked", steps=2)
    cfg.validation.every = 0
    run = Path(cfg.run_dir)
    run.mkdir()
    holder = _hold_lock(run)
    try:
        with pytest.raises(runs.RunInUse, match=f"{run} is in use by another trainer \\(process {holder.pid} on "):
            train.train(cfg)
        assert sorted(p.name for p in run.iterdir()) == [runs.LOCK_FILE]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    train.train(cfg)
    assert runs.complete_steps(run / "checkpoints") == [2]
    assert (run / runs.LOCK_FILE).read_text() == ""  # released: no holder named


def test_a_failed_start_leaves_no_run_directory_behind(demo_root):
    cfg = _cfg(demo_root, "failed_start", steps=2, batch_size=3)
    cfg.mesh.fsdp = 2  # one CPU device: refused at set-up
    with pytest.raises(ValueError):
        train.train(cfg)
    assert not Path(cfg.run_dir).exists()
    Path(cfg.run_dir).mkdir()  # a folder that was there before is left as it was
    (Path(cfg.run_dir) / "notes.txt").write_text("mine")
    with pytest.raises(ValueError):
        train.train(cfg)
    assert sorted(p.name for p in Path(cfg.run_dir).iterdir()) == ["notes.txt", runs.LOCK_FILE]


def _signal_at_step(monkeypatch, n: int, sig=signal.SIGTERM):
    """A stop signal arrives while step n runs."""
    make = training.make_train_step

    def make_signalled(*args, **kwargs):
        step_fn = make(*args, **kwargs)

        def step(state, params, batch):
            if int(state["step"]) + 1 == n:
                os.kill(os.getpid(), sig)
            return step_fn(state, params, batch)
        return step
    monkeypatch.setattr(training, "make_train_step", make_signalled)


def test_a_stop_signal_anywhere_saves_and_ends_with_the_rerun_status(demo_root, monkeypatch, capsys):
    """SIGTERM (or Ctrl-C's SIGINT) in a step: the step is finished and saved, and the run ends with
    Stopped (exit status 75, "rerun to continue"); SIGTERM during the validation a resume runs again
    stops at once with the same status; the next launch finishes the run, validation included."""
    cfg = _cfg(demo_root, "stopped", steps=4, log_every=1)
    cfg.checkpoint.every = 2
    cfg.validation.every = 2
    cfg.validation.prompts = []  # the held-out loss only: the same path, without videos
    run = Path(cfg.run_dir)
    with monkeypatch.context() as m:
        _signal_at_step(m, 3, signal.SIGINT)
        with pytest.raises(trainer.Stopped, match="stopped by SIGINT after step 3, which is saved") as e:
            train.train(cfg)
    assert cli.fail("mochi_jax.train", e.value) == 75
    assert runs.complete_steps(run / "checkpoints") == [2, 3]

    cfg.steps = 6
    call = Validator.__call__
    with monkeypatch.context() as m:  # killed during the validation of step 4 ...
        m.setattr(Validator, "__call__", lambda self, step, *a: _raise_killed() if step == 4 else call(self, step, *a))
        with pytest.raises(Killed):
            train.train(cfg)
    with monkeypatch.context() as m:  # ... and SIGTERM during its rerun after the resume
        m.setattr(Validator, "__call__", lambda *a: os.kill(os.getpid(), signal.SIGTERM))
        with pytest.raises(trainer.Stopped, match="stopped by SIGTERM before any new step"):
            train.train(cfg)
    assert runs.complete_steps(run / "checkpoints") == [2, 3, 4]
    capsys.readouterr()
    train.train(cfg)
    assert "validation after this checkpoint did not finish" in capsys.readouterr().out
    assert [x["step"] for x in _rows(run) if "val_loss" in x] == [2, 4, 6]
    assert [x["step"] for x in _rows(run) if "loss" in x] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_one_before_used(demo_root, damage, capsys):
    """Files truncated or missing inside the newest checkpoint (its metadata intact): the trainer
    resumes from the one before, moving the damaged one aside and naming it in one line; readers of
    the run's LoRA (sample, evaluate, tools/lora.py) read the one before too."""
    cfg = _cfg(demo_root, f"damaged_{damage}", steps=4, log_every=1)
    cfg.checkpoint.every = 2
    cfg.validation.every = 0
    run = Path(train.train(cfg))
    ckpts = run / "checkpoints"
    for f in (ckpts / "4" / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            os.truncate(f, f.stat().st_size // 2) if damage == "truncated" else f.unlink()
    if damage == "missing":
        (ckpts / "4" / "data" / "metadata").unlink()  # the loader's position too
    capsys.readouterr()
    factors, _ = runs.load_run_lora(run)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"checkpoint {ckpts / '4'} is damaged (" in err, err
    assert "TensorStore(" not in err
    with pytest.raises(ValueError, match=f"checkpoint {ckpts / '4'} is damaged"):
        runs.load_run_lora(run, step=4)

    cfg.steps = 6
    train.train(cfg)
    out = capsys.readouterr().out
    assert f"checkpoint {ckpts / '4'} is damaged (" in out and "moved to 4.damaged" in out, out
    assert f"resumed from {ckpts} at step 2" in out, out
    assert runs.complete_steps(ckpts)[-1] == 6 and (ckpts / "4.damaged").is_dir()
    assert [x["step"] for x in _rows(run)] == [1, 2, 3, 4, 5, 6]


def test_the_samplers_default_unconditional_branch_is_the_one_training_teaches(demo_root):
    """Caption dropout gives the DiT zero features and an all-False mask; sample, evaluate and the
    validation videos give it the same for their default (empty) negative prompt, so the guidance a
    LoRA trained here is sampled with uses the branch it learned. diffusers' T5("") stays a setting."""
    from mochi_jax.configs import eval as eval_config, sample as sample_config
    from mochi_jax.lib.text import TextEncoder

    text = TextEncoder.load(f"{demo_root}/models/t5", f"{demo_root}/models/tokenizer")
    feats, mask = text(["a red ball rolls", ""])
    batch = {"t5_feats": feats, "t5_mask": mask}
    trained = training.condition(batch, np.array([True, True]))  # both captions dropped
    for s in (sample_config.get_config().sampling, eval_config.get_config().sampling,
              lora_config.get_config().validation.sampling):
        assert s.negative_prompt == ""
        f, m = text([s.negative_prompt], zero_empty=s.zero_empty_negative)
        np.testing.assert_array_equal(f[0], trained[0][1])
        np.testing.assert_array_equal(m[0], trained[1][1])
    assert mask[1].any() and np.abs(feats[1]).max() > 0  # diffusers' encoding of "" is another branch


def test_a_full_disk_ends_the_run_with_one_line_and_no_partial_checkpoint(demo_root, small_disk, capfd):
    disk = small_disk(120)  # room for the records, not for a checkpoint
    cfg = _cfg(demo_root, "unused", steps=2, log_every=1)
    cfg.run_dir = str(disk / "run")
    cfg.validation.every = 0
    with pytest.raises(OSError) as e:
        train.train(cfg)
    assert cli.user_error(e.value) == f"{disk / 'run'}: No space left on device"
    assert not list((disk / "run" / "checkpoints").iterdir())
    printed = "".join(capfd.readouterr())
    assert "Traceback" not in printed and "ERROR:absl" not in printed, printed[-3000:]


def test_every_checkpoint_leaves_a_lora_file_pair_that_says_what_it_is(demo_root):
    """loras/<run>-step<N>.safetensors (genmo / ComfyUI) and .diffusers.safetensors at each
    checkpoint, the oldest beyond checkpoint.keep_loras removed; each holds that checkpoint's LoRA
    and metadata naming the base, the step and the targets; `<run>/checkpoints/<step>` reads as a LoRA."""
    cfg = _cfg(demo_root, "per_step", steps=6, log_every=1)
    cfg.checkpoint.every = 2
    cfg.checkpoint.keep_loras = 2
    cfg.validation.every = 0
    run = Path(train.train(cfg))
    assert sorted(p.name for p in (run / trainer.LORAS).iterdir()) == [
        "per_step-step000004.diffusers.safetensors", "per_step-step000004.safetensors",
        "per_step-step000006.diffusers.safetensors", "per_step-step000006.safetensors"]
    dit_cfg = dit_config(cfg.model)
    want, want_targets = runs.load_run_lora(run / "checkpoints" / "4")
    assert runs.complete_steps(run / "checkpoints") == [2, 4, 6]
    path = ("blocks", "attn", "qkv_x")
    for name in ("per_step-step000004.safetensors", "per_step-step000004.diffusers.safetensors"):
        loaded, targets, info = lora_read.load_lora(run / trainer.LORAS / name, cfg=dit_cfg)
        np.testing.assert_allclose(lora_delta64(loaded, targets, path), lora_delta64(want, want_targets, path),
                                   rtol=1e-6, atol=1e-8)
        assert info["about"]["step"] == 4 and info["about"]["base_model"] == cfg.model.dit
        assert info["about"]["targets"] == [dict(pattern=t.pattern, rank=t.rank, alpha=t.alpha) for t in want_targets]
    final, _ = runs.load_run_lora(run)
    assert not np.array_equal(final["blocks"]["attn"]["qkv_x"]["b"], want["blocks"]["attn"]["qkv_x"]["b"])


def test_the_logged_loss_is_the_mean_over_the_logging_interval(demo_root):
    every = _cfg(demo_root, "log_each", steps=6, log_every=1)
    every.validation.every = 0
    third = _cfg(demo_root, "log_third", steps=6, log_every=3)
    third.validation.every = 0
    each = {r["step"]: r for r in _rows(train.train(every))}
    rows = _rows(train.train(third))
    assert [r["step"] for r in rows] == [3, 6]
    for r in rows:
        for key in ("loss", "grad_norm"):
            np.testing.assert_allclose(r[key], np.mean([each[s][key] for s in range(r["step"] - 2, r["step"] + 1)]),
                                       rtol=1e-6)


def test_a_second_ctrl_c_quits_at_once():
    """The first SIGINT is recorded (the loop saves and stops); the second takes Python's default
    action, KeyboardInterrupt, so a user is never stuck waiting for a save."""
    with trainer.Signals() as signals:
        signals.interruptible = False  # as in the training loop
        os.kill(os.getpid(), signal.SIGINT)
        assert signals.signal == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.slow
def test_a_training_run_logs_to_wandb_and_its_resume_continues_the_same_wandb_run(demo_root, offline, monkeypatch):
    """The demo for 4 steps, stopped by SIGTERM in step 3 and resumed: both launches log to the one
    wandb run (two offline folders of one id), the loss at every step, the validation loss and video
    at step 4; the stopped launch ends preempted (exit code 75), the resumed one done (0)."""
    cfg = _cfg(demo_root, "run", steps=4, log_every=1)
    cfg.checkpoint.every = 2
    cfg.validation.every = 4
    cfg.validation.sampling.update(dict(num_frames=7, steps=2))
    cfg.wandb.enabled = True
    with monkeypatch.context() as m:
        _signal_at_step(m, 3)
        with pytest.raises(trainer.Stopped):
            train.train(cfg)
    run_id = (Path(cfg.run_dir) / trainer.WANDB_ID).read_text().strip()
    train.train(cfg)
    assert (Path(cfg.run_dir) / trainer.WANDB_ID).read_text().strip() == run_id
    first, second = offline_runs(offline)
    assert [all_of(f, "run")[0].run_id for f in (first, second)] == [run_id, run_id]
    assert all_of(first, "run")[0].display_name == "run"
    assert [r["_step"] for r in history(first) if "loss" in r] == [1, 2, 3]
    assert [e.exit_code for e in all_of(first, "exit")] == [75] and all_of(first, "preempting")
    rows = history(second)
    assert [r["_step"] for r in rows if "loss" in r] == [4]
    last = rows[-1]
    assert last["_step"] == 4 and np.isfinite(last["val_loss"])
    tag = plots.video_tag("samples/step000004_prompt0_seed12345.mp4", cfg.validation.prompts)
    assert last[f"{tag}/_type"] == "video-file" and (second / "files" / last[f"{tag}/path"]).is_file()
    assert [e.exit_code for e in all_of(second, "exit")] == [0]
    metrics = [json.loads(x) for x in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    logged = {(r["_step"], k): v for f in (first, second) for r in history(f) for k, v in r.items()
              if not k.startswith("_") and not k.startswith("val_video/")}
    assert logged == {(r["step"], k): v for r in metrics for k, v in r.items() if k != "step"}  # the same scalars
