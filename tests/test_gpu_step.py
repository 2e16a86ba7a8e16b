"""benchmarks/gpu_step.py at --size small on the CPU (its JSON, not its timings), the FLOP model against
XLA's cost analysis and the issue's 10 B figures, the time budget's skips and the missing-diffusers path."""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mochi_jax.lib.flops import flop_breakdown, flops_per_step
from mochi_jax.models.dit import DiTConfig

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_step.py"
sys.path.insert(0, str(SCRIPT.parent))
import gpu_step  # noqa: E402

# XLA counts elementwise FLOPs (norms, RoPE, softmax, loss, AdamW) that the model leaves out: ~1 % at the
# small size, less at the real one.
XLA_TOL = 0.03
TORCH = all(importlib.util.find_spec(m) for m in ("torch", "diffusers", "peft"))
RUN_FIELDS = ("side", "frames", "policy", "status", "estimate_s", "wall_s", "setup_s", "first_step_s",
              "warmup_times_s", "step_times_s", "median_s", "min_s", "steps", "peak_bytes", "memory", "flops",
              "tflops", "frac_peak", "floor_s", "loss_first", "loss_last", "lora_params", "versions")


def _run(tmp_path, *flags, timeout=240):
    out = tmp_path / "gpu_step.json"
    # codegen at -O0: the timings mean nothing on a shared CPU anyway, and compiles take a third of the time
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0",
               PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, str(SCRIPT), "--size", "small", "--out", str(out), *flags], env=env,
                       capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(out.read_text()), p.stdout


@pytest.mark.slow
def test_small_run_on_cpu(tmp_path):
    res, stdout = _run(tmp_path, "--frames", "7", "--warmup", "1")
    for k in ("benchmark", "size", "budget_s", "total_wall_s", "settings", "model", "device", "versions",
              "diffusers", "flops", "anchors", "runs", "ratios", "skipped"):
        assert k in res, k
    assert res["settings"]["policies"] == ["full", "auto", "save:attn"] and res["settings"]["steps"] == 10
    assert res["device"]["platform"] == "cpu" and res["model"]["params"] > 0
    assert res["total_wall_s"] <= res["budget_s"]
    runs = {(r["side"], r["policy"]): r for r in res["runs"]}
    assert set(runs) == {("jax", "full"), ("jax", "auto"), ("jax", "save:attn"), ("torch", "gradient checkpointing"),
                         ("jax", "render"), ("torch", "render")}
    # remat='auto''s picks are recorded for the full-size model only
    assert runs["jax", "auto"]["status"] == "skipped" and "aot_remat.json" in runs["jax", "auto"]["reason"]

    for policy in ("full", "save:attn"):
        r = runs["jax", policy]
        assert r["status"] == "ok", r.get("reason")
        for k in RUN_FIELDS + ("compile_s", "xla", "params"):
            assert k in r, (policy, k)
        assert r["steps"] == len(r["step_times_s"]) == 10 and r["compile_s"] > 0 and r["first_step_s"] > 0
        assert min(r["step_times_s"]) > 0 and r["median_s"] >= r["min_s"] > 0 and r["tflops"] > 0
        assert r["flops"] == res["flops"]["7"][policy]["total"]
        assert r["memory"]["host_peak_rss"] > 0 and r["memory"]["xla"]["temp"] > 0
        assert r["loss_first"] > 0 and r["loss_last"] > 0
        x = r["xla"]
        # the step that ran is scanned: XLA counts the loop body once, and so does as_xla_counts
        assert abs(x["compiled_ratio"] - 1) < XLA_TOL, x
        # every block counted: the unrolled step's pre-optimisation HLO against the model (forward+backward
        # alone under 'none', and with the policy's recompute)
        for pol, check in x["unrolled"].items():
            assert abs(check["ratio"] - 1) < XLA_TOL, (pol, check)
        assert set(x["unrolled"]) == ({"full", "none"} if policy == "full" else {policy})
    assert runs["jax", "save:attn"]["flops"] < runs["jax", "full"]["flops"]

    t = runs["torch", "gradient checkpointing"]
    if TORCH:
        assert t["status"] == "ok", t.get("reason")
        for k in RUN_FIELDS + ("lora_layers",):
            assert k in t, k
        assert min(t["step_times_s"]) > 0 and t["median_s"] > 0 and t["steps"] == 10
        depth = res["model"]["depth"]
        assert t["lora_layers"] == 8 * (depth - 1) + 7  # no to_add_out in the last block, none in the pooler
        assert {q["policy"] for q in res["ratios"]} == {"full", "save:attn"}
        assert all(q["speedup"] > 0 for q in res["ratios"])
        assert "diffusers" in res["versions"] and "jax" in res["versions"]
    else:
        assert t["status"] == "skipped" and t["reason"]
    assert "diffusers+PEFT" in stdout and "ours, remat full" in stdout

    # one render per side: 64 steps with guidance, then the tiled decode (several tiles at 64x96) to host frames
    assert res["settings"]["render"]["frames"] == [7] and res["settings"]["render"]["steps"] == 64
    for side in ("jax", "torch") if TORCH else ("jax",):
        r = runs[side, "render"]
        assert r["status"] == "ok", r.get("reason")
        assert r["video_shape"] == [1, 7, 64, 96, 3] and 0 < r["video_mean"] < 1
        assert r["render_s"] == pytest.approx(r["denoise_s"] + r["decode_s"]) and r["decode_s"] > 0
        assert r["step_s"] == pytest.approx(r["denoise_s"] / 64) and r["warmup_denoise_s"] > 0
        assert r["flops"] == res["render_flops"]["7"]["total"] > 0 and r["tflops"] > 0
    assert runs["jax", "render"]["params"] == res["model"]["params"] and runs["jax", "render"]["vae_params"] > 0
    if TORCH:
        (q,) = res["render_ratios"]
        assert q["frames"] == 7 and q["speedup"] > 0 and q["denoise_speedup"] > 0 and q["decode_speedup"] > 0
        assert "diffusers MochiPipeline" in stdout and "x the speed of diffusers' MochiPipeline" in stdout
    assert "Render: one video, 64 steps" in stdout and "ours, sample's path" in stdout


