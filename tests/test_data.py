"""Buckets, batches, images, frame windows and captions (mochi_jax/lib/data.py, preparation.py,
video.py): the loader on synthetic caches, window and caption rules on small files, and end to end
on the demo's tiny models: a mixed cache (two aspect buckets, two frame counts, images and videos)
trained with batch 2 on one device (killed and resumed bit for bit) and with batch 4 on a
(data=2, fsdp=2) mesh of simulated devices, and an image-only style LoRA prepared, trained and sampled."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from mochi_jax import sample as sample_cmd
from mochi_jax.checkpoints import runs
from mochi_jax.configs import lora as lora_config
from mochi_jax.configs import prepare as prepare_config
from mochi_jax.configs import sample as sample_config
from mochi_jax.demo import make_clips, write_demo_models
from mochi_jax.demo.clips import render
from mochi_jax.lib import cache as cache_lib
from mochi_jax.lib import preparation, sources, trainer
from mochi_jax.lib.cache import Cache
from mochi_jax.lib.data import make_loader
from mochi_jax.lib.video import VideoError, VideoInfo, load_image, read_clip, write_mp4

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "tests" / "harness"
WIDE, TALL = (48, 80), (80, 48)


# ----------------------------------------------------------------------------- the loader

def fake_cache(path: Path, counts: dict) -> Cache:
    """A cache with counts[shape] clips of each latent shape; clip i's mean is filled with i."""
    entries, i = [], 0
    L, D = 4, 3
    for shape, n in counts.items():
        for _ in range(n):
            name = f"c{i:02d}"
            cache_lib.write_arrays(path / "clips" / f"{name}.safetensors", {
                "mean": np.full(shape, i, np.float32), "logvar": np.zeros(shape, np.float32),
                "t5_feats": np.full((L, D), i, np.float32), "t5_mask": np.arange(L) < 2})
            entries.append({"name": name, "file": f"clips/{name}.safetensors", "latent_shape": list(shape)})
            i += 1
    cache_lib.write_arrays(path / cache_lib.EMPTY_PROMPT, {"t5_feats": np.zeros((L, D), np.float32),
                                                           "t5_mask": np.arange(L) < 1})
    cache_lib.write_manifest(path, {"format": cache_lib.FORMAT, "config": {}, "clips": entries,
                                    "empty_prompt": cache_lib.EMPTY_PROMPT, "skipped": []})
    return Cache(path)


COUNTS = {(12, 1, 2, 3): 3, (12, 2, 2, 3): 5, (12, 2, 3, 2): 1}  # 9 clips; with batch 2: 2 + 3 + 1 batches


def ids(batch) -> list[int]:
    return [int(m.flat[0]) for m in batch["mean"]]


def test_held_out_clips_are_whole_sources(tmp_path):
    cache = fake_cache(tmp_path, {(12, 1, 2, 3): 6})
    # clips 0-1: source a, 2-4: frame windows of source b, 5: source c
    for e, src in zip(cache.entries, "aabbbc"):
        e["source_name"] = src
    assert cache.training_clips(0) == 6 and cache.training_clips(1) == 5  # c alone
    assert [cache.training_clips(n) for n in (2, 3, 4)] == [2, 2, 2]  # all of b goes, never a part of it
    with pytest.raises(ValueError, match="takes every clip"):
        cache.training_clips(5)  # b's windows reach back into a, and a's two clips both go
    with pytest.raises(ValueError, match="must leave training clips"):
        cache.training_clips(6)


