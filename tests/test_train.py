"""The training loop end to end on the demo: outputs, exact resume after SIGKILL and SIGTERM,
stopping on non-finite losses, sampling with the trained LoRA."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from mochi_jax.configs import lora as lora_config
from dit_ref import lora_delta64
from mochi_jax import demo, train
from mochi_jax.checkpoints import runs
from mochi_jax.checkpoints import lora_files as lora_io

ROOT = Path(__file__).resolve().parents[1]


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
    # the exported LoRA (genmo format, alpha folded) is the trained one
    factors, targets = runs.load_run_lora(run)
    loaded, loaded_targets, _ = lora_io.load_lora(run / "lora.safetensors", depth=3)
    for path in [("blocks", "attn", "qkv_x"), ("last_block", "attn", "proj_x")]:
        np.testing.assert_allclose(lora_delta64(loaded, loaded_targets, path), lora_delta64(factors, targets, path),
                                   rtol=1e-6, atol=1e-8)
    assert (run / "lora_diffusers.safetensors").is_file()


SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from mochi_jax.configs import lora as lora_config
    from mochi_jax import train
    cfg = lora_config.demo(lora_config.get_config(), {demo!r})
    cfg.run_dir = {run!r}
    cfg.steps = {steps}
    cfg.log_every = 1
    cfg.checkpoint.every = 3
    cfg.validation.every = 0
    train.train(cfg)
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
        assert proc.returncode == 0 and "saved step" in out1, out1
    else:
        assert proc.returncode == -signal.SIGKILL
    resumed = _launch(demo_root, name, steps)
    out2, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out2
    assert "resumed from" in out2, out2
    a, b = _lora(Path(demo_root) / "straight"), _lora(Path(demo_root) / name)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_run_stops_after_repeated_non_finite_losses(demo_root, monkeypatch):
    cfg = _cfg(demo_root, "nan", steps=20, max_bad_steps=3)
    cfg.checkpoint.every = 2
    cfg.validation.every = 0
    cfg.optim.lr = 1e30  # the first update overflows the LoRA factors: every later loss is inf / nan
    with pytest.raises(FloatingPointError, match="non-finite losses in a row"):
        train.train(cfg)
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