def test_flop_model_full_size():
    """The issue's figures: ~4.7e14 FLOP at 37 frames without recompute, ~6.7e14 with full recompute,
    0.59 s and 0.84 s at 800 TFLOP/s."""
    cfg = DiTConfig(attention="cudnn")  # the defaults are the 10 B model
    none, full = (flops_per_step(cfg, 37, 480, 848, r) for r in ("none", "full"))
    assert none / 800e12 == pytest.approx(0.59, abs=0.005) and full / 800e12 == pytest.approx(0.84, abs=0.005)
    b = flop_breakdown(cfg, 37, 480, 848, "full")
    assert b["visual_tokens"] == 7 * 1590 and b["recompute"] == pytest.approx(b["forward"], rel=0.01)
    assert none < flops_per_step(cfg, 37, 480, 848, "dots_no_batch") < full
    # remat groups: all blocks in one group equals the plain policy; a split lies between its parts
    assert flops_per_step(cfg, 37, 480, 848, "full:47") == full
    mixed = flops_per_step(dataclasses.replace(cfg, remat="full", remat_groups="dots_no_batch:20,full:27"),
                           37, 480, 848)
    assert flops_per_step(cfg, 37, 480, 848, "dots_no_batch") < mixed < full
    # 'dots' keeps every dot and the attention (cuDNN's residuals): nothing is recomputed on either backend
    assert flops_per_step(dataclasses.replace(cfg, attention="xla"), 37, 480, 848, "dots") == none
    assert flops_per_step(cfg, 37, 480, 848, "dots") == none
    # 'save:attn' recomputes the matmuls, not the attention: one attention forward (4 S^2 D) per block less
    # than 'full' with cuDNN, half of it with XLA attention (its backward recomputes QK^T)
    s, d = b["visual_tokens"] + b["text_tokens"], cfg.width
    assert full - flops_per_step(cfg, 37, 480, 848, "save:attn") == cfg.depth * 4 * s * s * d
    xla_cfg = dataclasses.replace(cfg, attention="xla")
    assert (flops_per_step(xla_cfg, 37, 480, 848, "full") - flops_per_step(xla_cfg, 37, 480, 848, "save:attn")
            == cfg.depth * 2 * s * s * d)
    # what XLA counts of the scanned cuDNN step: one block per scan, no attention
    xla = flop_breakdown(cfg, 37, 480, 848, "full", as_xla_counts=True)
    assert xla["total"] < full / 40 and xla["attention_forward"] > 0
    assert [flops_per_step(cfg, f, 480, 848, "full") for f in (37, 61, 85)] == sorted(
        flops_per_step(cfg, f, 480, 848, "full") for f in (37, 61, 85))


def test_budget_skips_everything(tmp_path):
    res, stdout = _run(tmp_path, "--budget", "1", "--policies", "dots_no_batch,dots:1,full:1,full@int8+host",
                       timeout=120)
    assert res["settings"]["policies"] == ["full", "dots_no_batch", "dots:1,full:1", "full@int8+host"]
    # two clip lengths x (4 of ours + diffusers), and a render per side at 7 frames
    assert len(res["runs"]) == 2 * 5 + 2 and all(r["status"] == "skipped" and r["reason"] for r in res["runs"])
    assert len(res["skipped"]) == 12 and all(r["estimate_s"] > 1 for r in res["runs"] if r["side"] == "jax")
    assert "skipped" in stdout
    # in order of importance: the first clip length's 'full' against diffusers, then the renders
    order = [(r["side"], r["frames"], r["policy"]) for r in res["runs"]]
    assert order[:5] == [("jax", 7, "full"), ("torch", 7, "gradient checkpointing"), ("jax", 7, "render"),
                         ("torch", 7, "render"), ("jax", 7, "dots_no_batch")]