def test_every_batch_has_one_shape_and_every_epoch_sees_every_clip(tmp_path):
    cache = fake_cache(tmp_path, COUNTS)
    loader = make_loader(cache, batch_size=2, seed=3)
    plan = loader.plan
    assert plan.epoch_batches == 6 and [b.batches for b in plan.buckets] == [2, 3, 1]
    epochs = []
    for e in range(3):
        seen, shapes = [], []
        for g in range(6):
            batch = next(loader)
            assert batch["mean"].shape[0] == 2 and batch["t5_feats"].shape == (2, 4, 3)
            assert len({m.shape for m in batch["mean"]}) == 1  # one latent shape per batch
            shapes.append(batch["mean"].shape[1:])
            assert ids(batch) == list(loader.indices(e * 6 + g))  # the plan is what is read
            assert tuple(batch["mean"].shape[1:]) == plan.bucket_of(e * 6 + g)
            seen += ids(batch)
        assert set(seen) == set(range(9))  # nothing left out
        # each bucket gets its share of batches; a bucket's last batch is filled from its own clips,
        # so only those repeat (3 clips -> 1 repeat, 5 -> 1, 1 -> 1)
        assert sorted(shapes) == sorted([(12, 1, 2, 3)] * 2 + [(12, 2, 2, 3)] * 3 + [(12, 2, 3, 2)])
        assert len(seen) - len(set(seen)) == 3
        epochs.append(seen)
    assert epochs[0] != epochs[1] != epochs[2]  # reshuffled every epoch
    again = make_loader(cache, batch_size=2, seed=3)
    assert [ids(next(again)) for _ in range(6)] == [epochs[0][i:i + 2] for i in range(0, 12, 2)]  # seeded
    other = make_loader(cache, batch_size=2, seed=4)
    assert [ids(next(other)) for _ in range(6)] != [epochs[0][i:i + 2] for i in range(0, 12, 2)]


def test_loader_position_restores_exactly_and_processes_share_each_batch(tmp_path):
    cache = fake_cache(tmp_path, COUNTS)
    a = make_loader(cache, batch_size=4, seed=0)
    for _ in range(5):
        next(a)
    state = a.get_state()
    assert state["next_batch"] == 5 and json.loads(json.dumps(state)) == state  # JSON for the checkpoint
    rest = [ids(next(a)) for _ in range(7)]
    b = make_loader(cache, batch_size=4, seed=0)
    b.set_state(state)
    assert [ids(next(b)) for _ in range(7)] == rest
    # two processes read halves of the same global batches: together, the one-process batch
    whole = make_loader(cache, batch_size=4, seed=0)
    halves = [make_loader(cache, batch_size=4, seed=0, process_index=p, process_count=2) for p in range(2)]
    for _ in range(8):
        parts = [next(h) for h in halves]
        assert parts[0]["mean"].shape == parts[1]["mean"].shape  # every process on the same bucket
        assert ids(parts[0]) + ids(parts[1]) == ids(next(whole))
    # a bucket smaller than the batch repeats its clips; holding clips out shortens the plan
    small = make_loader(cache, batch_size=4, seed=0, num_clips=8)
    assert small.plan.num_clips == 8 and small.plan.epoch_batches == 1 + 2
    with pytest.raises(ValueError, match="must divide by the 3 processes"):
        make_loader(cache, batch_size=4, seed=0, process_index=0, process_count=3)


# ----------------------------------------------------------------------------- windows

def ramp(path, n, fps, size=WIDE):
    """A clip whose frame i is flat grey 3 i (i < 85), so a frame's level names its source frame."""
    frames = np.repeat((3 * np.arange(n, dtype=np.uint8))[:, None, None, None], 3, axis=3)
    return write_mp4(path, np.broadcast_to(frames, (n, *size, 3)).copy(), fps=fps)


def levels(frames) -> list[int]:
    return [int(round(f.mean() / 3)) for f in frames]


def prep_cfg(**kw):
    cfg = prepare_config.get_config("demo")
    del cfg.demo
    cfg.update(kw)
    return cfg


