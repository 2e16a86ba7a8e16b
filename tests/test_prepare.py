"""mochi_jax.prepare, .video, .synthetic and .cache on tiny random models (mochi_jax.demo) and small clips."""

import json
import math
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import safetensors.numpy

from mochi_jax.checkpoints import files
from mochi_jax.configs import prepare as prepare_configs
from mochi_jax.lib import cache as cache_lib
from mochi_jax import prepare as prepare_cmd
from mochi_jax.lib import placement
from mochi_jax.lib import preparation as prepare_lib
from mochi_jax.lib import sources
from mochi_jax.demo import clips as synthetic
from mochi_jax.lib.cache import Cache, CacheError
from mochi_jax.lib.video import VideoError, VideoReader, read_clip, resize_cover, to_unit, from_unit, write_mp4

SIZE = (48, 80)


def grey_clip(path, values, fps, size=SIZE):
    """A clip whose frame i is flat grey values[i]."""
    frames = np.repeat(np.asarray(values, np.uint8)[:, None, None, None], 3, axis=3)
    return write_mp4(path, np.broadcast_to(frames, (len(values), *size, 3)).copy(), fps=fps)


# ----------------------------------------------------------------------------- video

def test_read_clip_resamples_by_frame_rate(tmp_path):
    path = grey_clip(tmp_path / "ramp60.mp4", [8 * i for i in range(30)], fps=60)  # frame i has grey 8 i
    level = lambda clip: np.round(clip.reshape(len(clip), -1).mean(axis=1) / 8).astype(int)  # -> source index

    np.testing.assert_array_equal(level(read_clip(path, 13, fps=30, size=SIZE)), 2 * np.arange(13))
    # 60 -> 24 fps: output i shows source floor(2.5 i) = 0, 2, 5, 7, 10, ...
    np.testing.assert_array_equal(level(read_clip(path, 12, fps=24, size=SIZE)), [math.floor(2.5 * i) for i in range(12)])
    with pytest.raises(VideoError, match=r"ramp60\.mp4: too short: 15 frames at 30 fps") as e:
        read_clip(path, 16, fps=30, size=SIZE)  # 30 frames at 60 fps are 15 at 30 fps
    assert e.value.kind == "too short"


def test_resize_cover_keeps_the_centre_of_a_linear_image():
    # A linear image is reproduced exactly by a normalised symmetric filter away from the borders, so
    # output pixel (i, j) must equal f at the source position it maps to under a centred cover-resize.
    f = lambda y, x: 0.5 * y + 1.0 * x + 10
    for (h, w), (th, tw) in [((60, 200), (48, 80)), ((30, 40), (48, 80)), ((90, 40), (48, 80))]:
        yy, xx = np.mgrid[0:h, 0:w]
        src = np.repeat(np.round(f(yy, xx)).clip(0, 255).astype(np.uint8)[None, ..., None], 3, axis=-1)
        out = resize_cover(src, (th, tw))
        assert out.shape == (1, th, tw, 3)
        scale = max(th / h, tw / w)  # cover: the short side fits, the other is cropped evenly
        rh, rw = round(h * scale), round(w * scale)
        top, left = (rh - th) // 2, (rw - tw) // 2
        ys = (np.arange(th) + top + 0.5) * h / rh - 0.5
        xs = (np.arange(tw) + left + 0.5) * w / rw - 0.5
        expect = f(ys[:, None], xs[None, :])
        m = 3  # stay clear of the borders, where the filter is cut
        inner = (slice(m, th - m), slice(m, tw - m))
        ok = (expect[inner] >= 1) & (expect[inner] <= 254)
        np.testing.assert_allclose(out[0, ..., 0][inner][ok], expect[inner][ok], atol=1.0)


