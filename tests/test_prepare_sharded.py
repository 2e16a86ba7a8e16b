"""prepare over many devices (tests/harness/prepare_sharded_checks.py runs on 8 simulated CPU devices in a
subprocess, because the device count must be set before jax starts): the cache equals the one-device
cache, T5's weights are FSDP-sharded and gathered layer by layer, the text batch and each clip's
pixels are split over the devices; plus the choice of the spatial split."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mochi_jax.configs import prepare as prepare_configs
from mochi_jax.lib import placement

pytestmark = pytest.mark.slow  # every test here reads one 8-device harness run (tens of seconds)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def results():
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "harness" / "prepare_sharded_checks.py")], capture_output=True,
                       text=True, timeout=600, cwd=ROOT)
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    assert r.returncode == 0 and line, r.stdout[-3000:] + r.stderr[-5000:]
    return json.loads(line[0][len("RESULT "):])


def test_sharded_cache_equals_one_device_cache(results):
    assert results["one_mesh"] and results["mesh"]["fsdp"] == 8
    clips = results["clips"]
    assert sorted(clips) == ["narrow/clip_000", "wide/clip_000", "wide/clip_001"]
    for name, c in clips.items():
        assert c["mean_rel"] < 1e-5 and c["logvar_rel"] < 1e-5, (name, c)
        assert c["t5_max_abs"] <= 1e-5 * c["t5_scale"] and c["mask_equal"], (name, c)
    assert results["empty_prompt"]["t5_max_abs"] <= 1e-5 and results["empty_prompt"]["mask_equal"]


def test_t5_weights_are_sharded_and_the_text_batch_split(results):
    k = results["t5_kernel"]  # blocks/attn/q/kernel [layers, embed, heads]: embed over 8 devices
    assert k["devices"] == 8 and k["shard"] == [k["shape"][0], k["shape"][1] // 8, k["shape"][2]], k
    assert "fsdp" in k["spec"] and results["text_batch_spec"] == "P('fsdp', None)"
    # weights gathered as they run (FSDP), never partial products added up across devices
    assert results["t5_collectives"]["all-gather"] > 0 and results["t5_collectives"]["all-reduce"] == 0
    # in bfloat16 each device's prompts come out bitwise as one device encodes them alone
    bf = results["bf16"]
    assert bf["compute"] == "bfloat16" and bf["vs_alone_max_abs"] == 0.0 and bf["mask_equal"], bf


def test_vae_weights_replicated_and_clip_split_spatially(results):
    assert results["vae_weight"] == {"spec": "P()", "devices": 8, "shard_equals_whole": True}
    enc = results["vae_encode"]  # a 48x128 clip: 16 latent columns, 2 per device
    assert enc["input_mesh"] == {"height": 1, "width": 8, "copies": 1}
    assert enc["input_spec"] == "P(None, None, None, 'height', 'width')" and enc["input_shard"] == [1, 3, 13, 48, 16]
    assert enc["output_spec"] == [enc["input_spec"]] * 2 and enc["one_device_input_is_numpy"]
    # halos of the convolutions and GroupNorm statistics cross devices; each device's temporaries shrink
    assert enc["collectives"]["collective-permute"] > 0 and enc["collectives"]["all-reduce"] > 0
    assert enc["temp_bytes"]["eight"] < enc["temp_bytes"]["one"] / 4, enc["temp_bytes"]
    narrow = results["narrow_input"]  # 48x80: 6x10 latents, 2 x 2 devices, copies on the other 4
    assert narrow["mesh"] == {"height": 2, "width": 2, "copies": 2} and narrow["shard"] == [1, 3, 13, 24, 40]
    assert "splits over 4 of the 8 devices (2 along the height x 2 along the width" in results["printed"]
    assert "T5 weights sharded, text batches of 8 split over fsdp" in results["printed"]


def test_the_fit_checks_programs_are_what_prepare_runs_on_many_devices(results):
    """placement.vae_encode_program / t5_program (what `mochi_jax.aot` compiles) lower to the very HLO of
    Models' own calls on real arrays: a clip split over 8 devices or over 2 x 2 with copies, a tiled clip
    whole on every device, the batch-split T5 with FSDP weights (one device: tests/test_prepare.py)."""
    assert results["programs"] == {"vae split 48x128": True, "vae split 48x80": True, "vae tiled 48x128": True,
                                   "vae tiled 48x80": True, "t5": True}


def test_spatial_split_takes_the_width_first_then_the_height():
    split = placement.spatial_split
    assert split(6, 16, 8) == (1, 8)  # the width divides 8 ways
    assert split(60, 106, 8) == (4, 2)  # 480x848: 106 columns split 2 ways, 60 rows 4 ways
    assert split(60, 106, 2) == (1, 2)
    assert split(6, 10, 8) == (2, 2)  # only 4 of 8 devices
    assert split(8, 10, 8) == (4, 2)
    assert split(3, 5, 8) == (1, 1)  # neither side divides: no split
    assert split(7, 9, 1) == (1, 1)
    for h, w, n in [(60, 106, 16), (30, 53, 4), (12, 12, 6)]:
        dh, dw = split(h, w, n)
        assert n % (dh * dw) == 0 and h % dh == 0 and w % dw == 0


def test_one_device_is_todays_path_and_bad_device_counts_are_refused():
    cfg = prepare_configs.get_config("")
    assert cfg.devices == -1 and cfg.mesh.to_dict() == {"data": 1, "fsdp": -1, "tensor": 1}
    cfg.devices = 1
    assert placement.prepare_mesh(cfg) is None
    cfg.devices = 10_000
    with pytest.raises(ValueError, match="devices=10000"):
        placement.prepare_mesh(cfg)
