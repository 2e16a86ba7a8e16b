"""What people look at: the evaluation's report.html (opened in headless Chromium: the grid of
videos where the page puts it, the tables), the run's curves.png, the validation videos in
tensorboard.

The report is built from tiny synthetic clips, each one solid colour of its own, so that the
screenshot says which video (or its poster) is drawn where."""

import html.parser
import io
import json
import os
import shutil
import struct
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from tensorboardX.proto import event_pb2

from mochi_jax.lib import plots, report as R
from mochi_jax.lib.trainer import RunLog
from mochi_jax.lib.video import write_image, write_mp4

VARIANTS = ["base", "lora_a", "lora_b"]
PROMPTS = ["a red ball bounces", "a blue square slides"]
SEEDS = [0, 1]
H, W, T = 32, 48, 5  # the clips: shown at 240 x 160 (report.display_size)
COLOURS = {  # (prompt, seed, variant) -> its clip's colour
    (0, 0, "base"): (230, 30, 30), (0, 0, "lora_a"): (30, 200, 30), (0, 0, "lora_b"): (30, 30, 230),
    (0, 1, "base"): (230, 230, 30), (0, 1, "lora_a"): (230, 30, 230), (0, 1, "lora_b"): (30, 220, 230),
    (1, 0, "base"): (240, 140, 30), (1, 0, "lora_a"): (140, 30, 230), (1, 0, "lora_b"): (30, 130, 230),
    (1, 1, "base"): (130, 230, 30), (1, 1, "lora_a"): (130, 60, 60), (1, 1, "lora_b"): (30, 120, 100),
}
METRICS = ["clip_t", "flicker"]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


CHROMIUM = find_chromium()