def test_read_clip_crops_the_centre_and_refuses_upscaling_when_asked(tmp_path):
    frames = np.zeros((13, 60, 160, 3), np.uint8)
    frames[:, :, 76:84] = 255  # a white bar in the middle of a wide frame
    path = write_mp4(tmp_path / "wide.mp4", frames, fps=30)
    clip = read_clip(path, 13, fps=30, size=SIZE)  # 60x160 -> 48x128 -> centre 48x80
    assert clip.shape == (13, *SIZE, 3) and clip.dtype == np.uint8
    profile = clip[..., 0].mean(axis=(0, 1)).astype(np.float64)
    centroid = (profile * np.arange(80)).sum() / profile.sum()  # source centre 79.5 -> (80 * 0.8 - 0.5) - 24
    assert abs(centroid - 39.5) < 0.5 and profile[38:42].min() > 150
    assert profile[:30].max() < 40 and profile[50:].max() < 40
    with pytest.raises(VideoError, match=r"wide\.mp4: too small"):
        read_clip(path, 13, fps=30, size=(64, 96), upscale=False)
    assert read_clip(path, 13, fps=30, size=(64, 96)).shape == (13, 64, 96, 3)  # upscaling allowed by default


def moving_clip(path, n, size, fps):
    """A clip whose every frame differs from the next by ~25/255 on average (two drifting luma waves over
    colour ramps and a yellow bar moving right), so a frame read from the wrong index shows."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    frames = np.empty((n, h, w, 3), np.uint8)
    for t in range(n):
        luma = (40 * np.sin(2 * np.pi * (3 * xx + 2 * yy - 0.15 * t))
                + 25 * np.sin(2 * np.pi * (5 * yy - 4 * xx + 0.1 * t)))
        rgb = np.stack([60 + 120 * xx, 70 + 100 * yy, 180 - 80 * xx], -1) + luma[..., None]
        x0 = int(3 * t * w / 100) % w
        rgb[h // 4: h // 2, x0: x0 + max(2, w // 12)] = (240, 220, 40)
        frames[t] = np.clip(np.round(rgb), 0, 255)
    return write_mp4(path, frames, fps=fps, quality=9)


# name: (source (H, W), source fps, bucket (H, W), fps read at, upscale)
SCALER_CASES = {
    "downscale": ((108, 192), 30, (48, 80), 30, True),  # 108x192 -> 48x85, crop 2 columns each side
    "upscale": ((36, 64), 30, (48, 80), 30, True),  # 36x64 -> 48x85
    "upscale=False": ((108, 192), 30, (48, 80), 30, False),
    "portrait bucket": ((192, 108), 30, (80, 48), 30, True),
    "landscape bucket, portrait source": ((192, 108), 30, (48, 80), 30, True),  # -> 142x80, crop from row 47
    "60 fps source at 24 fps": ((108, 192), 60, (48, 80), 24, True),  # source 0, 2, 5, 7, 10, ...
    "24 fps source at 30 fps": ((108, 192), 24, (48, 80), 30, True),  # source 0, 0, 1, 2, 3, 4, 4, ...
}


@pytest.mark.parametrize("case", list(SCALER_CASES))
def test_the_ffmpeg_scaler_gives_the_numpy_frames_up_to_resampling_noise(tmp_path, case):
    src, src_fps, size, fps, upscale = SCALER_CASES[case]
    path = moving_clip(tmp_path / "moving.mp4", 40, src, src_fps)
    n = 13
    ref = read_clip(path, n, fps, size, upscale, scaler="numpy")
    got = read_clip(path, n, fps, size, upscale, scaler="ffmpeg")
    assert got.shape == ref.shape == (n, *size, 3) and got.dtype == np.uint8
    per_frame = np.abs(got.astype(int) - ref).reshape(n, -1).mean(axis=1)
    assert per_frame.max() < 2, per_frame  # measured ~1.2 (chroma: interpolated vs repeated)
    # each frame is the source frame floor(i * src_fps / fps): the nearest of all source frames, resized
    every = read_clip(path, 40, src_fps, size, scaler="numpy")
    nearest = [int(np.abs(every.astype(int) - f).reshape(40, -1).mean(axis=1).argmin()) for f in got]
    assert nearest == [math.floor(i * src_fps / fps + 1e-6) for i in range(n)]
    if not upscale:
        for scaler in ("ffmpeg", "numpy"):
            with pytest.raises(VideoError, match=r"moving\.mp4: too small: 192x108 \(WxH\) is smaller than the 224x128"):
                read_clip(path, n, fps, (128, 224), upscale=False, scaler=scaler)


def test_both_scalers_read_the_same_windows_and_stop_at_the_last(tmp_path):
    path = moving_clip(tmp_path / "moving.mp4", 40, (108, 192), 60)
    wanted = [0, 1, 2, 9, 10, 11]  # at 24 fps: source frames 0, 2, 5, 22, 25, 27
    got = {}
    for scaler in ("ffmpeg", "numpy"):
        with VideoReader(path, scaler) as r:
            got[scaler] = r.read(wanted, 24, (48, 80))
            assert r.source_frames == 28 and not r.ended  # decoding stopped after source frame 27
    assert sorted(got["ffmpeg"]) == sorted(got["numpy"]) == wanted
    for i in wanted:
        assert np.abs(got["ffmpeg"][i].astype(int) - got["numpy"][i]).mean() < 2
    with VideoReader(path) as r:  # the ffmpeg scaler may read twice; past the end the frames are missing
        assert sorted(r.read([15, 16, 17], 24, (48, 80))) == [15] and r.ended and r.source_frames == 40
        np.testing.assert_array_equal(r.read([9], 24, (48, 80))[9], got["ffmpeg"][9])
    with pytest.raises(ValueError, match="scaler must be one of"):
        VideoReader(path, "pil")


def test_unreadable_files_name_themselves(tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "junk.mov").write_bytes(b"not a video at all" * 50)
    for scaler in ("ffmpeg", "numpy"):
        with pytest.raises(VideoError, match=r"empty\.mp4: zero-byte"):
            read_clip(tmp_path / "empty.mp4", 13, scaler=scaler)
        with pytest.raises(VideoError, match=r"junk\.mov: unreadable"):
            read_clip(tmp_path / "junk.mov", 13, scaler=scaler)
    x = np.array([0, 1, 127, 128, 255], np.uint8)
    np.testing.assert_array_equal(from_unit(to_unit(x)), x)
    assert to_unit(x).min() == -1 and to_unit(x).max() == 1


def test_synthetic_clips_are_deterministic_and_distinct(tmp_path):
    a = synthetic.make_clips(tmp_path / "a", n=3, num_frames=7, seed=1)
    b = synthetic.make_clips(tmp_path / "b", n=3, num_frames=7, seed=1)
    clips = [read_clip(p, 7, size=SIZE) for p in a]
    np.testing.assert_array_equal(clips[0], read_clip(b[0], 7, size=SIZE))
    assert [p.with_suffix(".txt").read_text() for p in a] == [p.with_suffix(".txt").read_text() for p in b]
    assert len({p.with_suffix(".txt").read_text() for p in a}) == 3
    assert not np.array_equal(clips[0], clips[1])
    assert not np.array_equal(clips[0][0], clips[0][-1])  # something moves


def test_choose_bucket_by_aspect_ratio():
    buckets = ((480, 848), (848, 480), (640, 640))
    assert sources.choose_bucket(1080, 1920, buckets) == (480, 848)
    assert sources.choose_bucket(1920, 1080, buckets) == (848, 480)
    assert sources.choose_bucket(500, 520, buckets) == (640, 640)


def test_config_presets_and_overrides():
    from absl import flags
    from ml_collections import config_flags

    cfg = prepare_configs.get_config("")
    assert (cfg.fps, cfg.num_frames, tuple(cfg.buckets)) == (30, 37, ((480, 848),))
    argv = ["prog", f"--config={prepare_configs.__file__}:demo", "--config.buckets=((64,96),(96,64))",
            "--config.input_dir=mine", "--config.overwrite=True"]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=fv, sys_argv=argv)
    fv(argv)
    assert fv.config.num_frames == 13 and tuple(map(tuple, fv.config.buckets)) == ((64, 96), (96, 64))
    assert fv.config.input_dir == "mine" and fv.config.overwrite


# ----------------------------------------------------------------------------- prepare

@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo preset in a fresh folder: writes the tiny models and 4 synthetic clips, then caches them."""
    root = tmp_path_factory.mktemp("demo")
    # prepare needs no DiT and write_demo_models keeps what exists: a placeholder saves ~25 s of DiT init.
    (root / "models" / "dit").mkdir(parents=True)
    cfg = prepare_configs.get_config("demo")
    for k in ("input_dir", "output_dir", "vae", "t5", "tokenizer"):
        cfg[k] = str(root / cfg[k].removeprefix("runs/demo/"))
    cfg.text_batch_size, cfg.previews = 2, True
    cfg.demo.root = str(root)
    report = prepare_cmd.prepare(cfg)
    return cfg, report


