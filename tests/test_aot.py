"""The ahead-of-time fit check (`python -m mochi_jax.aot`): a tiny model's programs compiled for TPU
topologies (libtpu, the `test` extra) and NVIDIA GPUs (the CUDA plugin, when installed) on this CPU,
with the compiler's memory per device, and the exit status 0 fits / 1 does not fit / 2 bad input.
Each command runs in its own process: JAX_PLATFORMS and XLA_FLAGS must be set before jax starts."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mochi_jax.aot import fit, report, targets

ROOT = Path(__file__).resolve().parents[1]
GIB = 1 << 30

need_tpu = pytest.mark.skipif(not targets.have_compiler("tpu"),
                              reason="libtpu is not installed (pip install -e '.[test]' or '.[tpu]')")
need_cuda = pytest.mark.skipif(
    not targets.have_compiler("cuda"),
    reason="the CUDA compiler plugin is not installed (pip install -e '.[cuda]', several GB)")


def aot(*flags, timeout=600):
    """`python -m mochi_jax.aot *flags`. On a TPU target the DiT's attention is 'xla' unless the flags say:
    'auto' picks splash there, whose Pallas kernels take over a minute to compile even at the demo's size
    (tests/test_splash.py checks the kernel; test_auto_attention_follows_the_platform the choice)."""
    tpu = any(f.startswith("--config.aot.target=v") for f in flags)
    if tpu and not any("prepare.py" in f or "model.attention" in f for f in flags):
        flags = (*flags, "--config.model.attention=xla")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "mochi_jax.aot", *flags], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


# ----------------------------------------------------------------------------- TPU


@pytest.mark.slow
@need_tpu
def test_tiny_train_step_compiles_for_a_tpu_slice(tmp_path):
    out = tmp_path / "report.json"
    p = aot("--config=configs/lora.py:demo", "--config.aot.target=v5p-8", "--config.batch_size=4",
            f"--config.aot.json={out}")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "train step on TPU v5p slice v5p:2x2x1 (4 chips" in p.stdout
    assert re.search(r"^FITS: [\d.]+ GiB of 95\.\d\d GiB per chip", p.stdout, re.M), p.stdout
    r = json.loads(out.read_text())
    assert r["mesh"] == {"data": 4, "fsdp": 1, "sequence": 1, "tensor": 1} and r["num_devices"] == 4
    for k in ("argument_bytes", "output_bytes", "temp_bytes", "alias_bytes", "code_bytes", "total_bytes",
              "limit_bytes", "compile_s"):
        assert r[k] > 0, k
    assert r["total_bytes"] == (r["argument_bytes"] + r["output_bytes"] - r["alias_bytes"] + r["temp_bytes"]
                                + r["code_bytes"])
    # the train state is donated: its update is written into it; only the 3 scalar metrics are new (TPU tiles pad them)
    state = r["inputs"]["train state (donated)"]
    assert r["alias_bytes"] >= state and r["output_bytes"] - r["alias_bytes"] < 4096
    assert r["argument_bytes"] >= sum(r["inputs"].values())
    assert r["fits"] and 95 * GIB < r["limit_bytes"] < 96 * GIB  # the compiler's own limit for a v5p chip


@pytest.mark.slow
@need_tpu
def test_absurd_clip_on_a_small_chip_does_not_fit():
    p = aot("--config=configs/lora.py:demo", "--config.aot.target=v5e-1", "--config.aot.num_frames=163",
            "--config.aot.height=480", "--config.aot.width=848")
    assert p.returncode == 1, p.stdout + p.stderr
    m = re.search(r"^DOES NOT FIT: the compiler needs at least ([\d.]+) GiB of 15\.75 GiB per chip", p.stdout, re.M)
    assert m and float(m.group(1)) > 15.75, p.stdout
    assert "RESOURCE_EXHAUSTED" in p.stdout  # the compiler's own words are shown


@pytest.mark.slow
@need_tpu
def test_over_a_given_memory_does_not_fit_with_the_numbers():
    # prepare's T5 (the demo's tiny one) against a fake 0.1 MiB device
    p = aot("--config=configs/prepare.py:demo", "--config.aot.what=t5", "--config.aot.target=v5e-1",
            "--config.aot.memory_gib=0.0001")
    assert p.returncode == 1, p.stdout + p.stderr
    assert "T5 encode on TPU v5e" in p.stdout and "captions 8 x 256 tokens" in p.stdout
    m = re.search(r"^DOES NOT FIT: ([\d.]+) GiB of 0\.00 GiB per chip, ([\d.]+) GiB over", p.stdout, re.M)
    assert m, p.stdout
    assert re.search(r"total +[\d.]+ MiB +of 0\.00 GiB \(--config\.aot\.memory_gib\)", p.stdout), p.stdout


@need_tpu
def test_sampler_step_compiles():
    p = aot("--config=configs/sample.py:demo", "--config.aot.target=v6e-1")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "sampler step on TPU v6e" in p.stdout and "guidance 6: both branches, DiT batch 2" in p.stdout


@pytest.mark.slow
@need_tpu
def test_sample_and_eval_fit_checks_shard_the_sampler_over_the_command_mesh(tmp_path):
    """The sampler step of configs/sample.py and configs/eval.py compiles on the command's mesh:
    FSDP over 8 chips holds an eighth of the weights per chip; an evaluation stacks its variants."""
    def report(config, *flags):
        out = tmp_path / f"{len(list(tmp_path.iterdir()))}.json"
        p = aot(f"--config={config}", f"--config.aot.json={out}", *flags)
        assert p.returncode == 0, p.stdout + p.stderr
        return json.loads(out.read_text()), p.stdout

    small = ("--config.aot.model=small", "--config.aot.num_frames=7", "--config.aot.height=32", "--config.aot.width=48")
    one, _ = report("configs/sample.py", "--config.aot.target=v5e-1", *small)
    eight, _ = report("configs/sample.py", "--config.aot.target=v5e-8", *small)
    assert one["mesh"]["fsdp"] == 1 and eight["mesh"] == {"data": 1, "fsdp": 8, "sequence": 1, "tensor": 1}
    ratio = eight["inputs"]["weights"] / one["inputs"]["weights"]
    assert 1 / 8 <= ratio < 1 / 8 * 1.05, ratio  # norms and biases stay whole
    assert eight["resident"]["VAE weights"] > 0  # the VAE's weights wait on every chip
    split, out = report("configs/sample.py", "--config.aot.target=v5e-8", "--config.mesh.data=2",
                        "--config.mesh.fsdp=4", *small)
    assert split["mesh"]["data"] == 2 and "note" not in out
    ev, out = report("configs/eval.py:demo", "--config.loras=", "--config.aot.target=v5e-4", "--config.batch_size=2")
    assert ev["mesh"] == {"data": 1, "fsdp": 4, "sequence": 1, "tensor": 1}
    assert "base and 0 LoRA(s) stacked" in out and "DiT batch 4" in out


@need_tpu
def test_the_validation_fit_check_takes_the_largest_shape_and_the_sweeps_loras(tmp_path):
    """--config.aot.what=sample on a training config compiles the validation renders as the trainer makes them:
    one batch per clip shape (the largest: 2 videos of 19 frames, not 3 of the default 13), and a sweep's LoRAs
    all rendered together from the same noise."""
    prompts = '["a cat", {"prompt": "a dog", "num_frames": 19}, {"prompt": "a fox", "num_frames": 19}]'
    reports = {}
    for preset in ("demo", "sweep_demo"):
        out = tmp_path / f"{preset}.json"
        p = aot(f"--config=configs/lora.py:{preset}", "--config.aot.what=sample", "--config.aot.target=v5e-1",
                f"--config.validation.prompts={prompts}", f"--config.aot.json={out}", timeout=300)
        assert p.returncode == 0, p.stdout + p.stderr
        assert "clip     2 x 19 frames 48x80" in p.stdout and "the largest of 2 shapes: 2 of 3 prompts" in p.stdout
        reports[preset] = json.loads(out.read_text()), p.stdout
    (one, _), (sweep, out) = reports["demo"], reports["sweep_demo"]
    assert "x 3 LoRAs of the sweep rendered together" in out
    # the sweep's stacked LoRAs (ranks 2, 4, 4 padded to the union's rank 4): three times the demo's rank-4 LoRA
    assert sweep["inputs"]["LoRA"] == 3 * one["inputs"]["LoRA"] > 0
    p = aot("--config=configs/lora.py:demo", "--config.aot.what=sample", "--config.aot.target=v5e-1",
            '--config.validation.prompts=[{"prompt": "a cat", "num_frames": 20}]', timeout=300)
    assert p.returncode == 2 and "validation.prompts[0]['num_frames'] must be 6k+1" in p.stderr, p.stderr


# ----------------------------------------------------------------------------- GPU


@pytest.mark.slow
@need_cuda
def test_tiny_train_step_compiles_for_an_h100(tmp_path):
    out = tmp_path / "report.json"
    p = aot("--config=configs/lora.py", "--config.aot.model=tiny", "--config.aot.target=h100",
            "--config.model.attention=cudnn", "--config.aot.num_frames=7", "--config.aot.height=32",
            "--config.aot.width=32", f"--config.aot.json={out}")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "train step on 1 x NVIDIA H100 80GB HBM3" in p.stdout and "attention cudnn" in p.stdout
    r = json.loads(out.read_text())
    assert r["argument_bytes"] > 0 and r["temp_bytes"] > 0 and r["fits"]
    assert r["limit_bytes"] == int(targets.GPUS["h100"].memory_bytes * 0.75)


# ----------------------------------------------------------------------------- bad input


RERUNS_SCRIPT = """
import json, sys
from mochi_jax.aot import targets
targets.compile_only_environment()
from mochi_jax.aot import fit
from mochi_jax.configs import lora
out = {}
for policy in ("full", "save:attn", "dots"):
    cfg = lora.get_config("demo")
    cfg.aot.target, cfg.model.attention, cfg.model.remat = sys.argv[1], sys.argv[2], policy
    cfg.model.param_dtype = cfg.model.compute_dtype = "bfloat16"  # cuDNN takes bf16
    cfg.aot.num_frames, cfg.aot.height, cfg.aot.width = 7, 64, 64
    r = fit.check(cfg)
    out[policy] = [r.attention_reruns, "reruns the attention" in r.format()]
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.parametrize("target, attention", [pytest.param("v5e-1", "splash", marks=need_tpu),
                                               pytest.param("h100", "cudnn", marks=need_cuda)])
