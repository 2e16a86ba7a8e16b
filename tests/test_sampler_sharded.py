"""The sampler on an 8-device CPU mesh (tests/harness/sampler_sharded_checks.py runs in a subprocess,
because the device count must be set before jax starts): `denoise` with the DiT's weights placed by
`sampling.placement` equals one device on data, FSDP, sequence and tensor meshes (2 videos on each;
also 4 on data 8, where 'data' then splits the batch instead of the visual tokens); a video is the
same alone and in a batch of 2 where the tokens are split (data 8) and where the batch is (data 2 x
tensor 2 x sequence 2); the weights are sharded as training shards them; the latents come back whole
on every device; each step compiles once per mesh and shape; several LoRAs stacked (variants) equal
each LoRA alone; the fit check's `sampler_program` lowers to what `denoise` runs; heads the mesh does
not divide are refused; the VAE decode over 8 devices gives one device's frames."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every test here reads one 8-device harness run (about a minute)

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "tests" / "harness" / "sampler_sharded_checks.py"
MESHES = ["data8", "fsdp8", "fsdp2_seq4", "data2_tensor2_seq2", "data2_fsdp4"]
# videos per mesh (default: 2); batch invariance (1 vs 2) where 1 is among them
BATCHES = {"data8": ["1", "2", "4"], "data2_tensor2_seq2": ["1", "2"]}
TOL = 1e-5


@pytest.fixture(scope="module")
def results():
    r = subprocess.run([sys.executable, str(HARNESS)], capture_output=True, text=True, timeout=1200, cwd=ROOT)
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    assert r.returncode == 0 and line, r.stdout[-3000:] + r.stderr[-5000:]
    out = json.loads(line[0][len("RESULT "):])
    print(f"sampler_sharded_checks: {out['seconds']:.1f} s")
    return out


def _ran(results, part):
    assert part not in results["errors"], results["errors"][part]
    return results[part]


def test_the_lora_and_the_sampler_matter(results):
    """The checks below compare something: the LoRAs change the video, the steps move the noise, and
    seed 5's video is the same alone and in a batch of two on one device."""
    single = results["single"]
    assert single["lora_effect"] > 1e-2 and single["lora_b_effect"] > 1e-2 and single["moved"] > 0.1, single
    assert single["batch_invariance"] < TOL, single


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_sampler_equals_one_device(results, mesh):
    got = _ran(results, mesh)
    batches = BATCHES.get(mesh, ["2"])
    assert sorted(got["rel"]) == batches, got["rel"]
    for b in batches:
        assert got["rel"][b] < TOL, (mesh, b, got["rel"])


@pytest.mark.parametrize("mesh", [m for m in MESHES if "1" in BATCHES.get(m, [])])
def test_a_video_is_the_same_alone_and_in_a_batch(results, mesh):
    """Seed 5 alone and in a batch of 2: on data 8 the DiT's 2 and 4 rows (both guidance branches) do
    not divide 'data', which splits the visual tokens; on data 2 x tensor 2 x sequence 2 'data' splits
    the rows."""
    got = _ran(results, mesh)
    assert got["batch_invariance"] < TOL, (mesh, got["batch_invariance"])


@pytest.mark.parametrize("mesh", MESHES)
def test_latents_come_back_whole_on_every_device(results, mesh):
    got = _ran(results, mesh)
    assert all(got["replicated"].values()), (mesh, got["replicated"])
    assert all(got["on_mesh"].values()), (mesh, got["on_mesh"])


@pytest.mark.parametrize("mesh", MESHES)
def test_each_step_compiles_once_per_mesh_and_shape(results, mesh):
    got = _ran(results, mesh)
    assert all(n == 1 for n in got["compiles"].values()), (mesh, got["compiles"])  # 3 steps, one compile
    assert got["recompiles_new_values"] == 0, (mesh, got["recompiles_new_values"])  # seeds, prompts, LoRA, ...


def test_weights_are_sharded_as_in_training(results):
    big = ("blocks/attn/qkv_x/kernel", "blocks/attn/proj_x/kernel", "blocks/mlp_x/w1/kernel",
           "blocks/mlp_x/w2/kernel", "blocks/mod_x/kernel", "last_block/mlp_x/w1/kernel")
    expect = {"fsdp8": ("fsdp", 1 / 8), "data2_fsdp4": ("fsdp", 1 / 4), "fsdp2_seq4": ("fsdp", 1 / 2),
              "data2_tensor2_seq2": ("tensor", 1 / 2), "data8": (None, 1.0)}
    for mesh, (axis, frac) in expect.items():
        weights = _ran(results, mesh)["weights"]
        for w in big:
            got = weights[w]
            assert abs(got["fraction"] - frac) < 1e-9, (mesh, w, got)
            axes = [a for dim in got["axes"] for a in dim]
            assert axes == ([axis] if axis else []), (mesh, w, got)
        # all of the DiT: one device holds about 1 / (fsdp x tensor) of it (norms, biases aside)
        assert results[mesh]["params_fraction"] < frac * 1.1, (mesh, results[mesh]["params_fraction"])
    # LoRA factors are split like the kernels they adapt
    lora = results["fsdp8"]["lora"]
    assert lora["a"]["fraction"] == 1 / 8 and lora["a"]["axes"][1] == ["fsdp"], lora
    assert ["tensor"] in results["data2_tensor2_seq2"]["lora"]["b"]["axes"], results["data2_tensor2_seq2"]["lora"]


def test_stacked_variants_on_a_mesh_equal_each_lora_alone(results):
    v = _ran(results, "variants")
    assert v["k"] == 3 and v["shape"] == [3, 2, 12, 3, 4, 6], v
    assert v["mesh_vs_one"] < TOL, v
    assert max(v["one_vs_alone"]) < TOL and max(v["mesh_vs_alone"]) < TOL, v  # base, LoRA a, LoRA b
    assert v["compiles"] == 1 and v["replicated"], v
    assert v["lora_axes"][0] == [] and ["fsdp"] in v["lora_axes"] and v["lora_fraction"] == 0.5, v


def test_the_fit_check_lowers_what_denoise_runs_on_a_mesh(results):
    h = _ran(results, "hlo")
    assert h["steps"] == 3 and h["steps_equal"], h  # the first step lowers as the later ones
    assert h["equal"], h.get("diff")
    assert h["variants_steps"] == 3 and h["variants_steps_equal"], h
    assert h["variants_equal"], h.get("variants_diff")


def test_heads_the_mesh_does_not_divide_are_refused(results):
    refusal = results["refusal"]
    for mesh in ("seq4", "tensor4"):
        assert refusal[mesh].startswith("ValueError: ") and "--config.mesh.sequence" in refusal[mesh], refusal
        assert "6 attention heads" in refusal[mesh], refusal
    assert refusal["seq2_accepted"] is True, refusal


def test_the_vae_decode_over_eight_devices_gives_one_device_frames(results):
    """Untiled: each video split spatially over the devices; tiled: the tiles shared out between them.
    The same frames as one device, but for a rounding flip of one level in a few pixels."""
    dec = _ran(results, "decode")
    for how in ("untiled", "tiled"):
        assert dec[how]["shape"] == [1, 13, 48, 80, 3], dec
        assert dec[how]["max"] <= 1 and dec[how]["frac"] < 1e-3, (how, dec)
    assert dec["mesh_latents_equal"], dec  # latents on a mesh, the VAE on one device (training's validation)
