"""`python -m mochi_jax.evaluate` end to end on tiny random models: the report, batched rendering
against sampling.denoise, no recompilation when LoRAs are swapped, and every input error raised
before anything is rendered."""

import json
import math
import os
import signal
from pathlib import Path

import jax
import numpy as np
import pytest

import eval_ref
from compiles import compiled_functions
from mochi_jax import evaluate
from mochi_jax.lib import variants as variants_lib
from mochi_jax.checkpoints import lora_format, lora_read
from mochi_jax.checkpoints.runs import load_run_lora
from mochi_jax.lib import cache, sampling
from mochi_jax.lib import report as report_lib
from mochi_jax.demo import write_demo_clip, write_demo_models
from mochi_jax.models.lora import LoraTarget
from mochi_jax.lib.stopping import Stopped
from mochi_jax.lib.video import evenly_spaced, write_mp4

ALL_METRICS = ["clip_t", "clip_score", "consecutive_consistency", "subject_consistency", "flicker", "clip_i",
               "style"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    models = root / "models"
    write_demo_models(models)
    write_demo_clip(root / "clip", root / "clip_tokenizer")
    (root / "prompts.txt").write_text("# two prompts\na red ball bounces\n\n  a blue square slides  \n")
    rng = np.random.default_rng(0)
    refs = [write_mp4(root / "ref_videos" / f"r{i}.mp4", rng.integers(0, 256, (9, 32, 48, 3), np.uint8))
            for i in range(2)]
    cache.write_manifest(root / "ref_cache", {
        "format": cache.FORMAT, "empty_prompt": cache.EMPTY_PROMPT,
        "clips": [{"name": r.stem, "file": f"clips/{r.stem}.safetensors", "source": str(r), "num_frames": 7,
                   "latent_shape": [12, 2, 4, 6]} for r in refs]})
    loras = {k: eval_ref.genmo_file(root / f"{k}.safetensors", seed) for k, seed in (("a", 1), ("b", 2), ("c", 3))}
    return root, models, loras


@pytest.mark.slow
def test_end_to_end_and_no_recompile(setup, capsys):
    root, models, loras = setup
    cfg = eval_ref.eval_config(root, models, [loras["a"], loras["b"]], references=str(root / "ref_cache"),
                               style_prompt="bright colours")
    report = evaluate.run(cfg)
    out = Path(cfg.out_dir)
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    names = ["base", "a", "b"]
    assert [v["name"] for v in report["variants"]] == names and report["metrics"] == ALL_METRICS
    assert report["prompts"] == ["a red ball bounces", "a blue square slides"] and report["seeds"] == [0, 1]
    assert len(report["videos"]) == 3 * 2 * 2
    for r in report["videos"]:
        assert sorted(r["metrics"]) == sorted(ALL_METRICS) and all(map(math.isfinite, r["metrics"].values()))
        assert (out / r["video"]).stat().st_size > 0
    for v in names:
        for stats in [report["summary"][v]["all"], *report["summary"][v]["per_prompt"]]:
            assert set(stats) == set(ALL_METRICS) and all(s["ci95"] is not None for s in stats.values())
    assert sorted(report["deltas"]) == ["a", "b"]
    # deltas are paired differences: their mean is the difference of the means
    d = report["deltas"]["a"]["all"]["clip_t"]["mean"]
    assert d == pytest.approx(report["summary"]["a"]["all"]["clip_t"]["mean"]
                              - report["summary"]["base"]["all"]["clip_t"]["mean"], abs=1e-12)
    assert [(out / s).is_file() for s in report["sheets"]] == [True, True]
    from PIL import Image

    sheet = Image.open(out / report["sheets"][0])
    assert sheet.height == 2 * 3 * (32 + 4) + 4  # (seed, variant) rows of 32-pixel thumbnails
    md = (out / "report.md").read_text()
    assert "Change against the base" in md and report["sheets"][1] in md
    printed = capsys.readouterr().out
    assert "LoRA - base (paired)" in printed and "\na " in printed and "\nb " in printed
    # the HTML page: every video with its poster (the first frame), the tables; no training runs here
    page = (out / "report.html").read_text()
    for r in report["videos"]:
        assert f'src="{r["video"]}"' in page and (out / report_lib.poster_of(r["video"])).is_file()
    assert page.count("<video ") == 12 and 'class="metrics"' in page and report["curves"] == []
    assert str(out / "report.html") in printed

    # another LoRA of the same shapes, in another slot: nothing is compiled again, and the
    # videos shared with the first run (same prompt, seed, LoRA) are the same
    with compiled_functions() as compiled:
        again = evaluate.run(eval_ref.eval_config(root, models, [loras["c"], loras["a"]], out="out2",
                                                  references=str(root / "ref_cache"), style_prompt="bright colours"))
    assert not [n for n in compiled if "step" in n], compiled
    first = {(r["variant"], r["prompt_index"], r["seed"]): r["metrics"] for r in report["videos"]}
    for r in again["videos"]:
        if r["variant"] in ("base", "a"):
            for m, x in r["metrics"].items():
                assert x == pytest.approx(first[(r["variant"], r["prompt_index"], r["seed"])][m], abs=1e-6)


@pytest.mark.slow
def test_batched_equals_each_lora_alone(setup):
    """The vmapped step over [base, a, b, a run with other layers and rank] = sampling.denoise
    with each LoRA as loaded (the base without any), and so does one-at-a-time rendering."""
    from mochi_jax.checkpoints import load_dit

    root, models, loras = setup
    mlp = {"qkv": dict(pattern=r"attn/qkv_x$", rank=3, alpha=1.5), "mlp": dict(pattern=r"mlp_x/w1$", rank=1,
                                                                              alpha=1.0)}
    run = eval_ref.run_dir(root / "run_mlp", seed=7, lora_cfg=mlp)
    cfg, params = load_dit(models / "dit", compute_dtype="float32", remat="none")
    shapes = variants_lib.param_shapes(cfg)
    variants = [variants_lib.Variant("base")] + [variants_lib.load_variant(p, s, cfg, shapes)
                                             for p, s in ((loras["a"], 1.0), (loras["b"], 0.5), (run, 1.0))]
    stacked, targets = variants_lib.stack_adapters(variants)
    ranks = {t.pattern: t.rank for t in targets}  # the union of the layers, each at its largest rank
    assert ranks["^blocks/attn/qkv_x$"] == 3 and ranks["^blocks/attn/qkv_y$"] == 2
    assert ranks["^blocks/mlp_x/w1$"] == ranks["^last_block/mlp_x/w1$"] == 1 and len(ranks) == 9

    rng = np.random.default_rng(0)
    feats = rng.standard_normal((2, 2, 6, cfg.t5_dim)).astype(np.float32)
    mask = np.ones((2, 2, 6), bool)
    mask[:, :, 4:] = False
    cond, uncond = (feats[0], mask[0]), (feats[1], mask[1])
    noise = sampling.initial_noise([3, 4], sampling.latent_shape(7, 32, 48))
    sigmas = sampling.sigma_schedule(3)
    batched = np.asarray(variants_lib.denoise_variants(cfg, params, stacked, targets, noise, cond, uncond, sigmas, 4.0))
    alone = np.asarray(variants_lib.denoise_variants(cfg, params, stacked, targets, noise, cond, uncond, sigmas, 4.0,
                                                 batched=False))
    a_tree, a_targets, _ = lora_read.load_lora(loras["a"], cfg=cfg)
    b_tree, b_targets, _ = lora_read.load_lora(loras["b"], cfg=cfg)
    assert b_targets == a_targets  # strength 0.5 = b halved (and no new compilation for the reference)
    b_half = (jax.tree_util.tree_map(lambda x: x, b_tree), b_targets)
    for node in (b_half[0]["blocks"]["attn"], b_half[0]["last_block"]["attn"]):
        for layer in node.values():
            layer["b"] = 0.5 * layer["b"]
    refs = [None, (a_tree, a_targets), b_half, load_run_lora(run)]
    assert batched.shape == (4, 2, *noise.shape[1:])
    for k, lora in enumerate(refs):
        ref = np.asarray(sampling.denoise(cfg, params, noise, cond, uncond, sigmas, 4.0, lora=lora))
        scale = np.abs(ref).max()
        np.testing.assert_allclose(batched[k], ref, rtol=0, atol=2e-5 * scale, err_msg=f"variant {k}")
        np.testing.assert_allclose(alone[k], ref, rtol=0, atol=2e-5 * scale, err_msg=f"variant {k}")
        print(f"variant {k}: max |batched - alone| / max |alone| = {np.abs(batched[k] - ref).max() / scale:.1e}")
    assert np.abs(batched[1] - batched[0]).max() > 1e-3 * scale  # the LoRAs do change the result
    # the padded targets really are one structure: rank-padding zeros, scale 1
    assert all(isinstance(t, LoraTarget) and t.scale == 1.0 for t in targets)
    assert np.all(jax.tree_util.tree_leaves(variants_lib.variant_adapter(stacked, 0))[0] == 0)


def _expect(cfg, monkeypatch, exc, *needles):
    monkeypatch.setattr(evaluate, "denoise_variants", _fail)
    monkeypatch.setattr(sampling, "denoise", _fail)
    with pytest.raises(exc) as e:
        evaluate.run(cfg)
    for n in needles:
        assert str(n) in str(e.value), (n, str(e.value))
    assert not Path(cfg.out_dir).exists()


def _fail(*args, **kwargs):
    raise AssertionError("rendering started before the inputs were checked")


def test_errors_before_rendering(setup, tmp_path, monkeypatch):
    root, models, loras = setup

    def cfg(loras_=(loras["a"],), **kw):
        return eval_ref.eval_config(root, models, loras_, out="bad_" + "_".join(sorted(kw)) + f"_{len(loras_)}", **kw)

    _expect(cfg(clip=str(tmp_path / "no_clip")), monkeypatch, FileNotFoundError, tmp_path / "no_clip")
    (tmp_path / "junk_clip").mkdir()
    (tmp_path / "junk_clip" / "weights.bin").write_bytes(b"junk")
    _expect(cfg(clip=str(tmp_path / "junk_clip")), monkeypatch, ValueError, "cannot be read", tmp_path / "junk_clip")
    _expect(cfg(clip_tokenizer=str(tmp_path)), monkeypatch, FileNotFoundError, "no CLIP tokenizer", tmp_path)
    (tmp_path / "empty.txt").write_text("\n  \n# only a comment\n")
    _expect(cfg(prompt_file=str(tmp_path / "empty.txt")), monkeypatch, ValueError, "no prompts",
            tmp_path / "empty.txt")
    _expect(cfg(dit=str(tmp_path / "no_dit")), monkeypatch, FileNotFoundError, "dit", tmp_path / "no_dit")
    (tmp_path / "no_videos").mkdir()
    _expect(cfg(references=str(tmp_path / "no_videos")), monkeypatch, ValueError, "no videos",
            tmp_path / "no_videos")

    wide = eval_ref.other_base(head_dim=8)
    foreign = eval_ref.genmo_file(tmp_path / "foreign.safetensors", 4, cfg=wide)
    _expect(cfg((loras["a"], foreign)), monkeypatch, lora_format.LoraFormatError, foreign, "blocks.0.attn.qkv_x")
    _expect(cfg((loras["a"], tmp_path / "nowhere.safetensors")), monkeypatch, FileNotFoundError,
            tmp_path / "nowhere.safetensors")
    empty_run = eval_ref.run_dir(tmp_path / "run_empty", seed=None)
    _expect(cfg((empty_run,)), monkeypatch, FileNotFoundError, empty_run / "checkpoints", "no complete checkpoint")
    foreign_run = eval_ref.run_dir(tmp_path / "run_foreign", seed=5, cfg=wide)
    _expect(cfg((foreign_run,)), monkeypatch, lora_format.LoraFormatError, foreign_run, "do not fit")


def test_reference_videos(setup, tmp_path):
    root, _, _ = setup
    from_cache = evaluate.reference_videos(root / "ref_cache")
    assert [(v.name, n) for v, n in from_cache] == [("r0.mp4", 7), ("r1.mp4", 7)]
    assert [v.name for v, _ in evaluate.reference_videos(root / "ref_videos", limit=1)] == ["r0.mp4"]
    frames = evaluate.read_references(from_cache, 7, 3, 30, (32, 48))
    assert frames.shape == (6, 32, 48, 3) and frames.dtype == np.uint8
    assert evenly_spaced(7, 3).tolist() == [0, 3, 6] and evenly_spaced(2, 5).tolist() == [0, 1]
    broken = tmp_path / "cache"
    cache.write_manifest(broken, {"format": cache.FORMAT, "empty_prompt": cache.EMPTY_PROMPT, "clips": [
        {"name": "gone", "file": "clips/gone.safetensors", "source": str(tmp_path / "gone.mp4"),
         "latent_shape": [12, 2, 4, 6]}]})
    with pytest.raises(FileNotFoundError, match="gone.mp4"):
        evaluate.reference_videos(broken)


def _without_timing(report):
    return {k: v for k, v in report.items() if k not in ("timing", "settings")}


@pytest.mark.slow
def test_killed_evaluation_resumes_without_rendering_twice(setup, monkeypatch):
    """An evaluation killed after its first batch, rerun: only the other batches are rendered, the
    finished videos are not rewritten, and the report equals an uninterrupted run's (but timing);
    other settings render anew."""
    root, models, loras = setup
    full = evaluate.run(eval_ref.eval_config(root, models, [loras["a"]], out="resume"))
    out = Path(full["settings"]["out_dir"])
    stamps = {r["video"]: (out / r["video"]).stat().st_mtime_ns for r in full["videos"]}
    sheets = {s: (out / s).read_bytes() for s in full["sheets"]}
    parts = sorted((out / evaluate.PARTS).glob("*.npz"))
    assert len(parts) == 4  # 2 prompts x 2 seeds, one seed per batch
    parts[-1].unlink()  # as if killed while rendering the last batch
    (out / "report.json").unlink()

    calls, real = [], evaluate.denoise_variants
    monkeypatch.setattr(evaluate, "denoise_variants", lambda *a, **k: calls.append(1) or real(*a, **k))
    resumed = evaluate.run(eval_ref.eval_config(root, models, [loras["a"]], out="resume"))
    assert len(calls) == 1 and resumed["timing"]["batches_resumed"] == 3
    assert _without_timing(resumed) == _without_timing(full)
    assert json.loads((out / "report.json").read_text())["videos"] == full["videos"]
    last = {r["video"] for r in full["videos"] if r["prompt_index"] == 1 and r["seed"] == 1}
    for video, stamp in stamps.items():  # finished videos untouched, the missing batch's rewritten
        assert ((out / video).stat().st_mtime_ns == stamp) == (video not in last), video
    assert {s: (out / s).read_bytes() for s in resumed["sheets"]} == sheets

    calls.clear()  # other settings: nothing is taken from the parts
    other = evaluate.run(eval_ref.eval_config(root, models, [loras["a"]], out="resume", seeds="0,2"))
    assert len(calls) == 4 and other["timing"]["batches_resumed"] == 0


@pytest.mark.slow
def test_a_stop_signal_keeps_the_finished_batches(setup, monkeypatch):
    """SIGTERM while the second batch renders: Stopped (exit status 75) at once, the first batch kept
    in .parts, and the rerun renders the three others only."""
    root, models, loras = setup
    calls, real = [], evaluate.denoise_variants

    def denoise_term_at_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(evaluate, "denoise_variants", denoise_term_at_second)
    cfg = eval_ref.eval_config(root, models, [loras["a"]], out="signal")
    with pytest.raises(Stopped, match=r"stopped by SIGTERM with 1 of 4 batches rendered \(kept in .*signal/\.parts\); "
                                      r"rerun the same command to render the rest"):
        evaluate.run(cfg)
    out = Path(cfg.out_dir)
    assert len(list((out / evaluate.PARTS).glob("*.npz"))) == 1 and not (out / "report.json").exists()
    calls.clear()
    monkeypatch.setattr(evaluate, "denoise_variants", lambda *a, **k: calls.append(1) or real(*a, **k))
    report = evaluate.run(eval_ref.eval_config(root, models, [loras["a"]], out="signal"))
    assert len(calls) == 3 and report["timing"]["batches_resumed"] == 1 and len(report["videos"]) == 8