def chromium(*args, tmp: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
           f"--user-data-dir={tmp / 'chromium-profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _fake_run(folder: Path, variants=("",), steps=range(10, 110, 10), val_every=50) -> Path:
    """A training run's metrics.jsonl: interval losses, lr, and validation losses every val_every."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}\n")  # a run directory has its config
    rows = []
    for s in steps:
        row = {"step": s}
        for k, name in enumerate(variants):
            pre = f"variant/{name}/" if name else ""
            row.update({f"{pre}loss": 1.0 / (1 + 0.01 * s * (k + 1)), f"{pre}grad_norm": 0.1,
                        f"{pre}lr": 1e-3 * (1 - s / 120) * (k + 1)})
        rows.append(row)
        if s % val_every == 0:
            rows.append({"step": s, **{(f"variant/{n}/val_loss" if n else "val_loss"): 1.1 / (1 + 0.01 * s)
                                       for n in variants}})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A report as evaluate writes it: videos, posters, report.json's dict, curves, report.html."""
    root = tmp_path_factory.mktemp("report")
    out = root / "eval"
    run_a = _fake_run(root / "run_a")  # no curves.png: drawn from its metrics.jsonl
    run_b = _fake_run(root / "run_b")
    plots.plot_curves(plots.read_rows(run_b / "metrics.jsonl"), run_b / "curves.png", title="run_b")  # copied
    records = []
    rng = np.random.default_rng(0)
    for p, prompt in enumerate(PROMPTS):
        for seed in SEEDS:
            for v in VARIANTS:
                clip = np.broadcast_to(np.array(COLOURS[(p, seed, v)], np.uint8), (T, H, W, 3)).copy()
                rel = f"videos/{v}/{p + 1:02d}_{R.file_slug(prompt)}_seed{seed}.mp4"
                write_mp4(out / rel, clip, fps=8)
                write_image(out / R.poster_of(rel), clip[0])
                records.append({"variant": v, "prompt_index": p, "prompt": prompt, "seed": seed, "video": rel,
                                "metrics": {m: float(rng.uniform(0.2, 0.9)) for m in METRICS}})
    variants = [SimpleNamespace(name="base", source=None, strength=1.0),
                SimpleNamespace(name="lora_a", source=str(run_a), strength=1.0),
                SimpleNamespace(name="lora_b", source=str(run_b / "lora.safetensors"), strength=0.5)]
    summary, deltas = R.summarize(records, variants, PROMPTS, METRICS)
    report = R.json_safe({
        "settings": {"sampling": {"num_frames": T, "height": H, "width": W, "steps": 4, "guidance": 6.0}},
        "prompts": PROMPTS, "seeds": SEEDS, "metrics": METRICS,
        "variants": [{"name": v.name, "lora": v.source, "strength": v.strength if v.source else None}
                     for v in variants],
        "summary": summary, "deltas": deltas, "videos": records, "sheets": [],
        "curves": R.training_curves(variants)})
    written = R.write_curves(report["curves"], out)
    page = R.write_html(report, out / "report.html")
    return SimpleNamespace(root=root, out=out, page=page, report=report, curves=written, run_b=run_b)


def test_the_page_links_every_video_poster_and_curve_relatively(built):
    """Without a browser: every <video> has its mp4 and poster (relative, existing), autoplay muted
    loop, the metric tables and the curves of both LoRA runs are there, nothing points outside."""
    page = built.page.read_text()
    tags = _tags(page)
    videos = [a for t, a in tags if t == "video"]
    assert len(videos) == len(PROMPTS) * len(SEEDS) * len(VARIANTS)
    for a in videos:
        assert {"autoplay", "muted", "loop"} <= set(a), a
        for key in ("src", "poster"):
            assert not a[key].startswith(("/", "file:", "http")) and (built.out / a[key]).is_file(), a
    assert [a["src"] for a in videos][:3] == [f"videos/{v}/01_a_red_ball_bounces_seed0.mp4" for v in VARIANTS]
    assert sum(1 for t, a in tags if t == "table" and "metrics" in a.get("class", "")) >= 4
    assert "<script" not in page.lower()
    entries = {Path(e["run"]).name: e for e in built.report["curves"]}
    assert entries["run_a"]["from"] == "metrics.jsonl" and entries["run_b"]["from"] == "curves.png"
    assert entries["run_a"]["variants"] == ["lora_a"] and entries["run_b"]["variants"] == ["lora_b"]
    imgs = [a["src"] for t, a in tags if t == "img"]
    assert sorted(imgs) == ["curves/run_a.png", "curves/run_b.png"]
    assert R.training_run(built.root / "loose.safetensors") is None  # a LoRA file outside any run
    assert (built.out / "curves/run_b.png").read_bytes() == (built.run_b / "curves.png").read_bytes()
    Image.open(built.out / "curves/run_a.png").verify()
    assert not list(built.out.glob(".*tmp*")), "a temporary file was left behind"


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH or at /usr/bin/chromium "
                                             "(.ci/run installs Debian's chromium)")