def test_window_modes_start_where_documented():
    plan = sources.plan_windows
    assert plan("head", 100, 13) == [0]
    assert plan("uniform", 100, 13, count=4) == [0, 29, 58, 87]  # round(k * 87 / 3)
    assert plan("uniform", 100, 13, count=1) == [0] and plan("uniform", 13, 13, count=3) == [0]
    assert plan("slide", 40, 13, stride=10) == [0, 10, 20]
    assert plan("slide", 40, 13) == [0, 13, 26]  # stride 0: back to back
    assert plan("slide", 100, 13, stride=5, limit=3) == [0, 5, 10]
    assert plan("slide", 12, 13) == [] and plan("uniform", 12, 13, count=2) == []
    with pytest.raises(ValueError, match="windows.mode"):
        plan("random", 100, 13)
    assert sources.frame_buckets(37) == (37,) and sources.frame_buckets([61, 25, 37]) == (25, 37, 61)
    assert sources.longest_fit(40, (25, 37, 61)) == 37 and sources.longest_fit(20, (25, 37)) is None
    with pytest.raises(ValueError, match="6k\\+1"):
        sources.frame_buckets((25, 36))


def test_windows_of_a_real_clip_have_their_frames_and_frame_rate(tmp_path, monkeypatch):
    video = ramp(tmp_path / "ramp.mp4", 80, fps=60)  # 80 frames at 60 fps: 40 at 30 fps, showing 0, 2, 4, ...

    def read(**kw):
        cfg = prep_cfg(num_frames=(7, 13), **kw)
        return sources.read_source("ramp", video, "a ramp", cfg)

    for mode, expect in [({"mode": "uniform", "count": 3}, [0, 14, 27]), ({"mode": "slide", "stride": 10}, [0, 10, 20]),
                         ({"mode": "head"}, [0])]:
        got = read(windows=dict(prep_cfg().windows.to_dict(), **mode))
        assert [s.start for s in got.samples] == expect and not got.skips, (mode, got.skips)
        for s in got.samples:
            assert s.frames.shape == (13, *WIDE, 3)
            assert levels(s.frames) == [2 * (s.start + i) for i in range(13)]  # 60 -> 30 fps: every other frame
        names = [s.name for s in got.samples]
        assert names == (["ramp"] if mode["mode"] == "head" else [f"ramp@{s:05d}" for s in expect])
    # frame buckets: a clip fills the longest it can (10 frames at 30 fps -> 7), or is too short
    short = ramp(tmp_path / "short.mp4", 10, fps=30)
    got = sources.read_source("short", short, "x", prep_cfg(num_frames=(7, 13)))
    assert [s.frames.shape[0] for s in got.samples] == [7] and levels(got.samples[0].frames) == list(range(7))
    got = sources.read_source("short", short, "x", prep_cfg(num_frames=(13, 19)))
    assert not got.samples and got.skips[0].startswith("too short: 10 frames at 30 fps")
    # the container's duration is an estimate: a window the video turns out too short for is named and left out
    monkeypatch.setattr(VideoInfo, "frames_at", lambda self, fps: 50)
    got = read(windows={"mode": "slide", "stride": 10, "count": 3, "max": 0})
    assert [s.start for s in got.samples] == [0, 10, 20]
    assert len(got.skips) == 1 and got.skips[0].startswith("window past the end: frames 30-42 at 30 fps (from 1.00 s)")


# ----------------------------------------------------------------------------- captions and images

