"""The DiT converter's error discipline: every bad input named, nothing half-written."""

import importlib.util
import json
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file

from dit_ref import diffusers_to_genmo, make_reference, our_config
from mochi_jax import checkpoints as convert
from mochi_jax.checkpoints import safetensors_io
from mochi_jax.checkpoints import t5 as t5_convert
from mochi_jax.checkpoints import load_dit

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def genmo_sd():
    return diffusers_to_genmo(make_reference(our_config("h2d16"), seed=0).state_dict())


def _save(sd, path):
    save_file(sd, str(path))
    return path


def _cli():
    spec = importlib.util.spec_from_file_location("convert_weights", ROOT / "tools" / "convert_weights.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def test_comfyui_prefix_and_cli(genmo_sd, tmp_path, capsys):
    src = _save({"model.diffusion_model." + k: v for k, v in genmo_sd.items()}, tmp_path / "comfy.safetensors")
    main = _cli()
    assert main(["dit", str(src), str(tmp_path / "out"), "--dtype", "float32", "--quiet"]) == 0
    assert "depth 3" in capsys.readouterr().out
    cfg, params = load_dit(tmp_path / "out")
    np.testing.assert_array_equal(params["pos_frequencies"], genmo_sd["pos_frequencies"].numpy())
    np.testing.assert_array_equal(params["last_block"]["attn"]["proj_x"]["kernel"],
                                  genmo_sd["blocks.2.attn.proj_x.weight"].numpy().T)
    # an existing output is not replaced without --overwrite
    assert main(["dit", str(src), str(tmp_path / "out"), "--quiet"]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["dit", str(src), str(tmp_path / "out"), "--quiet", "--overwrite", "--dtype", "bfloat16"]) == 0
    assert load_dit(tmp_path / "out")[0].param_dtype == "bfloat16"


@pytest.mark.parametrize("case", ["missing", "extra", "shape"])
def test_bad_keys_are_named(genmo_sd, tmp_path, case):
    sd = dict(genmo_sd)
    if case == "missing":
        del sd["blocks.1.mlp_y.w2.weight"]
        expect = "blocks.1.mlp_y.w2.weight"
    elif case == "extra":
        sd["blocks.0.attn.extra.weight"] = torch.zeros(3)
        expect = "blocks.0.attn.extra.weight"
    else:
        sd["blocks.1.attn.proj_x.weight"] = torch.zeros(32, 31)
        expect = r"blocks.1.attn.proj_x.weight.*\(32, 31\), expected \(32, 32\)"
    src = _save(sd, tmp_path / "bad.safetensors")
    with pytest.raises(convert.ConversionError, match=expect) as e:
        convert.convert_dit(src, tmp_path / "out", progress=False)
    assert "bad.safetensors" in str(e.value) or case == "missing"
    assert not (tmp_path / "out").exists()


def test_truncated_corrupt_and_pickled_files_are_refused(genmo_sd, tmp_path):
    src = _save(genmo_sd, tmp_path / "dit.safetensors")
    data = src.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[:-100])
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    header.pop("__metadata__", None)
    last = max(header, key=lambda k: header[k]["data_offsets"][1])  # the tensor whose bytes were cut
    with pytest.raises(convert.ConversionError, match="trunc.safetensors.*truncated") as e:
        convert.convert_dit(tmp_path / "trunc.safetensors", tmp_path / "out", progress=False)
    assert f"1 of its {len(header)} tensors do not fit: {last!r}" in str(e.value)  # docs/weights.md promises the key
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(convert.ConversionError, match="junk.safetensors.*not a valid safetensors"):
        convert.convert_dit(tmp_path / "junk.safetensors", tmp_path / "out", progress=False)
    torch.save({"a": torch.zeros(1)}, tmp_path / "dit.pt")
    with pytest.raises(convert.ConversionError, match="pickled"):
        convert.convert_dit(tmp_path / "dit.pt", tmp_path / "out", progress=False)
    with pytest.raises(convert.ConversionError, match="does not exist"):
        convert.convert_dit(tmp_path / "nope", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_sharded_folder_with_missing_shard(tmp_path):
    model = make_reference(our_config("h2d16"), seed=1)
    model.save_pretrained(tmp_path / "transformer", max_shard_size="20KB")
    shards = sorted((tmp_path / "transformer").glob("*.safetensors"))
    shards[1].unlink()
    with pytest.raises(convert.ConversionError, match=shards[1].name):
        convert.convert_dit(tmp_path, tmp_path / "out", progress=False)


def test_crash_mid_write_leaves_nothing_loadable(genmo_sd, tmp_path, monkeypatch):
    src = _save(genmo_sd, tmp_path / "dit.safetensors")
    real_get = safetensors_io.TensorSource.get
    calls = {"n": 0}

    def flaky_get(self, key):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt  # e.g. the user pressed Ctrl-C halfway
        return real_get(self, key)

    monkeypatch.setattr(safetensors_io.TensorSource, "get", flaky_get)
    with pytest.raises(KeyboardInterrupt):
        convert.convert_dit(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(safetensors_io.TensorSource, "get", real_get)
    out, _ = convert.convert_dit(src, tmp_path / "out", dtype="float32", progress=False)  # retry is clean
    _, params = load_dit(out)
    assert not list(tmp_path.glob("out.partial_save*"))
    leaves = jax.tree_util.tree_leaves(params)
    assert sum(x.size for x in leaves) == sum(v.numel() for v in genmo_sd.values())


@pytest.mark.parametrize("layout", ["genmo", "diffusers"])
def test_a_corrupt_architecture_tensor_is_named_alone(genmo_sd, tmp_path, layout):
    """The architecture is read from every tensor that shows it: a q-norm weight of the wrong width
    (here half the head size, which still divides the width) is the one tensor named, not the
    architecture it would imply (that blamed every other norm and pos_frequencies)."""
    if layout == "genmo":
        sd, odd = dict(genmo_sd), "blocks.0.attn.q_norm_x.weight"
    else:
        sd = {k: v.contiguous() for k, v in make_reference(our_config("h2d16"), seed=0).state_dict().items()}
        odd = "transformer_blocks.0.attn1.norm_q.weight"
    sd[odd] = torch.ones(8)  # head size 16 in h2d16
    src = _save(sd, tmp_path / "odd.safetensors")
    with pytest.raises(convert.ConversionError) as e:
        convert.convert_dit(src, tmp_path / "out", progress=False)
    lines = [line.strip() for line in str(e.value).splitlines()[1:]]
    assert lines == [f"key {odd!r} in {src} has shape (8,), expected (16,)"], str(e.value)
    # channels x patch: the patch embedding against the output layer's weight and bias
    sd = dict(genmo_sd)
    sd["final_layer.linear.weight"] = torch.zeros(24, 32)  # 48 = 12 channels x 2 x 2
    with pytest.raises(convert.ConversionError) as e:
        convert.convert_dit(_save(sd, tmp_path / "out_layer.safetensors"), tmp_path / "out", progress=False)
    assert "'final_layer.linear.weight'" in str(e.value) and "expected (48, 32)" in str(e.value)
    sd.pop("final_layer.linear.bias")  # one against one: a tie, both named
    with pytest.raises(convert.ConversionError, match="disagree on the patch pixels x channels") as e:
        convert.convert_dit(_save(sd, tmp_path / "tie.safetensors"), tmp_path / "out", progress=False)
    assert "48 from 'x_embedder.proj.weight'" in str(e.value) and "24 from 'final_layer.linear.weight'" in str(e.value)


def test_t5_corrupt_architecture_tensor_is_named_alone(tmp_path):
    rng = np.random.default_rng(0)
    d, inner, ff, vocab, heads, layers = 16, 16, 24, 40, 2, 3
    sd = {t5_convert.EMBED: rng.standard_normal((vocab, d)), t5_convert.REL_BIAS: rng.standard_normal((32, heads)),
          t5_convert.FINAL_NORM: np.ones(d)}
    shapes = {"attn_norm/weight": (d,), "ff_norm/weight": (d,), "attn/q/kernel": (inner, d),
              "attn/k/kernel": (inner, d),
              "attn/v/kernel": (inner, d), "attn/o/kernel": (d, inner), "ff/wi_0/kernel": (ff, d),
              "ff/wi_1/kernel": (ff, d), "ff/wo/kernel": (d, ff)}
    for n in range(layers):
        sd.update({key: rng.standard_normal(shapes[ours]) for ours, key in t5_convert._block_keys(n).items()})
    odd = t5_convert._block_keys(0)["attn/q/kernel"]
    sd[odd] = rng.standard_normal((8, d))  # 2 heads of 4 instead of 8: it used to set the attention width
    src = tmp_path / "t5.safetensors"
    save_numpy({k: np.asarray(v, np.float32) for k, v in sd.items()}, str(src))
    with pytest.raises(convert.ConversionError) as e:
        convert.convert_t5(src, tmp_path / "out", progress=False)
    lines = [line.strip() for line in str(e.value).splitlines()[1:]]
    assert lines == [f"key {odd!r} in {src} has shape (8, 16), expected (16, 16)"]
