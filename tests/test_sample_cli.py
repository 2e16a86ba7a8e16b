"""`python -m mochi_jax.sample`: prompt -> mp4 with several LoRAs at their own strengths, deterministic,
bad LoRA files refused before rendering."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mochi_jax.configs import sample as sample_config
from mochi_jax import sample
from mochi_jax.checkpoints import runs
from mochi_jax.checkpoints import lora_format, lora_write
from mochi_jax.demo import write_demo_models
from mochi_jax.models import lora as lora_lib
from mochi_jax.checkpoints import load_dit
from mochi_jax.lib.stopping import Stopped

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    paths = write_demo_models(root / "models")
    cfg, _ = load_dit(paths["dit"])
    targets = lora_lib.targets_from_config({k: dict(v, rank=2, alpha=4.0) for k, v in lora_lib.REFERENCE_TARGETS.items()})
    files = []
    for i, save in enumerate((lora_write.save_genmo, lora_write.save_diffusers)):
        from mochi_jax.models.dit import MochiDiT
        import jax.numpy as jnp

        p = cfg.patch_size
        shapes = jax.eval_shape(lambda: MochiDiT(cfg, targets).init(
            jax.random.PRNGKey(0), jnp.zeros((1, 12, 1, p, p)), jnp.zeros((1, 1, cfg.t5_dim)),
            jnp.ones((1, 1), bool), jnp.zeros((1,)))["lora"])
        leaves, tree = jax.tree_util.tree_flatten(shapes)
        keys = jax.random.split(jax.random.PRNGKey(10 + i), len(leaves))
        factors = jax.tree_util.tree_unflatten(tree, [0.5 * jax.random.normal(k, s.shape) for k, s in zip(keys, leaves)])
        f = root / f"lora{i}.safetensors"
        save(f, factors, targets)
        files.append(f)
    return root, files


def _cfg(root, **kw):
    cfg = sample_config.get_config("demo")
    m = root / "models"
    cfg.model.update(dict(dit=str(m / "dit"), vae=str(m / "vae"), t5=str(m / "t5"), tokenizer=str(m / "tokenizer")))
    cfg.sampling.update(dict(num_frames=7, height=32, width=48, steps=3))
    cfg.demo.root = str(root)
    cfg.out_dir = str(root / "out")
    cfg.update(kw)
    return cfg


def _frames(cfg):
    return {seed: frames for _, seed, frames in sample.render(cfg)}


def _same_video(a, b):
    """Equal up to rounding: another program (another batch size, a zero adapter) may add in another
    order, and a float32 value on a rounding boundary flips one uint8 level."""
    diff = np.abs(a.astype(int) - b)
    assert diff.max() <= 1 and np.mean(diff > 0) < 1e-3, (diff.max(), np.mean(diff > 0))


def test_parse_loras():
    assert runs.parse_loras("a.safetensors:0.8, b.safetensors,c:-1e-1") == [
        ("a.safetensors", 0.8), ("b.safetensors", 1.0), ("c", -0.1)]
    assert runs.parse_loras("") == []


@pytest.mark.slow
def test_loras_at_strength_zero_give_the_base_video_and_rendering_is_deterministic(setup):
    root, files = setup
    base = _frames(_cfg(root, num_videos=2, batch_size=2))
    assert sorted(base) == [12345, 12346] and base[12345].shape == (7, 32, 48, 3)
    assert not np.array_equal(base[12345], base[12346])  # different seeds, different noise
    alone = _frames(_cfg(root, seed=12346))  # rendered alone = rendered in a batch
    _same_video(alone[12346], base[12346])
    zero = _frames(_cfg(root, loras=f"{files[0]}:0,{files[1]}:0.0"))
    _same_video(zero[12345], base[12345])
    styled = _frames(_cfg(root, loras=f"{files[0]}:1.0,{files[1]}:-0.5"))
    assert np.abs(styled[12345].astype(int) - base[12345]).mean() > 1.0
    again = _frames(_cfg(root, loras=f"{files[0]}:1.0,{files[1]}:-0.5"))
    np.testing.assert_array_equal(again[12345], styled[12345])


def test_bad_lora_is_refused_naming_the_key(setup):
    root, files = setup
    tensors = load_file(str(files[0]))
    key = next(k for k in tensors if k.endswith("lora_B"))
    tensors[key] = tensors[key][:, :1]  # wrong rank
    bad = root / "bad.safetensors"
    save_file(tensors, str(bad), metadata={"kwargs": '{"qkv_proj_lora_rank": 2, "qkv_proj_lora_alpha": 2, '
                                                      '"out_proj_lora_rank": 2, "out_proj_lora_alpha": 2}'})
    with pytest.raises(lora_format.LoraFormatError, match=key.replace(".", r"\.")):
        _frames(_cfg(root, loras=str(bad)))
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        _frames(_cfg(root, loras="nope.safetensors"))


def test_command_line_writes_mp4(setup):
    root, files = setup
    out = root / "cli"
    m = root / "models"
    cmd = [sys.executable, "-m", "mochi_jax.sample", "--config=configs/sample.py:demo",
           f"--config.model.dit={m / 'dit'}", f"--config.model.vae={m / 'vae'}", f"--config.model.t5={m / 't5'}",
           f"--config.model.tokenizer={m / 'tokenizer'}", "--config.sampling.num_frames=7",
           "--config.sampling.height=32", "--config.sampling.width=48", "--config.sampling.steps=2",
           f"--config.demo.root={root}", f"--config.out_dir={out}", "--config.prompt=a blue square",
           f"--config.loras={files[1]}:0.7"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    video = out / "a_blue_square_seed12345.mp4"
    assert video.is_file()
    frames = iio.imread(video)
    assert frames.shape[0] == 7 and frames.shape[1:3] == (32, 48)


@pytest.mark.slow
def test_prompt_file_renders_every_prompt_with_models_loaded_once(setup, tmp_path, monkeypatch):
    """One call renders every prompt of a file (batches mix prompts and seeds): names numbered in file
    order, unique when two prompts share a slug, and each video the one its prompt and seed give alone."""
    root, _ = setup
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\na red ball\n\nA red ball!\na green cube\n")
    loads, real = [], sample.load_dit
    monkeypatch.setattr(sample, "load_dit", lambda *a, **k: loads.append(a) or real(*a, **k))
    videos = {(stem, seed): v for stem, seed, v in
              sample.render(_cfg(root, prompt_file=str(prompts), num_videos=2, batch_size=3))}
    assert len(loads) == 1
    assert sorted(videos) == [(stem, seed) for stem in ("1_a_red_ball", "2_a_red_ball", "3_a_green_cube")
                              for seed in (12345, 12346)]
    alone = _frames(_cfg(root, prompt="a green cube", seed=12346))
    _same_video(alone[12346], videos[("3_a_green_cube", 12346)])
    assert not np.array_equal(videos[("1_a_red_ball", 12345)], videos[("3_a_green_cube", 12345)])
    with pytest.raises(ValueError, match="holds no prompts"):
        (tmp_path / "empty.txt").write_text("# nothing\n")
        list(sample.render(_cfg(root, prompt_file=str(tmp_path / "empty.txt"))))


def test_a_stop_signal_ends_sampling_keeping_the_videos_written(setup, tmp_path, monkeypatch):
    """SIGTERM while the second batch renders stops at once with Stopped (exit status 75), the first
    batch's video written; one that arrives while a video is being written lets it finish and stops
    before the next batch."""
    root, _ = setup
    calls, real, handler = [], sample.sampling.denoise, signal.getsignal(signal.SIGTERM)

    def denoise_term_at_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(sample.sampling, "denoise", denoise_term_at_second)
    out = tmp_path / "rendering"
    with pytest.raises(Stopped, match=r"stopped by SIGTERM after writing 1 video\(s\) to .*rendering; a rerun"):
        sample.run(_cfg(root, prompt="a cat", num_videos=3, batch_size=1, out_dir=str(out)))
    assert sorted(p.name for p in out.iterdir()) == ["a_cat_seed12345.mp4"]
    assert Stopped.exit_status == 75

    calls.clear()
    monkeypatch.setattr(sample.sampling, "denoise", lambda *a, **k: calls.append(1) or real(*a, **k))
    write_one = sample.write_mp4
    monkeypatch.setattr(sample, "write_mp4", lambda *a, **k: (write_one(*a, **k), os.kill(os.getpid(), signal.SIGTERM)))
    out = tmp_path / "writing"
    with pytest.raises(Stopped, match=r"stopped by SIGTERM after writing 1 video\(s\)"):
        sample.run(_cfg(root, prompt="a cat", num_videos=3, batch_size=1, out_dir=str(out)))
    assert len(calls) == 1 and sorted(p.name for p in out.iterdir()) == ["a_cat_seed12345.mp4"]
    assert signal.getsignal(signal.SIGTERM) is handler  # the command's own handler is gone