def config_for(demo_cfg, input_dir, output_dir):
    cfg = demo_cfg.copy_and_resolve_references()
    cfg.input_dir, cfg.output_dir = str(input_dir), str(output_dir)
    return cfg


@pytest.mark.slow
def test_demo_preset_runs_on_a_fresh_folder(demo):
    cfg, report = demo
    assert report["new"] == [f"clip_{k:03d}" for k in range(4)] and not report["skipped"]
    cache = Cache(cfg.output_dir)
    assert len(cache) == 4 and cache.latent_shapes() == {(12, 3, 6, 10)}
    models = {p.name for p in (cache.path.parent / "models").iterdir()}
    assert {"vae", "t5", "tokenizer"} <= models
    preview = read_clip(cache.path / "previews" / "clip_000.mp4", 13, size=(48, 160))  # input | reconstruction
    source = read_clip(cache.entries[0]["source"], 13, size=SIZE)
    assert np.abs(preview[:, :, :80].astype(int) - source).mean() < 3


def test_the_fit_checks_programs_are_what_prepare_runs(demo):
    """placement.vae_encode_program / t5_program (what `mochi_jax.aot` compiles) give the very jitted
    functions Models calls and lower to the same HLO as those calls on real arrays of the same shapes, on
    one device (several devices: tests/test_prepare_sharded.py)."""
    cfg = demo[0].copy_and_resolve_references()
    cfg.devices = 1
    m = prepare_lib.load_models(cfg)
    one = jax.local_devices()[:1]
    enc, pixels = m.encode_call(np.zeros((1, 3, 13, *SIZE), np.float32))
    program = placement.vae_encode_program(m.vae_cfg, one, (13, *SIZE), m.tiled)
    assert program.fn is enc and program.kwargs == {"cfg": m.vae_cfg, "tiled": m.tiled}
    assert program.lower().as_text() == enc.lower(m.vae_params, pixels, cfg=m.vae_cfg, tiled=m.tiled).as_text()
    assert set(program.inputs) == {"encoder weights", "pixels"} and set(program.resident) == {"decoder weights"}
    fn, args = m.text_call(["a grey clip", ""])
    program = placement.t5_program(m.text.cfg, one, m.batch, cfg.max_length, {})
    assert program.fn is fn and program.lower().as_text() == fn.lower(*args).as_text()
    assert m.encode_text(["a grey clip", ""])[0].shape == (2, cfg.max_length, m.text.cfg.d_model)