def test_chromium_shows_the_video_grid_and_the_tables(built, tmp_path):
    """Headless Chromium's screenshot of report.html: every video cell (its poster, or the video
    itself if the browser decodes H.264: the same solid colour) is drawn at its display size, the
    cells of one seed in a row in variant order, seeds and prompts top to bottom; the DOM Chromium
    built holds the tables and the 12 videos."""
    url = built.page.absolute().as_uri()
    shot = tmp_path / "shot.png"
    t0 = time.time()
    done = chromium(f"--screenshot={shot}", "--window-size=1200,2400", "--virtual-time-budget=3000", url,
                    tmp=tmp_path)
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    image = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    found = {}
    for key, colour in COLOURS.items():
        mask = np.all(np.abs(image - np.array(colour)) <= 24, axis=-1)
        ys, xs = np.nonzero(mask)
        assert len(ys) > 0.8 * 240 * 160, (key, len(ys), f"screenshot: {shot}")
        box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert abs((box[2] - box[0]) - 240) <= 3 and abs((box[3] - box[1]) - 160) <= 3, (key, box)
        found[key] = box
    for p in range(len(PROMPTS)):
        for seed in SEEDS:
            row = [found[(p, seed, v)] for v in VARIANTS]
            assert all(abs(b[1] - row[0][1]) <= 2 for b in row), row  # one row
            assert all(a[2] < b[0] for a, b in zip(row, row[1:])), row  # base, lora_a, lora_b left to right
        for v in VARIANTS:  # seed 1 under seed 0, in the same column
            a, b = found[(p, 0, v)], found[(p, 1, v)]
            assert a[3] < b[1] and abs(a[0] - b[0]) <= 2, (a, b)
    assert found[(0, 1, "base")][3] < found[(1, 0, "base")][1]  # prompt 2's grid under prompt 1's
    # the first prompt's grid sits under the page's summary tables, on the first screen
    assert 300 < found[(0, 0, "base")][1] < 900, found[(0, 0, "base")]

    dom = chromium("--dump-dom", url, tmp=tmp_path).stdout
    tags = _tags(dom)
    assert sum(1 for t, _ in tags if t == "video") == 12
    assert sum(1 for t, a in tags if t == "table" and "metrics" in a.get("class", "")) >= 4
    assert "Change against the base" in dom and "lora_b" in dom
    print(f"chromium: screenshot and DOM in {time.time() - t0:.1f}s")


class _Tags(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, {k: (v if v is not None else "") for k, v in attrs}))


def _tags(text: str) -> list[tuple[str, dict]]:
    parser = _Tags()
    parser.feed(text)
    return parser.tags


# ----------------------------------------------------------------------------- curves.png

def _png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB")).astype(int)


def _has_colour(image, hex_colour: str, at_least: int = 50) -> bool:
    c = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
    return int(np.all(np.abs(image - c) <= 30, axis=-1).sum()) >= at_least


def test_curves_png_is_written_and_redrawn_as_the_run_logs(tmp_path):
    """RunLog draws curves.png at its rows (atomically: no temporary file left), redraws it as
    more come (a validation row at once), and a resumed log draws the rows it kept."""
    log = RunLog(tmp_path).open(0)
    log.plot_share = 1.0  # every row redraws
    curves = tmp_path / plots.CURVES
    for s in (10, 20, 30):
        log.write(s, {"loss": 1.0 / s, "grad_norm": 0.1, "lr": 1e-3})
    first = curves.read_bytes()
    stamp = curves.stat().st_mtime_ns
    _png(curves)
    time.sleep(0.01)
    log.write(30, {"val_loss": 0.05, "val_loss/sigma_0.5": 0.05})
    log.write(40, {"loss": 0.02, "grad_norm": 0.1, "lr": 5e-4})
    assert curves.stat().st_mtime_ns > stamp and curves.read_bytes() != first
    log.close()
    image = _png(curves)
    assert image.shape[1] >= 600 and image.shape[0] >= 400
    assert _has_colour(image, "#1f77b4")  # the line
    assert not list(tmp_path.glob(".*tmp*"))

    # the default share: fast rows are drawn together, and close() draws what is left
    log = RunLog(tmp_path).open(40)
    before = curves.read_bytes()
    for s in range(41, 60):
        log.write(s, {"loss": 0.01, "lr": 1e-4})
    log.close()
    assert curves.read_bytes() != before


