"""Every script in benchmarks/ runs as the docs show it: `python benchmarks/<script>.py`, here from a
folder outside the repository and without PYTHONPATH, at its smallest setting (`--smoke`: a step or two
at tiny shapes), its JSON written to a temporary folder (`--out`), never into benchmarks/results/. Each
test checks that the JSON has the fields docs/ quotes from the committed results; the timings of a
smoke run mean nothing. Scripts that need an absent compiler or reference library are skipped with the
reason (the `test` extra installs torch, diffusers, transformers, peft and libtpu)."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
RESULTS = BENCHMARKS / "results"
pytestmark = pytest.mark.slow


def _missing(*modules):
    return [m for m in modules if importlib.util.find_spec(m) is None]


def need(*modules):
    missing = _missing(*modules)
    return pytest.mark.skipif(bool(missing), reason=f"{', '.join(missing)} not installed (pip install -e '.[test]')")


need_torch = need("torch", "diffusers", "peft")
# every script this file runs; test_every_script_is_run keeps the list complete
SCRIPTS = {"aot_tables", "convert_memory", "dit_step", "gpu_step", "prepare_throughput", "quant_accuracy",
           "sample_mesh", "sample_step", "scaling", "sweep_cost", "t5", "train_step", "vae"}


@pytest.fixture(scope="module", autouse=True)
def results_untouched():
    """No smoke run writes into benchmarks/results/ (the committed numbers stay as measured)."""
    def state():
        return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in RESULTS.iterdir()}

    before = state()
    yield
    assert state() == before


def run(tmp_path, script, *flags, timeout=300):
    """`python benchmarks/<script>.py <flags>` from an empty folder outside the repository, without
    PYTHONPATH, on the CPU (codegen at -O0: a smoke run's timings mean nothing, and compiles are faster)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")
    p = subprocess.run([sys.executable, str(BENCHMARKS / f"{script}.py"), *flags], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{script} {' '.join(flags)}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    assert not any(cwd.iterdir()), f"{script} wrote into the working directory: {sorted(cwd.iterdir())}"
    return p.stdout


def smoke(tmp_path, script, *flags, timeout=300):
    """The script at --smoke, its JSON in tmp_path: (the JSON, stdout)."""
    out = tmp_path / f"{script}.json"
    stdout = run(tmp_path, script, "--smoke", "--out", str(out), *flags, timeout=timeout)
    return json.loads(out.read_text()), stdout


def has(d, *keys):
    for k in keys:
        assert k in d, (k, sorted(d))


def test_every_script_is_run():
    assert {p.stem for p in BENCHMARKS.glob("*.py")} == SCRIPTS


@need_torch
def test_dit_step(tmp_path):
    res, _ = smoke(tmp_path, "dit_step")
    has(res, "device", "step", "compile_s", "compile_ratio_48_over_4")
    # the docs: the speed-up against torch, at its thread count; compile time at depth 4 vs 48
    has(res["step"], "speedup", "torch_threads", "jax_median_s", "torch_median_s", "jax_compile_s", "tokens")
    assert res["step"]["speedup"] > 0 and set(res["compile_s"]) == {"4", "48"}


@need_torch
def test_train_step(tmp_path):
    res, _ = smoke(tmp_path, "train_step")
    has(res, "sides", "torch_best", "ratios", "batch", "latent_shape", "timed_steps", "load_average")
    # the docs: the speed-up against the faster torch run, first-step losses on the same noise agreeing to
    # 1e-7, XLA's compiled footprint, and the compiler's host RSS (first step against after the model)
    has(res["ratios"], "steps_per_s", "rss_peak_lifetime", "first_loss_rel_diff")
    assert res["ratios"]["first_loss_rel_diff"] < 1e-4
    ours = res["sides"]["mochi_jax (jit)"]
    has(ours, "steps_per_s", "examples_per_s", "xla_bytes", "rss_after_model", "rss_first_step",
        "rss_peak_lifetime", "compile_s")
    assert ours["xla_bytes"]["temp_argument_output"] > 0
    has(res["sides"][res["torch_best"]], "steps_per_s", "threads", "rss_peak_lifetime")


@need_torch
def test_sample_step(tmp_path):
    res, _ = smoke(tmp_path, "sample_step")
    # the docs: s per CFG step, ours vs MochiPipeline at its faster thread count, the speed-up, the final
    # latents' agreement
    has(res, "ours_step_median_s", "diffusers", "diffusers_best_threads", "speedup", "final_latents_rel_l2")
    has(res["diffusers"][str(res["diffusers_best_threads"])], "step_median_s", "loop_step_median_s")
    assert res["final_latents_rel_l2"] < 1e-4


@need_torch
def test_vae(tmp_path):
    res, _ = smoke(tmp_path, "vae")
    has(res, "speed", "memory")
    for r in res["speed"]["rows"]:
        has(r, "op", "jax_s", "torch_s", "torch_over_jax", "rel_l2_vs_torch")
        assert r["rel_l2_vs_torch"] < 1e-3
    assert {(r["op"], r["tiled"]) for r in res["memory"]["rows"]} == {(op, t) for op in ("encode", "decode")
                                                                     for t in (False, True)}
    assert all(r["peak_gib"] > 0 for r in res["memory"]["rows"])


@need("torch", "transformers", "sentencepiece")
def test_t5(tmp_path):
    res, _ = smoke(tmp_path, "t5")
    has(res, "ours_median_s", "transformers_median_s", "speedup", "relative_l2", "ours_first_call_s")
    assert res["relative_l2"] < 1e-4


@need("torch")
def test_convert_memory(tmp_path):
    res, _ = smoke(tmp_path, "convert_memory", "--workdir", str(tmp_path / "work"))
    # the docs: the conversion's peak host memory against the largest tensor and the checkpoint's size
    has(res, "checkpoint_bytes", "largest_source_tensor_bytes", "largest_output_leaf_bytes_bf16",
        "baseline_peak_rss_bytes", "convert_peak_rss_bytes", "convert_seconds")
    assert not (tmp_path / "work").exists()  # the generated checkpoint is removed


def test_prepare_throughput(tmp_path):
    res, stdout = smoke(tmp_path, "prepare_throughput", "--work-dir", str(tmp_path / "work"))
    # the docs' table: clips/s, speed-up and stage times per path; identical caches; the resize timing
    assert [r["workers"] for r in res["runs"]][0] == 0 and len(res["runs"]) >= 2
    for r in res["runs"]:
        has(r, "clips_per_s", "speedup", "stages", "steady_s", "load_1min")
        assert r["scaler"] == "ffmpeg"
    assert res["max_cache_difference"] == 0
    has(res["resize_1_frame"], "banded_s", "dense_einsum_s", "max_difference")
    # the scalers: numpy (before) vs ffmpeg at the same threads, the ratio, and how close the caches and frames are
    assert [c["workers"] for c in res["scalers"]] == [1] and res["scale_flags"]
    for c in res["scalers"]:
        assert c["numpy"]["scaler"] == "numpy" and c["numpy"]["clips"] == res["clips"]
        has(c["numpy"], "clips_per_s", "stages", "load_1min")
        has(c["ffmpeg"], "clips_per_s", "stages")
        assert c["ratio"] == pytest.approx(c["ffmpeg"]["clips_per_s"] / c["numpy"]["clips_per_s"])
        for k in ("mean", "logvar"):
            has(c["latents"][k], "max", "mean", "mean_abs_value")
            assert 0 <= c["latents"][k]["mean"] <= c["latents"][k]["max"]
        assert c["latents"]["t5_feats_max"] == 0  # the captions are the same text
    assert [(f["bucket"], f["clips"]) for f in res["frames"]] == [([16, 16], 2), ([480, 848], 1)]
    assert all(f["mean"] < 3 for f in res["frames"])
    for k in ("plus_minus_1", "ffmpeg_scaler"):  # the VAE's latent change for a nudge, beside the scalers' change
        has(res["latent_noise_floor"][k], "frames_mean", "latent_max", "latent_mean")
    assert "ffmpeg clips/s" in stdout and "ratio" in stdout


def test_quant_accuracy(tmp_path):
    res, stdout = smoke(tmp_path, "quant_accuracy")
    # the docs' table per config and base: output error, LoRA loss start -> end, on the bf16 base, delta
    for r in res["configs"].values():  # --smoke leaves float8 out (int8's code, compiled once more)
        assert set(r["formats"]) == {"bfloat16", "int8", "bfloat16, LoRA seed 2"}
        for v in r["formats"].values():
            has(v, "output_rel_l2_vs_fp32", "loss_start", "loss_end", "on_bf16_base_loss_end", "transfer_delta_rel_l2")
    assert "delta err" in stdout
    # --show prints the table of a saved file
    assert "delta err" in run(tmp_path, "quant_accuracy", "--show", "--out", str(tmp_path / "quant_accuracy.json"))


def test_scaling(tmp_path):
    res, _ = smoke(tmp_path, "scaling")
    # the docs: FSDP's examples/s against data parallelism's, the 10 B model's analytical memory per device at
    # 37 / 85 / 163 frames, and the formula against XLA's compiled memory
    rows = res["weak_scaling"]["rows"]
    assert {"data1", "data2", "fsdp2"} <= set(rows)
    for r in rows.values():
        has(r, "examples_per_s", "ratio_to_1", "efficiency", "compile_s")
    for f in (37, 85, 163):
        has(res["memory"]["rows"][f"1/{f}"], "total_flash", "total_xla", "fits_H100_flash")
    for mesh in res["xla_check"]["meshes"].values():
        assert all(0.5 < mesh[d]["ratio"] < 2 for d in ("4", "8"))


def test_sweep_cost(tmp_path):
    res, _ = smoke(tmp_path, "sweep_cost")  # the small size only: the full size needs the CUDA plugin, minutes
    # the docs: per K the speed-up against K separate runs, and the memory of the sweep against K runs
    assert set(res["small"]["sweeps"]) == {"1", "2"}  # --smoke: K = 1, 2
    for c in res["small"]["sweeps"].values():
        has(c, "s_per_step", "s_per_variant_step", "speedup", "sweep_bytes", "separate_side_by_side_bytes")


def test_sample_mesh(tmp_path):
    out = tmp_path / "sample_mesh.json"
    run(tmp_path, "sample_mesh", "--smoke", "--out", str(out))
    r = json.loads(out.read_text())
    assert set(r["meshes"]) == {"one device", "fsdp 2 x sequence 4"}
    for row in r["meshes"].values():
        assert row["step_s"] > 0 and row["x_first"] > 0 and row["rel_err"] < 1e-4


def test_aot_tables_show(tmp_path):
    """`show` prints docs/fit.md's tables from the committed JSON (nothing compiled, nothing written)."""
    stdout = run(tmp_path, "aot_tables", "show")
    for line in ("GPU: total per GPU", "TPU: the full-size train step per chip", "GPU memory (GiB per GPU",
                 "Remat on one H100", "Long clips on small cards"):
        assert line in stdout
    # the offload table: 163 frames on one RTX 4090 with the blocks' inputs in host memory, within 22 GiB,
    # where remat full is not; PCIe bytes are the weights and inputs there and back
    cells = json.loads((ROOT / "benchmarks/results/aot_offload.json").read_text())["cells"]
    offload, full = cells["rtx4090/fp8+host/offload/163"], cells["rtx4090/fp8+host/full/163"]
    assert offload["fits"] and offload["total_bytes"] < 22 * (1 << 30) < full["total_bytes"]
    assert offload["host_bytes"] > full["host_bytes"] + 20 * (1 << 30)  # ~24 GiB of block inputs moved out
    assert re.search(r"rtx4090/fp8\+host/offload/163 +8\.13 +17\.74 +yes +33\.12", stdout), stdout


@need("libtpu")
def test_aot_tables_tpu_cell(tmp_path):
    """One cell of the TPU table compiled for a tiny model (the full-size cells take minutes each), into
    a folder of its own; `show --results` reads it back."""
    stdout = run(tmp_path, "aot_tables", "tpu", "--smoke", "--results", str(tmp_path))
    cells = json.loads((tmp_path / "aot_tpu.json").read_text())["cells"]
    assert len(cells) == 1
    (key, r), = cells.items()
    has(r, "total_bytes", "limit_bytes", "fits", "compile_s", "overrides")
    assert r["overrides"]["aot.model"] == "tiny" and r["fits"]
    assert key in stdout
    assert "smallest slice that fits" in run(tmp_path, "aot_tables", "show", "--results", str(tmp_path))


def test_gpu_step(tmp_path):
    """No GPU here: --size small with a 1 s budget skips every run, and still writes the whole JSON
    (tests/test_gpu_step.py runs the small size for real)."""
    out = tmp_path / "gpu_step.json"
    stdout = run(tmp_path, "gpu_step", "--size", "small", "--budget", "1", "--frames", "7", "--out", str(out))
    res = json.loads(out.read_text())
    has(res, "benchmark", "size", "budget_s", "settings", "model", "device", "versions", "diffusers", "flops",
        "anchors", "runs", "ratios", "skipped")
    assert res["runs"] and all(r["status"] == "skipped" and r["reason"] for r in res["runs"])
    assert "skipped" in stdout