def test_keeping_attn_skips_the_attention_forward_in_the_backward(target, attention):
    """The compiled train step (tiny DiT): the backward pass's layer loop reruns the fused kernel's
    forward under 'full', and not under 'save:attn' or 'dots', which keep its output and softmax
    statistics (naming only the output used to keep it and rerun the kernel anyway)."""
    p = subprocess.run([sys.executable, "-c", RERUNS_SCRIPT, target, attention], cwd=ROOT, capture_output=True,
                       text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    reruns = json.loads(p.stdout.strip().splitlines()[-1])
    # [reruns, whether the printed report suggests keeping the attention]
    assert reruns == {"full": [1, True], "save:attn": [0, False], "dots": [0, False]}, reruns


@pytest.mark.parametrize("flags, words", [
    (["--config.aot.target=v9-8"], "unknown TPU generation 'v9'"),
    (["--config.aot.target=h100", "--config.aot.what=t5"], "needs a prepare config"),
    (["--config.aot.target=h100", "--config.aot.num_frames=36"], "num_frames must be 6k+1"),
    (["--config.aot.tagret=h100"], "aot has no field 'tagret'; did you mean aot.target?"),
])
def test_bad_input_is_one_line_and_exit_2(flags, words):
    p = aot("--config=configs/lora.py", *flags)
    assert p.returncode == 2, p.stdout + p.stderr
    lines = [line for line in p.stderr.splitlines() if line.startswith("mochi_jax.aot:")]
    assert len(lines) == 1 and words in lines[0], p.stderr
    assert "FIT" not in p.stdout


@need_tpu
def test_a_program_the_compiler_cannot_build_is_one_line_and_exit_2():
    """TPU's compiler cannot slice host-held blocks one row at a time (model.weights_on_host): its refusal is
    one line naming it, not a traceback."""
    p = aot("--config=configs/lora.py", "--config.aot.target=v5e-1", "--config.aot.model=tiny",
            "--config.model.weights_on_host=True")
    assert p.returncode == 2, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mochi_jax.aot: the TPU compiler refused the program: "), p.stderr


# ----------------------------------------------------------------------------- in process


def test_target_names():
    t = targets.parse_target("v5e-16")
    assert (t.platform, t.topology, t.num_devices, t.num_hosts) == ("tpu", "v5e:4x4", 16, 4)
    t = targets.parse_target("v5p-8")  # TensorCores: 4 chips, one host
    assert (t.topology, t.num_devices, t.num_hosts, t.accelerator_type) == ("v5p:2x2x1", 4, 1, "v5p-8")
    assert targets.parse_target("v6e-8").num_hosts == 1 and targets.parse_target("v6e-8").topology == "v6e:2x4"
    assert targets.parse_target("v5p-32").topology == "v5p:2x2x4"
    assert targets.parse_target("v4-128").topology == "v4:4x4x4"
    assert targets.parse_target("v5p:2x4x4").num_devices == 32
    g = targets.parse_target("h100-16")
    assert (g.platform, g.topology, g.num_devices, g.num_hosts) == ("cuda", "1x2x8", 16, 2)
    assert targets.parse_target("rtx4090").num_devices == 1 and targets.parse_target("a100").kind == "a100-80gb"
    for bad in ("v5e-12", "v5p-7", "v9-8", "b200", ""):
        with pytest.raises(targets.TargetError):
            targets.parse_target(bad)


def test_gpu_target_configs():
    for name, facts in targets.GPUS.items():
        text = targets.gpu_target_config(facts)
        assert f"device_memory_size: {facts.memory_bytes}" in text and 'platform_name: "CUDA"' in text
        assert "collective_memory_granularity" not in text  # this jaxlib's proto has no such field
        major, minor = facts.compute_capability
        assert f"cuda_compute_capability {{ major: {major} minor: {minor} }}" in text


def test_a_target_config_file(tmp_path):
    f = tmp_path / "card.txtpb"
    f.write_text(targets.gpu_target_config(targets.GPUS["h200"]).replace("NVIDIA H200", "my card"))
    t = targets.parse_target("gpu-2", target_config=str(f))
    assert (t.num_devices, t.nominal_bytes, t.gpu.description) == (2, targets.GPUS["h200"].memory_bytes, "my card")


def test_compiler_refusals_are_read():
    assert report.parse_out_of_memory("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for "
                                   "HLO temporaries (75.13G) exceeds available HBM (15.75G).") == (
        int(75.13 * GIB), int(15.75 * GIB), True)  # temporaries only: the arguments come on top
    assert report.parse_out_of_memory("XLA:TPU compile permanent error. Ran out of memory in memory space hbm. "
                                   "Used 47.52G of 15.75G hbm. Exceeded hbm capacity by 31.77G.") == (
        int(47.52 * GIB), int(15.75 * GIB), False)
    assert report.parse_out_of_memory("INTERNAL: something else") is None


def test_missing_compiler_says_how_to_install(monkeypatch):
    monkeypatch.setattr(targets, "have_compiler", lambda platform: False)
    with pytest.raises(targets.MissingCompiler, match=r"pip install -e '\.\[tpu\]'"):
        targets.compile_devices(targets.parse_target("v5e-16"))
    with pytest.raises(targets.MissingCompiler, match=r"pip install -e '\.\[cuda\]'"):
        targets.compile_devices(targets.parse_target("h100"))


def test_frame_buckets_check_the_longest():
    assert fit._longest(37) == 37 and fit._longest((25, 61, 37)) == 61 and fit._longest([13]) == 13


def test_a_close_fit_is_called_close():
    def line(total):
        r = report.Report(what="train step", target="rtx4090", hardware="GPU", num_devices=1, mesh={}, details=[],
                          inputs={}, total_bytes=total, limit_bytes=24 * report.GIB, limit_source="test", fits=True)
        return r.format()

    close = line(24 * report.GIB - 5 * 2 ** 20)  # 5 MiB to spare
    assert "FITS: 24.00 GiB of 24.00 GiB" in close and "a close fit: 5.0 MiB to spare" in close
    assert "close fit" not in line(20 * report.GIB)


def test_auto_attention_follows_the_platform():
    """model.attention='auto' is the platform's kernel, the fit check's target's when it compiles for one;
    a kernel named explicitly is kept."""
    from mochi_jax.checkpoints import dit_config
    from mochi_jax.configs import common
    from mochi_jax.configs import lora as lora_config

    m = lora_config.get_config().model
    assert m.attention == "auto"
    picks = {p: dit_config(m, common.DEMO_DIT, p).attention for p in ("tpu", "cuda", "gpu", "rocm", "cpu")}
    assert picks == {"tpu": "splash", "cuda": "cudnn", "gpu": "cudnn", "rocm": "xla", "cpu": "xla"}
    assert dit_config(m, common.DEMO_DIT, "cuda", compute_dtype="float32").attention == "xla"  # cuDNN: 16-bit only
    assert dit_config(m, common.DEMO_DIT).attention == "xla"  # this process: a CPU
    m.attention = "xla"
    assert dit_config(m, common.DEMO_DIT, "tpu").attention == "xla"
    assert fit._attention(lora_config.get_config().model, dit_config(m, common.DEMO_DIT, "tpu")) == "xla (auto)"


def test_the_ladder_of_settings_that_need_less_memory():
    from mochi_jax.configs import lora as lora_config
    from mochi_jax.configs import sample as sample_config

    full = lora_config.get_config()  # remat full, bf16 weights already
    offload = [{"model.remat": "offload:residual", "model.remat_groups": ""},
               {"model.remat": "offload:residual_bf16", "model.remat_groups": ""}]
    assert fit.ladder(full, "train") == [{"model.param_dtype": "int8"}, {"model.weights_on_host": True}, *offload]
    demo = lora_config.get_config("demo")  # remat none
    assert fit.ladder(demo, "train")[0] == {"model.remat": "full", "model.remat_groups": ""}
    assert fit.ladder(sample_config.get_config(), "sample") == [{"model.param_dtype": "int8"},
                                                              {"model.weights_on_host": True}]
    assert fit.ladder(full, "train", "tpu") == [{"model.param_dtype": "int8"}, *offload]  # blocks stay on TPU chips
    full.model.param_dtype, full.model.weights_on_host = "float8_e4m3fn", True
    assert fit.ladder(full, "train") == offload and fit.ladder(full, "vae_encode") == []
    full.model.remat = "offload:residual_bf16"
    assert fit.ladder(full, "train") == []


@pytest.mark.slow
@need_tpu
def test_a_program_that_does_not_fit_names_the_settings_that_would(tmp_path):
    """The demo's step (remat none) against a limit just under its memory: the fit check says no (exit 1),
    compiles remat full on top, which keeps less, and names it; the suggestions are in the JSON."""
    small = ("--config=configs/lora.py:demo", "--config.aot.target=v5e-1", "--config.aot.num_frames=25",
             "--config.aot.height=96", "--config.aot.width=160")
    none = report_json(*small)
    assert none["fits"] and none["remat"] == "none"
    p = aot(*small, f"--config.aot.memory_gib={0.99 * none['total_bytes'] / GIB}", f"--config.aot.json={tmp_path}/r.json")
    assert p.returncode == 1, p.stdout + p.stderr
    assert "DOES NOT FIT" in p.stdout and "would fit with: --config.model.remat=full\n" in p.stdout + "\n", p.stdout
    assert re.search(r"^  --config\.model\.remat=full: [\d.]+ GiB FITS$", p.stdout, re.M), p.stdout
    tried, = json.loads((tmp_path / "r.json").read_text())["suggestions"]
    assert tried["flags"] == ["--config.model.remat=full"] and tried["fits"]
    assert tried["total_bytes"] < 0.99 * none["total_bytes"]


def report_json(*flags) -> dict:
    """The fit check's JSON report of `flags` (suggestions off)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        p = aot(*flags, "--config.aot.suggest=False", f"--config.aot.json={tmp}/r.json")
        assert p.returncode in (0, 1), p.stdout + p.stderr
        return json.loads(Path(tmp, "r.json").read_text())


def test_gpu_compiler_noise_is_dropped_and_the_rest_kept(capfd):
    """What the CUDA plugin and XLA print on a host without a GPU (lines as seen here) is dropped from a
    GPU compile's stderr, at the C level (file descriptor 2); anything else comes through."""
    from mochi_jax.stderr import dropping_stderr

    seen = ["WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
            "I0000 00:00:1796461295.129068   15922 cudart_stub.cc:31] Could not find cuda drivers on your machine, "
            "GPU will not be used.",
            "W1205 08:54:48.005636   30689 hlo_rematerialization.cc:3231] Can't reduce memory use below 296.16MiB",
            "E1205 08:55:01.000000   30689 gpu_hlo_schedule.cc:1] ... This indicates an error in the calculation!"]
    with dropping_stderr(targets.GPU_COMPILER_NOISE):
        for line in seen + ["a real error"]:
            os.write(2, (line + "\n").encode())
    assert capfd.readouterr().err == "a real error\n"