def test_curves_png_from_a_metrics_jsonl_has_a_line_per_sweep_variant(tmp_path):
    rows = plots.read_rows(_fake_run(tmp_path / "one") / "metrics.jsonl")
    assert list(plots.series(rows)) == [""] and set(plots.series(rows)[""]) == {"loss", "val_loss", "lr"}
    one = _png(plots.plot_curves(rows, tmp_path / "one.png"))
    assert _has_colour(one, "#1f77b4") and not _has_colour(one, "#ff7f0e")
    run = _fake_run(tmp_path / "sweep", variants=("r4", "r8"))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 110, "variant/r4/lo')  # a torn last line is passed over
    rows = plots.read_rows(run / "metrics.jsonl")
    s = plots.series(rows)
    assert list(s) == ["r4", "r8"] and s["r8"]["val_loss"][0] == [50, 100]
    sweep = _png(plots.plot_curves(rows, run / plots.CURVES, title="sweep"))
    assert _has_colour(sweep, "#1f77b4") and _has_colour(sweep, "#ff7f0e")  # one colour per variant
    assert plots.plot_curves([{"step": 1, "steps_per_s": 3.0}], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


# ----------------------------------------------------------------------------- tensorboard

def _events(tb_dir: Path) -> list:
    """The events of every event file (TFRecords: length, its crc, the Event, its crc), in file order,
    with the steps a purge (SessionLog.START at step s) drops removed, as tensorboard reads them."""
    seen = []
    for path in sorted(tb_dir.iterdir()):
        data, i = path.read_bytes(), 0
        while i < len(data):
            n = struct.unpack("<Q", data[i:i + 8])[0]
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                seen = [e for e in seen if e.step < event.step]
            seen.append(event)
    return seen


def _images(tb_dir: Path) -> list[tuple[str, int, bytes]]:
    return [(v.tag, e.step, v.image.encoded_image_string) for e in _events(tb_dir) for v in e.summary.value
            if v.HasField("image")]


def test_validation_videos_go_to_tensorboard_as_animated_gifs_tagged_by_prompt(tmp_path):
    prompts = ["A red ball bounces!", "a blue square"]
    colours = [(220, 40, 40), (40, 60, 220)]
    ramp = np.arange(6)[:, None, None, None] * 4  # frames that differ (a GIF merges equal ones)
    paths = [write_mp4(tmp_path / "samples" / f"step000010_prompt{i}_seed{7 + i}.mp4",
                       (np.broadcast_to(np.array(c), (6, 48, 80, 3)) + ramp).astype(np.uint8), fps=12)
             for i, c in enumerate(colours)]
    log = RunLog(tmp_path, prompts=prompts).open(0)
    log.write(10, {"loss": 1.0})
    log.videos(10, [str(p) for p in paths])
    log.write(10, {"val_loss": 0.5})
    log.mark_validated(10)
    log.close()
    images = _images(tmp_path / "tensorboard")
    assert [(tag, step) for tag, step, _ in images] == [("val_video/0_a_red_ball_bounces", 10),
                                                        ("val_video/1_a_blue_square", 10)]
    for (_, _, gif), colour in zip(images, colours):
        with Image.open(io.BytesIO(gif)) as im:
            assert im.format == "GIF" and im.n_frames == 6 and im.size == (80, 48)
            assert im.info.get("loop") == 0 and 70 <= im.info.get("duration", 0) <= 95  # 12 fps
            frame = np.asarray(im.convert("RGB")).astype(int)
            assert np.abs(frame - np.array(colour)).max() <= 12

    # resumed from step 10, whose validation had finished: the purge of step 10's events takes the
    # videos too, and they are given again (once); a resume that redoes the validation drops them
    RunLog(tmp_path, prompts=prompts).open(10).close()
    assert [(tag, step) for tag, step, _ in _images(tmp_path / "tensorboard")] == [
        ("val_video/0_a_red_ball_bounces", 10), ("val_video/1_a_blue_square", 10)]
    RunLog(tmp_path, prompts=prompts).open(10, redo_validation=True).close()
    assert _images(tmp_path / "tensorboard") == []


def test_video_tags_and_scaling():
    assert plots.video_tag("run/samples/step000200_prompt1_seed5.mp4", ["x", "A cat, walking"]) == \
        "val_video/1_a_cat_walking"
    assert plots.video_tag("run/samples/r8/step000200_prompt0_seed5.mp4", ["dog"]) == "variant/r8/val_video/0_dog"
    assert plots.video_tag("run/samples/other.mp4") is None
    assert plots.fit_within(480, 848, 320) == (182, 320) and plots.fit_within(48, 80, 320) == (48, 80)