def test_renders_only(tmp_path):
    """--frames '' times renders alone, at each --render-frames length (skipped here: a 1 s budget)."""
    res, stdout = _run(tmp_path, "--frames", "", "--render-frames", "7,13", "--budget", "1", timeout=120)
    assert [(r["side"], r["frames"], r["policy"]) for r in res["runs"]] == [
        ("jax", 7, "render"), ("torch", 7, "render"), ("jax", 13, "render"), ("torch", 13, "render")]
    assert res["flops"] == {} and set(res["render_flops"]) == {"7", "13"}
    assert res["render_flops"]["13"]["total"] > res["render_flops"]["7"]["total"]
    assert "LoRA train step" not in stdout and "Render: one video" in stdout


def test_auto_runs_the_recorded_picks(tmp_path):
    """--policies auto times, per clip length, what remat='auto' picked for the full-size model on an H100
    (benchmarks/aot_tables.py remat); the committed table has the issue's two goals."""
    table = {"cells": {"auto@40GB/37": {"remat": "dots:9,save:attn:38"}, "full/37": {"remat": "full"},
                       "auto@60GB/85": {"remat": "save:attn"}}}
    (tmp_path / "t.json").write_text(json.dumps(table))
    assert gpu_step.auto_picks("full", tmp_path / "t.json") == {37: "dots:9,save:attn:38", 85: "save:attn"}
    assert gpu_step.auto_picks("small", tmp_path / "t.json") == {}
    assert set(gpu_step.auto_picks("full")) == {37, 85}
    res, _ = _run(tmp_path, "--budget", "1", "--policies", "auto", timeout=120)
    assert sorted((r["frames"], r["policy"]) for r in res["runs"] if r["side"] == "jax") == [
        (7, "auto"), (7, "full"), (7, "render"), (13, "auto"), (13, "full")]


def test_base_settings_of_a_policy():
    """'full@int8+host' runs remat full on an int8 base with host-streamed blocks (the 24 GB settings)."""
    cfg = gpu_step.dit_config("small", "full@int8+host", "xla")
    assert (cfg.remat, cfg.param_dtype, cfg.weights_on_host) == ("full", "int8", True)
    assert gpu_step.remat_of("dots_no_batch@float8_e4m3fn") == "dots_no_batch"
    assert gpu_step.dit_config("small", "dots:1,full:1", "xla").remat_groups == "dots:1,full:1"


def test_missing_diffusers_names_the_wheels(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: None if m == "diffusers" else real(m, *a))
    d = gpu_step.diffusers_status()
    assert not d["available"] and "diffusers==0.42.1" in d["reason"]
    assert d["wheels"][0] == dict(requirement="diffusers==0.42.1", installed=None, pure_python=True)
    gpu_step.print_wheel_help(d)
    assert "pip download" in capsys.readouterr().out
    with pytest.raises(ValueError, match="count"):
        gpu_step.parse_policies("dots:10", 47)


# what a GPU host with jax, flax, optax, orbax, torch, transformers and peft lacks: our children must not need it
NOT_ON_A_BARE_GPU_HOST = ("ml_collections", "grain", "tensorboardX", "imageio", "imageio_ffmpeg", "sentencepiece",
                          "matplotlib", "PIL", "diffusers", "wandb")


def test_our_runs_import_only_what_a_bare_gpu_host_has():
    """The jax children (train step and render) import with the tokenizer, video, config and logging
    packages unavailable: the GPU host runs them without carried wheels."""
    code = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {NOT_ON_A_BARE_GPU_HOST!r}:
            raise ImportError("not on the GPU host: " + name)
sys.meta_path.insert(0, Block())
sys.path[:0] = [{str(REPO)!r}, {str(SCRIPT.parent)!r}]
import gpu_step
from mochi_jax.lib import flops, sampling, training
from mochi_jax.models import dit, lora, sharding, vae
assert gpu_step.dit_config("full", "full", "cudnn").depth == 48 and gpu_step.vae_config("full").latent_channels == 12
"""
    p = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]


def test_presets_without_ml_collections(monkeypatch):
    """The GPU host may lack ml_collections: the presets are then read from configs/dit.py's source."""
    want = gpu_step.preset("mochi")
    import configs

    monkeypatch.setitem(sys.modules, "configs.dit", None)  # makes `from configs import dit` raise ImportError
    monkeypatch.delattr(configs, "dit", raising=False)
    got = gpu_step.preset("mochi")
    assert "param_dtype" not in got  # read from the source, not from get_config
    assert {k: want[k] for k in got} == got and got["depth"] == 48 and got["num_heads"] == 24
    assert gpu_step.dit_config("full", "full", "cudnn") == DiTConfig(attention="cudnn")