def test_captions_from_txt_metadata_jsonl_and_csv_with_a_trigger(tmp_path):
    d = tmp_path / "jsonl"
    d.mkdir()
    for n in ("a", "b", "c", "d"):
        (d / f"{n}.png").write_bytes(b"x")
    (d / "a.txt").write_text("from the txt\n")
    rows = [{"file_name": "a.png", "text": "the txt wins"}, {"file_name": "b.png", "caption": "from jsonl"},
            {"file_name": "gone.mp4", "text": "no such file"}, {"file_name": "d.png", "text": "  "},
            {"file_name": "b.png", "text": "twice"}, {"text": "no file column"}]
    (d / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    caps = sources.Captions(d, trigger="sks")
    assert caps(d / "a.png") == "sks from the txt" and caps(d / "b.png") == "sks from jsonl"
    with pytest.raises(sources.Skip, match="no caption: c.txt not found and no row in metadata.jsonl"):
        caps(d / "c.png")
    with pytest.raises(sources.Skip, match="empty caption: metadata.jsonl line 4"):
        caps(d / "d.png")
    reasons = {src.rsplit("/", 1)[-1]: why for src, why in caps.skipped}
    assert reasons["metadata.jsonl:3 (gone.mp4)"].startswith("missing file: gone.mp4 named in metadata.jsonl line 3")
    assert reasons["metadata.jsonl:5 (b.png)"].startswith("duplicate metadata row")
    assert reasons["metadata.jsonl:6"].startswith("bad metadata row") and reasons["metadata.jsonl:7"].startswith(
        "unreadable metadata row")
    assert sources.with_trigger("sks, a dog", "sks") == "sks, a dog"  # not doubled

    c = tmp_path / "csv"
    (c / "sub").mkdir(parents=True)
    (c / "sub" / "v.mp4").write_bytes(b"x")
    (c / "metadata.csv").write_text('file_name,caption\nsub/v.mp4,"a clip, with a comma"\nmissing.jpg,x\n')
    caps = sources.Captions(c)
    assert caps(c / "sub" / "v.mp4") == "a clip, with a comma"
    assert [s.rsplit("/", 1)[-1] for s, _ in caps.skipped] == ["metadata.csv:3 (missing.jpg)"]
    (c / "metadata.jsonl").write_text("")
    with pytest.raises(ValueError, match="both metadata.jsonl and metadata.csv"):
        sources.Captions(c)
    assert sources.Captions(c, captions="metadata.csv").metadata.name == "metadata.csv"


def test_images_are_upright_one_frame_clips_and_bad_ones_are_named(tmp_path):
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    Image.fromarray(img).save(tmp_path / "side.jpg", exif=exif, quality=95)
    up = load_image(tmp_path / "side.jpg")
    assert up.shape == (40, 20, 3) and up[:15].mean() > 200 and up[25:].mean() < 50  # white half on top
    clip = read_clip(tmp_path / "side.jpg", 1, size=TALL)
    assert clip.shape == (1, *TALL, 3)
    (tmp_path / "junk.png").write_bytes(b"not an image" * 10)
    (tmp_path / "empty.webp").write_bytes(b"")
    with pytest.raises(VideoError, match=r"junk\.png: unreadable: not a readable image"):
        load_image(tmp_path / "junk.png")
    with pytest.raises(VideoError, match=r"empty\.webp: zero-byte"):
        load_image(tmp_path / "empty.webp")
    got = sources.read_source("junk", tmp_path / "junk.png", "x", prep_cfg())
    assert not got.samples and got.skips[0].startswith("unreadable")


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """The demo's tiny models, written once for this module."""
    root = tmp_path_factory.mktemp("buckets")
    write_demo_models(root / "models")
    return root


def picture(path, size, colour, caption=None):
    frame = render(1, size, "circle", colour, (10, 10, 60), min(size) / 4, (size[0] / 2, size[1] / 2), (0, 0))[0]
    Image.fromarray(frame).save(path)
    if caption:
        path.with_suffix(".txt").write_text(caption)


def prepare(root, src, out, **kw):
    cfg = prep_cfg(input_dir=str(src), output_dir=str(out), vae=str(root / "models" / "vae"),
                   t5=str(root / "models" / "t5"), tokenizer=str(root / "models" / "tokenizer"), **kw)
    return preparation.prepare(cfg)


@pytest.fixture(scope="module")
def mixed(root):
    """Two aspect buckets, two frame counts, images and videos: 3 wide images (1 latent frame),
    2 wide 9-frame videos (-> 7 frames, 2 latent frames), 1 tall 14-frame video (-> 13 frames, 3)."""
    src = root / "mixed"
    make_clips(src / "wide", n=2, num_frames=9, size=WIDE, seed=1)
    make_clips(src / "tall", n=1, num_frames=14, size=TALL, seed=2)
    for k, ext in enumerate(("png", "webp", "jpg")):
        picture(src / f"img{k}.{ext}", WIDE, (200, 40 * k, 40), f"a red circle, picture {k}")
    report = prepare(root, src, root / "mixed_cache", num_frames=(7, 13), buckets=(WIDE, TALL), workers=2)
    return root / "mixed_cache", report


@pytest.mark.slow
def test_a_mixed_folder_is_cached_in_buckets(mixed):
    out, report = mixed
    cache = Cache(out)
    by_name = {e["name"]: e for e in cache.entries}
    assert sorted(by_name) == ["img0", "img1", "img2", "tall/clip_000", "wide/clip_000", "wide/clip_001"]
    assert not report["skipped"] and report["timing"]["clips_per_s"] > 0
    assert {n: tuple(e["latent_shape"]) for n, e in by_name.items()} == {
        "img0": (12, 1, 6, 10), "img1": (12, 1, 6, 10), "img2": (12, 1, 6, 10), "tall/clip_000": (12, 3, 10, 6),
        "wide/clip_000": (12, 2, 6, 10), "wide/clip_001": (12, 2, 6, 10)}
    assert by_name["img1"]["kind"] == "image" and by_name["img1"]["num_frames"] == 1
    assert by_name["tall/clip_000"]["num_frames"] == 13 and by_name["tall/clip_000"]["start_s"] == 0
    assert all(cache[i]["mean"].shape == tuple(e["latent_shape"]) for i, e in enumerate(cache.entries))


def _launch(script, *args, env=None):
    return subprocess.Popen([sys.executable, str(HARNESS / script), *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _lora(run_dir):
    return jax.tree_util.tree_map(np.asarray, runs.load_run_lora(run_dir)[0])


@pytest.mark.slow
def test_mixed_cache_trains_in_batches_of_2_and_resumes_bit_for_bit_after_sigkill(root, mixed, tmp_path):
    cache, steps = mixed[0], 10  # 4 batches per epoch: 2 of images, 1 of wide videos, 1 of the tall video
    # a persistent compilation cache: the runs after the first load the 3 compiled steps instead of compiling
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    straight = _launch("bucket_train.py", root, cache, tmp_path / "straight", steps, 2, env=env)
    out, _ = straight.communicate(timeout=900)
    assert straight.returncode == 0, out[-5000:]
    compiles = [line for line in out.splitlines() if "compiled the step for batch" in line]
    assert len(compiles) == 3, out  # one compile per latent shape
    assert {line.split("batch ")[1].split("]")[0] + "]" for line in compiles} == {
        "[2, 12, 1, 6, 10]", "[2, 12, 2, 6, 10]", "[2, 12, 3, 10, 6]"}
    assert "6 training clips in 3 latent shape(s), batches of 2, 4 batches per epoch" in out
    metrics = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, steps + 1)) and all(np.isfinite(m["loss"]) for m in metrics)
    assert sum(m.get("compiles", 0) for m in metrics) == 3
    assert all(("steps_per_s" in m) != ("compiles" in m) for m in metrics)  # compile steps are not in steps/s

    run = tmp_path / "killed"
    proc = _launch("bucket_train.py", root, cache, run, steps, 2, 7, env=env)  # SIGKILLed after 7 batches
    out1, _ = proc.communicate(timeout=900)
    assert proc.returncode == -signal.SIGKILL and "killing myself after 7 batches" in out1, out1[-5000:]
    assert not (run / "lora.safetensors").exists()
    resumed = _launch("bucket_train.py", root, cache, run, steps, 2, env=env)
    out2, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0 and "resumed from" in out2, out2[-5000:]
    jax.tree_util.tree_map(np.testing.assert_array_equal, _lora(tmp_path / "straight"), _lora(run))


@pytest.mark.slow
def test_mixed_cache_trains_in_batches_of_4_on_a_data2_fsdp2_mesh(root, mixed, tmp_path):
    cache = mixed[0]
    proc = _launch("bucket_mesh_check.py", root, cache, tmp_path / "mesh", 3,
                   env=dict(os.environ, JAX_PLATFORMS="cpu"))
    out, _ = proc.communicate(timeout=900)
    line = [x for x in out.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and line, out[-5000:]
    r = json.loads(line[0][len("RESULT "):])
    assert r["mesh"] == {"data": 2, "fsdp": 2, "sequence": 1, "tensor": 1}
    # batches of 4: one of each shape per epoch (3 images; 2 wide videos; the tall one, repeated to fill)
    assert r["epoch_batches"] == 3
    assert sorted(tuple(p["shape"]) for p in r["plan"]) == [(12, 1, 6, 10), (12, 2, 6, 10), (12, 3, 10, 6)]
    assert {i for p in r["plan"] for i in p["clips"]} == set(range(6))  # the epoch saw the whole cache
    assert all(len(p["clips"]) == 4 for p in r["plan"])
    assert [m["step"] for m in r["metrics"]] == [1, 2, 3] and all(np.isfinite(m["loss"]) for m in r["metrics"])
    assert sum(m.get("compiles", 0) for m in r["metrics"]) == 3
    assert out.count("compiled the step for batch [4, 12,") == 3


@pytest.mark.slow
def test_an_image_only_style_lora_prepares_trains_and_samples(root, tmp_path):
    src = tmp_path / "style"
    src.mkdir()
    for k in range(3):
        picture(src / f"p{k}.png", WIDE, (40 + 60 * k, 200, 90))
    long_caption = " ".join(["a painting of moving shapes in bright colours"] * 40)  # well over 256 tokens
    rows = [{"file_name": "p0.png", "text": "a painting of a circle"}, {"file_name": "p1.png", "text": long_caption},
            {"file_name": "p2.png", "text": "a painting of a green ball"}, {"file_name": "lost.jpg", "text": "x"},
            {"file_name": "junk.webp", "text": "y"}]
    (src / "junk.webp").write_bytes(b"RIFF\x00\x00\x00\x00WEBPbroken")
    (src / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    report = prepare(root, src, tmp_path / "cache", trigger="mystyle", previews=True)
    assert report["new"] == ["p0", "p1", "p2"]
    reasons = {s["source"].rsplit("/", 1)[-1]: s["reason"] for s in report["skipped"]}
    assert reasons["metadata.jsonl:4 (lost.jpg)"].startswith("missing file: lost.jpg")
    assert reasons["junk.webp"].startswith("unreadable")
    assert [t["name"] for t in report["truncated"]] == ["p1"] and report["truncated"][0]["tokens"] > 256
    cache = Cache(tmp_path / "cache")
    assert cache.latent_shapes() == {(12, 1, 6, 10)}
    assert [e["caption"] for e in cache.entries][0] == "mystyle a painting of a circle"
    assert (tmp_path / "cache" / "previews" / "p0.png").is_file()

    cfg = lora_config.demo(lora_config.get_config(), str(root))
    del cfg.demo
    cfg.cache, cfg.run_dir, cfg.steps, cfg.batch_size = str(tmp_path / "cache"), str(tmp_path / "run"), 4, 2
    cfg.checkpoint.every, cfg.validation.every, cfg.validation.holdout = 4, 0, 0
    trainer.train(cfg)
    assert (tmp_path / "run" / "lora.safetensors").is_file()

    s = sample_config.get_config("demo")
    del s.demo
    s.model.update(dict(cfg.model))
    s.sampling.num_frames, s.sampling.steps = 1, 2
    s.prompt, s.out_dir, s.loras = "mystyle a painting of a circle", str(tmp_path / "samples"), str(tmp_path / "run")
    (path,) = sample_cmd.run(s)
    assert read_clip(path, 1, size=WIDE).shape == (1, *WIDE, 3)