@pytest.mark.slow
def test_prepare_skips_bad_clips_caches_good_ones_and_resumes(demo, tmp_path, monkeypatch, capsys):
    from mochi_jax.checkpoints.vae import load_vae
    from mochi_jax.models import vae as vae_lib
    from mochi_jax.lib.text import T5Tokenizer, encode
    from mochi_jax.checkpoints.t5 import load_t5

    src = tmp_path / "in"
    synthetic.make_clips(src, n=3, num_frames=25, size=SIZE, seed=7)
    (src / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    (src / "zero.mp4").write_bytes(b"")
    grey_clip(src / "short.mp4", [100] * 10, fps=30)
    grey_clip(src / "nocap.mp4", [50] * 25, fps=30)
    grey_clip(src / "blank.mp4", [150] * 25, fps=30)
    for name, text in [("corrupt", "x"), ("zero", "x"), ("short", "grey"), ("blank", " \n\t "), ("lonely", "x")]:
        (src / f"{name}.txt").write_text(text)  # lonely.txt: a caption without a video
    out = tmp_path / "cache"
    cfg = config_for(demo[0], src, out)

    report = prepare_lib.prepare(cfg)
    good = ["clip_000", "clip_001", "clip_002"]
    assert report["new"] == good and report["clips"] == good
    reasons = {s["source"].split("/")[-1]: s["reason"] for s in report["skipped"]}
    assert sorted(reasons) == ["blank.mp4", "corrupt.mp4", "lonely.txt", "nocap.mp4", "short.mp4", "zero.mp4"]
    assert reasons["lonely.txt"].startswith("caption without a video: no lonely.mp4/")
    assert reasons["blank.mp4"].startswith("empty caption")
    assert reasons["corrupt.mp4"].startswith("unreadable")
    assert reasons["nocap.mp4"].startswith("no caption")
    assert reasons["short.mp4"].startswith("too short: 10 frames")
    assert reasons["zero.mp4"].startswith("zero-byte")
    printed = capsys.readouterr().out
    for name, reason in reasons.items():
        assert f"{name}: {reason}" in printed
    assert sorted(p.name for p in (out / "clips").iterdir()) == [f"{n}.safetensors" for n in good]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "mochi_jax.cache/1" and len(manifest["skipped"]) == 6

    # The cache holds what our VAE and T5 give for the same frames and captions, called directly.
    vae_cfg, vae_params = load_vae(cfg.vae, dtype="float32")
    t5_cfg, t5_params = load_t5(cfg.t5)
    tok = T5Tokenizer(cfg.tokenizer)
    cache = Cache(out)
    assert [e["name"] for e in cache.entries] == good and cache.latent_shapes() == {(12, 3, 6, 10)}
    for i, entry in enumerate(cache.entries):
        caption = (src / f"{entry['name']}.txt").read_text().strip()
        assert entry["caption"] == caption and (entry["num_frames"], entry["height"], entry["width"]) == (13, *SIZE)
        frames = read_clip(src / f"{entry['name']}.mp4", 13, fps=30, size=SIZE)
        mean, logvar = vae_lib.encode(vae_params, np.moveaxis(to_unit(frames), -1, 0)[None], vae_cfg)
        feats, mask = encode([caption], tok, t5_cfg, t5_params)
        got = cache[i]
        assert got["mean"].dtype == np.float32 and got["t5_mask"].dtype == bool
        np.testing.assert_allclose(got["mean"], mean[0], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(got["logvar"], logvar[0], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(got["t5_feats"], feats[0], atol=1e-5, rtol=1e-5)
        np.testing.assert_array_equal(got["t5_mask"], mask[0])
    empty_feats, empty_mask = cache.empty_prompt()
    feats, mask = encode([""], tok, t5_cfg, t5_params)
    np.testing.assert_allclose(empty_feats, feats[0], atol=1e-5, rtol=1e-5)
    assert empty_mask.sum() == 1 and np.array_equal(empty_mask, mask[0])

    # Re-running loads no model and rewrites no cache file.
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}

    def no_models(cfg):
        raise AssertionError("a re-run with nothing new must not load the models")

    monkeypatch.setattr(prepare_lib, "load_models", no_models)
    again = prepare_lib.prepare(cfg)
    assert again["new"] == [] and again["reused"] == good and len(again["skipped"]) == 6
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == stamps


def test_a_crash_mid_clip_leaves_no_partial_file_and_the_next_run_finishes(demo, tmp_path, monkeypatch):
    src = tmp_path / "in"
    synthetic.make_clips(src, n=3, num_frames=13, size=SIZE, seed=3)
    out = tmp_path / "cache"
    cfg = config_for(demo[0], src, out)
    real_save = cache_lib.write_safetensors
    calls = []

    def dies_on_second_clip(path, arrays):
        calls.append(path)
        if len(calls) == 3:  # empty prompt, clip_000, then clip_001: killed half-way through writing
            blob = safetensors.numpy.save(arrays)

            def half_then_killed(f):
                f.write(blob[: len(blob) // 2])
                raise KeyboardInterrupt

            files.write_atomically(path, half_then_killed)
        return real_save(path, arrays)

    monkeypatch.setattr(cache_lib, "write_safetensors", dies_on_second_clip)
    with pytest.raises(KeyboardInterrupt):
        prepare_lib.prepare(cfg)
    monkeypatch.setattr(cache_lib, "write_safetensors", real_save)
    assert sorted(p.name for p in (out / "clips").iterdir()) == ["clip_000.safetensors"]
    assert [e["name"] for e in Cache(out).entries] == ["clip_000"]
    # A process killed outright (no cleanup) leaves its temporary file behind; the next run removes it.
    (out / "clips" / ".clip_001.safetensors.tmp12345").write_bytes(b"half a file")

    report = prepare_lib.prepare(cfg)
    assert report["reused"] == ["clip_000"] and report["new"] == ["clip_001", "clip_002"]
    assert sorted(p.name for p in (out / "clips").iterdir()) == [f"clip_{k:03d}.safetensors" for k in range(3)]
    cache = Cache(out)
    assert len(cache) == 3 and all(cache[i]["mean"].shape == (12, 3, 6, 10) for i in range(3))


def test_a_folder_without_videos_is_refused_before_any_model_is_loaded(demo, tmp_path, monkeypatch):
    def no_models(cfg):
        raise AssertionError("no model may be loaded for a folder without videos")

    monkeypatch.setattr(prepare_lib, "load_models", no_models)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"{empty}: no videos"):
        prepare_lib.prepare(config_for(demo[0], empty, tmp_path / "cache"))
    (empty / "dog.txt").write_text("a dog")  # captions alone are named
    with pytest.raises(ValueError, match=r"1 caption\(s\) without a video: dog\.txt"):
        prepare_lib.prepare(config_for(demo[0], empty, tmp_path / "cache"))
    assert not (tmp_path / "cache").exists()
    with pytest.raises(FileNotFoundError, match="input_dir does not exist"):
        prepare_lib.prepare(config_for(demo[0], tmp_path / "missing", tmp_path / "cache"))
    # videos that all fail: the reasons are listed, then an error (no cache worth training on)
    (empty / "dog.mp4").write_bytes(b"")
    with pytest.raises(ValueError, match="none of its 1 videos and images could be prepared"):
        prepare_lib.prepare(config_for(demo[0], empty, tmp_path / "cache"))


def test_the_demo_preset_never_writes_into_a_folder_the_user_names(demo, tmp_path, monkeypatch):
    """configs/prepare.py:demo with input_dir set to the user's (empty) folder: the demo makes its
    models and clips under its own root only, and prepare then refuses the empty folder."""
    mine = tmp_path / "my_clips"
    mine.mkdir()
    cfg = config_for(demo[0], mine, tmp_path / "my_cache")
    assert cfg.demo.clips  # the preset does make synthetic clips (under demo.root)
    monkeypatch.setattr(prepare_lib, "load_models", lambda cfg: pytest.fail("no model may be loaded"))
    with pytest.raises(ValueError, match=f"{mine}: no videos"):
        prepare_cmd.prepare(cfg)
    assert list(mine.iterdir()) == []


def test_changed_settings_are_refused_unless_overwrite(demo):
    cfg = demo[0].copy_and_resolve_references()
    cfg.num_frames = 7
    with pytest.raises(ValueError, match=r"num_frames: cached 13 vs now 7.*overwrite"):
        prepare_lib.prepare(cfg)


# ----------------------------------------------------------------------------- cache

def test_cache_reads_back_and_names_missing_or_corrupt_files(tmp_path):
    rng = np.random.default_rng(0)
    clip = {"mean": rng.normal(size=(12, 2, 3, 4)).astype(np.float32),
            "logvar": rng.normal(size=(12, 2, 3, 4)).astype(np.float32),
            "t5_feats": rng.normal(size=(8, 5)).astype(np.float32), "t5_mask": np.arange(8) < 3}
    entries = [{"name": n, "file": f"clips/{n}.safetensors", "source": f"{n}.mp4", "caption": n,
                "num_frames": 7, "height": 24, "width": 32, "latent_shape": [12, 2, 3, 4]} for n in ("a", "b", "c")]
    cache_lib.write_arrays(tmp_path / "clips" / "a.safetensors", clip)
    (tmp_path / "clips" / "c.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    cache_lib.write_arrays(tmp_path / "empty_prompt.safetensors", {"t5_feats": clip["t5_feats"], "t5_mask": clip["t5_mask"]})

    with pytest.raises(CacheError, match=r"manifest\.json: no cache manifest"):
        Cache(tmp_path)
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(CacheError, match=r"manifest\.json: unreadable manifest"):
        Cache(tmp_path)
    cache_lib.write_manifest(tmp_path, {"format": "mochi_jax.cache/1", "config": {}, "clips": entries,
                                        "empty_prompt": "empty_prompt.safetensors", "skipped": []})
    cache = Cache(tmp_path)
    assert len(cache) == 3 and cache.latent_shapes() == {(12, 2, 3, 4)}
    got = cache[0]
    for k, v in clip.items():
        np.testing.assert_array_equal(got[k], v)
        assert got[k].dtype == v.dtype
    feats, mask = cache.empty_prompt()
    np.testing.assert_array_equal(feats, clip["t5_feats"])
    np.testing.assert_array_equal(mask, clip["t5_mask"])
    with pytest.raises(CacheError, match=r"clips/b\.safetensors: cache file missing"):
        cache[1]
    with pytest.raises(CacheError, match=r"clips/c\.safetensors: corrupt"):
        cache[2]
    assert not list(tmp_path.rglob(".*tmp*"))


@pytest.mark.slow
def test_a_musubi_jsonl_is_prepares_input(demo, tmp_path):
    """--config.input_dir=meta.jsonl: musubi-tuner's metadata lines name the videos (relative to the
    file, or absolute) with their captions; the cache holds exactly those clips with those captions,
    the same latents as the folder gave, and a line whose file is missing is skipped with a reason."""
    cfg, _ = demo
    clips = sorted(Path(cfg.input_dir).glob("*.mp4"))[:2]
    (tmp_path / "meta").mkdir()
    shutil.copy(clips[0], tmp_path / "meta" / "a.mp4")
    lines = [{"video_path": "a.mp4", "caption": "a clip beside the file"},
             {"video_path": str(clips[1]), "caption": "a clip named by its absolute path"},
             {"video_path": "missing.mp4", "caption": "gone"}]
    meta = tmp_path / "meta" / "meta.jsonl"
    meta.write_text("".join(json.dumps(x) + "\n" for x in lines))
    report = prepare_cmd.prepare(config_for(cfg, meta, tmp_path / "cache"))
    assert len(report["new"]) == 2 and len(report["skipped"]) == 1 and "missing.mp4" in str(report["skipped"]), report
    cache, folder = Cache(tmp_path / "cache"), Cache(cfg.output_dir)
    captions = sorted(e["caption"] for e in cache.entries)
    assert captions == ["a clip beside the file", "a clip named by its absolute path"]
    by_source = {Path(e["source"]).name: i for i, e in enumerate(folder.entries)}
    mine = {e["caption"]: i for i, e in enumerate(cache.entries)}
    same = folder[by_source[clips[1].name]]["mean"], cache[mine["a clip named by its absolute path"]]["mean"]
    np.testing.assert_array_equal(*same)
