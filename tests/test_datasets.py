"""Several caches mixed with repeats (mochi_jax/lib/cache.py `open_datasets`, data.py `Plan`), musubi-tuner's
JSONL metadata as prepare's input (sources.py `read_metadata_input`) and a run started from a LoRA
(configs/lora.py `init_lora`, trainer.py `read_init_lora`): small synthetic caches, a tiny random DiT."""

import json
import types
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from mochi_jax.checkpoints import lora_write
from mochi_jax.checkpoints.orbax_io import save_model
from mochi_jax.configs import lora as lora_config
from mochi_jax.demo.models import DIT
from mochi_jax.lib import cache as cache_lib
from mochi_jax.lib import sources, trainer
from mochi_jax.lib.cache import Cache, open_datasets
from mochi_jax.lib.data import Plan, make_loader
from mochi_jax.models.dit import DiTConfig, abstract_variables

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("shared_compilations")  # the runs of the init_lora tests compile once
S1, S2 = (12, 1, 2, 3), (12, 2, 2, 3)


def tiny_cache(path: Path, shapes: list, first_id: int = 0, text=(4, 3)) -> Cache:
    """A cache of one clip per entry of `shapes`; clip k's mean is filled with first_id + k."""
    entries = []
    for k, shape in enumerate(shapes):
        name = f"c{k:02d}"
        cache_lib.write_arrays(path / "clips" / f"{name}.safetensors", {
            "mean": np.full(shape, first_id + k, np.float32), "logvar": np.zeros(shape, np.float32),
            "t5_feats": np.zeros(text, np.float32), "t5_mask": np.arange(text[0]) < 2})
        entries.append({"name": name, "file": f"clips/{name}.safetensors", "latent_shape": list(shape)})
    cache_lib.write_arrays(path / cache_lib.EMPTY_PROMPT, {"t5_feats": np.zeros(text, np.float32),
                                                           "t5_mask": np.arange(text[0]) < 1})
    cache_lib.write_manifest(path, {"format": cache_lib.FORMAT, "config": {}, "clips": entries,
                                    "empty_prompt": cache_lib.EMPTY_PROMPT, "skipped": []})
    return Cache(path)


def ids(batch) -> list[int]:
    return [int(m.flat[0]) for m in batch["mean"]]


# ----------------------------------------------------------------------------- several caches

@pytest.fixture
def two(tmp_path):
    """Dataset a: 4 clips of S1 and 2 of S2 (ids 0-5); dataset b: 2 of S1 and 2 of S2 (ids 100-103)."""
    tiny_cache(tmp_path / "a", [S1] * 4 + [S2] * 2, 0)
    tiny_cache(tmp_path / "b", [S1] * 2 + [S2] * 2, 100)
    return {"a": {"cache": str(tmp_path / "a"), "repeats": 1}, "b": {"cache": str(tmp_path / "b"), "repeats": 3}}


def test_mixed_datasets_are_drawn_in_proportion_to_clips_times_repeats(two):
    mixed, n_train, lines = open_datasets("unused", two, holdout=0)
    assert n_train == len(mixed) == 10
    loader = make_loader(mixed, batch_size=2, seed=7)
    plan = loader.plan
    # S1: 4 x 1 + 2 x 3 = 10 draws, S2: 2 x 1 + 2 x 3 = 8: batches of 2 with nothing to fill
    assert plan.draws == 18 and plan.epoch_batches == 9 and [b.draws for b in plan.buckets] == [10, 8]
    a_ids, b_ids = set(range(6)), set(range(100, 104))
    epochs = []
    for e in range(4):
        drawn = [i for g in range(9) for i in ids(next(loader))]
        counts = {i: drawn.count(i) for i in set(drawn)}
        assert counts == {**{i: 1 for i in a_ids}, **{i: 3 for i in b_ids}}  # exactly clips x repeats
        assert sum(counts[i] for i in a_ids) * 2 == sum(counts[i] for i in b_ids)  # 6 : 12 draws
        epochs.append(drawn)
    assert len({tuple(e) for e in epochs}) == 4  # reshuffled every epoch
    # a pure function of (seed, epoch): a new plan, or one of another dict order, draws the same
    again = make_loader(open_datasets("unused", dict(reversed(list(two.items()))), 0)[0], batch_size=2, seed=7)
    assert [i for _ in range(36) for i in ids(next(again))] == [i for e in epochs for i in e]
    other = make_loader(mixed, batch_size=2, seed=8)
    assert [i for _ in range(9) for i in ids(next(other))] != epochs[0]
    # the position resumes exactly and records the datasets
    state = json.loads(json.dumps(make_loader(mixed, batch_size=2, seed=7).get_state()))
    assert state["datasets"] == {"a": [6, 1], "b": [4, 3]} and state["draws"] == 18
    resumed = make_loader(mixed, batch_size=2, seed=7)
    resumed.set_state({**state, "next_batch": 13})
    assert [i for _ in range(5) for i in ids(next(resumed))] == [i for e in epochs for i in e][26:36]
    # one line per dataset: clips, repeats, share of the epoch
    assert any("'a': 6 clips x 1 repeat = 6 draws per epoch (33.3% of the epoch), 0 held out" in x for x in lines)
    assert any("'b': 4 clips x 3 repeats = 12 draws per epoch (66.7% of the epoch), 0 held out" in x for x in lines)


def test_each_dataset_holds_out_its_own_last_clips(two):
    two["b"]["holdout"] = 0
    mixed, n_train, lines = open_datasets("unused", two, holdout=1)  # a: validation.holdout, b: its own 0
    assert n_train == 9 and len(mixed) == 10
    assert [int(mixed[i]["mean"].flat[0]) for i in range(10)] == [0, 1, 2, 3, 4, 100, 101, 102, 103, 5]
    assert mixed.clip_repeats(n_train) == [1] * 5 + [3] * 4
    loader = make_loader(mixed, batch_size=1, seed=0, num_clips=n_train)
    assert 5 not in [i for _ in range(loader.plan.epoch_batches) for i in ids(next(loader))]


# today's Plan (before repeats) for these shapes: its batches must not change
SHAPES = [S1] * 3 + [S2] * 5 + [(12, 2, 3, 2)] + [S1] * 2
GOLDEN = {  # (batch_size, seed) -> [(clips per batch, bucket per batch) of epochs 0, 1, ...]
    (2, 3): [([[8, 8], [10, 2], [5, 4], [1, 9], [7, 6], [0, 10], [6, 3]], [2, 0, 1, 0, 1, 0, 1]),
             ([[9, 1], [0, 2], [6, 4], [5, 3], [8, 8], [1, 10], [3, 7]], [0, 0, 1, 1, 2, 0, 1]),
             ([[9, 10], [10, 0], [1, 2], [6, 5], [8, 8], [3, 7], [7, 4]], [0, 0, 0, 1, 2, 1, 1])],
    (3, 2 ** 40 + 7): [([[8, 8, 8], [3, 4, 7], [6, 5, 3], [2, 0, 10], [1, 9, 2]], [2, 1, 1, 0, 0]),
                       ([[1, 10, 9], [5, 7, 3], [8, 8, 8], [4, 6, 5], [9, 0, 2]], [0, 1, 2, 1, 0])],
}


@pytest.mark.parametrize("batch_size, seed", sorted(GOLDEN))
def test_a_single_cache_plans_as_before(tmp_path, batch_size, seed):
    for repeats in (None, [1] * len(SHAPES)):  # no repeats, or all 1: the same plan
        plan = Plan(SHAPES, batch_size, seed, repeats=repeats)
        for e, (clips, which) in enumerate(GOLDEN[(batch_size, seed)]):
            got = plan.epoch(e)
            assert got[0].tolist() == clips and got[1].tolist() == which
        assert set(plan.fingerprint()) == {"clips", "batch_size", "seed", "epoch_batches"}
    # the trainer's data without `datasets` is the one cache, read as before
    one = tiny_cache(tmp_path / "one", SHAPES)
    for datasets in ({}, ml_collections.ConfigDict(), None):
        cache, n_train, lines = open_datasets(str(tmp_path / "one"), datasets, holdout=0)
        assert type(cache) is Cache and n_train == len(one) and lines == []
    loader = make_loader(cache, batch_size, seed)
    assert set(loader.get_state()) == {"next_batch", "clips", "batch_size", "seed", "epoch_batches"}
    assert [loader.indices(g).tolist() for g in range(len(GOLDEN[(batch_size, seed)][0][0]))] == \
        GOLDEN[(batch_size, seed)][0][0]
    # as one dataset of repeats 1 it plans the same batches
    alone = make_loader(open_datasets("x", {"only": {"cache": str(tmp_path / "one")}}, 0)[0], batch_size, seed)
    assert [alone.indices(g).tolist() for g in range(20)] == [loader.indices(g).tolist() for g in range(20)]


def test_a_bad_dataset_is_one_error_naming_it_and_its_field(two, tmp_path):
    def refused(change: dict, match: str, holdout: int = 0):
        spec = {k: dict(v) for k, v in two.items()}
        spec["b"].update(change)
        with pytest.raises(ValueError, match=match):
            open_datasets("unused", spec, holdout)

    refused({"cache": str(tmp_path / "nowhere")}, r"datasets\.b\.cache = .*nowhere.*no cache manifest")
    refused({"cache": ""}, r"datasets\.b\.cache = '': must name a cache folder")
    refused({"repeats": 0}, r"datasets\.b\.repeats = 0: must be an integer >= 1")
    refused({"repeats": "2"}, r"datasets\.b\.repeats = '2': must be an integer >= 1")
    refused({"repeats": 1.5}, r"datasets\.b\.repeats = 1\.5")
    refused({"holdout": -1}, r"datasets\.b\.holdout = -1: must be an integer >= 0")
    refused({"holdout": 4}, r"datasets\.b\.holdout = 4: .*must leave training clips")
    refused({"weight": 2}, r"datasets\.b: unknown field weight \(a dataset takes cache, repeats, holdout\)")
    tiny_cache(tmp_path / "wide", [S1], text=(8, 3))  # other T5 features: captions cannot share a batch
    refused({"cache": str(tmp_path / "wide")}, r"datasets a: T5 features \[4, 3\], b: T5 features \[8, 3\]")
    with pytest.raises(ValueError, match="datasets.b must be"):
        open_datasets("unused", {"b": "cache"}, 0)


def test_datasets_are_set_from_the_command_line_as_a_literal(two):
    argv = ["train", f"--config={ROOT / 'configs' / 'lora.py'}:demo", f"--config.datasets={json.dumps(two)}",
            "--config.init_lora=runs/earlier"]
    fv = flags.FlagValues()  # as the commands parse them (mochi_jax/cli.py), on flags of its own
    config_flags.DEFINE_config_file("config", None, flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    cfg = fv.config
    assert cfg.datasets == two and cfg.init_lora == "runs/earlier"
    assert open_datasets(cfg.cache, cfg.datasets, 0)[1] == 10
    assert json.loads(cfg.to_json())["datasets"] == two  # config.json keeps it
    assert lora_config.get_config().datasets.to_dict() == {}  # default: `cache` alone


# ----------------------------------------------------------------------------- musubi-tuner metadata

def test_musubi_jsonl_metadata_is_read_as_prepares_input(tmp_path):
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    for f in (data / "v" / "a.mp4", data / "b.png", elsewhere / "c.mov", data / "v" / "a.txt"):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"x")  # the list is read here; decoding the files is prepare's later work
    meta = data / "meta.jsonl"
    lines = [{"video_path": "v/a.mp4", "caption": " a dog runs "},
             {"image_path": "b.png", "caption": "a red ball", "control_path": "ignored.png"},
             {"video_path": str(elsewhere / "c.mov"), "caption": "a cat"},
             {"video_path": "v/missing.mp4", "caption": "gone"},
             {"video_path": "v/a.mp4", "caption": "again"}]
    meta.write_text("\n".join(json.dumps(x) for x in lines[:2]) + "\n\n"
                    + "\n".join(json.dumps(x) for x in lines[2:]) + "\n")
    assert sources.is_metadata_input(meta) and not sources.is_metadata_input(data)
    found = sources.find_sources(meta)
    assert found == [(data / "v" / "a.mp4").resolve(), (data / "b.png").resolve(), (elsewhere / "c.mov").resolve()]
    assert [sources.clip_name(s, meta) for s in found] == [
        "v/a", "b", "/".join(("_abs", *(elsewhere / "c").resolve().parts[1:]))]
    assert sources.orphan_captions(meta, found) == []  # v/a.txt is no orphan: the lines hold the captions
    captions = sources.Captions(meta, trigger="sks")
    # the line's caption, not the .txt beside the video
    assert [captions(s) for s in found] == ["sks a dog runs", "sks a red ball", "sks a cat"]
    assert [(Path(s.split(":")[0]).name, s.split(":")[1].split()[0], r.split(":")[0]) for s, r in captions.skipped] \
        == [("meta.jsonl", "5", "missing file"), ("meta.jsonl", "6", "duplicate metadata row")]
    with pytest.raises(ValueError, match="leave captions empty"):
        sources.Captions(meta, captions="other.jsonl")
    # the same file as the `captions` of a folder input captions the files under it
    rows = sources.Captions(data, captions="meta.jsonl")
    assert rows(data / "b.png") == "a red ball"


def test_a_malformed_metadata_line_is_one_error_naming_the_file_and_line(tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"x")
    meta = tmp_path / "meta.jsonl"
    meta.write_text(json.dumps({"video_path": "a.mp4", "caption": "fine"}) + "\n"
                    + '{"video_path": "a.mp4", "caption": \n'  # torn
                    + json.dumps({"caption": "no path"}) + "\n"
                    + json.dumps({"video_path": "a.mp4", "image_path": "a.mp4", "caption": "both"}) + "\n"
                    + json.dumps({"image_path": "a.mp4"}) + "\n"
                    + json.dumps(["a.mp4", "a list"]) + "\n")
    for read in (sources.find_sources, sources.Captions):
        with pytest.raises(ValueError) as e:
            read(meta)
        text = str(e.value)
        assert text.startswith(f"{meta}: 5 malformed lines")
        assert [x.split(":")[0].strip() for x in text.splitlines()[1:]] == [f"line {n}" for n in (2, 3, 4, 5, 6)]
        assert "needs a \"caption\" string" in text and "not JSON" in text


# ----------------------------------------------------------------------------- init_lora

@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    """The demo's tiny random DiT (only it: the trainer's set-up reads no VAE or T5) and a small cache."""
    root = tmp_path_factory.mktemp("init_lora")
    cfg = DiTConfig(**DIT, param_dtype="float32", compute_dtype="float32", remat="none")
    rng = np.random.default_rng(0)  # no forward pass here: any weights do, drawn without compiling anything
    params = jax.tree_util.tree_map(lambda s: (0.02 * rng.normal(size=s.shape)).astype(s.dtype),
                                    abstract_variables(cfg)["params"])
    save_model(root / "models" / "dit", params, "mochi_dit", cfg.arch(), unstack=[("blocks", cfg.depth - 1)])
    tiny_cache(root / "cache", [S1] * 3)
    return root


def _run(root, name, **kw):
    cfg = lora_config.demo(lora_config.get_config(), str(root))
    cfg.update(dict(cache=str(root / "cache"), run_dir=str(root / name), **kw))
    cfg.validation.holdout = 0
    run = trainer.setup(cfg)
    trainer.load_state(run)
    return run


def _host(tree):
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def _random_like(tree, seed):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda x: rng.normal(size=x.shape).astype(np.float32), _host(tree))


def _equal(a, b):
    return jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, _host(a), _host(b)))


def test_init_lora_starts_from_the_files_values_and_a_resume_from_the_checkpoint(tiny_root, capsys):
    fresh = _run(tiny_root, "fresh")
    values = _random_like(fresh.state["lora"], 1)
    lora_write.save_genmo(tiny_root / "genmo.safetensors", values, fresh.targets, cfg=fresh.dit_cfg)
    lora_write.save_diffusers(tiny_root / "diffusers.safetensors", values, fresh.targets, cfg=fresh.dit_cfg)
    for layout in ("genmo", "diffusers"):
        run = _run(tiny_root, f"from_{layout}", init_lora=str(tiny_root / f"{layout}.safetensors"))
        assert _equal(run.state["lora"], values)
        assert _equal(run.state["opt"], fresh.state["opt"]) and int(run.state["step"]) == 0  # optimizer: fresh
        assert jax.tree_util.tree_all(jax.tree_util.tree_map(
            lambda x, y: x.sharding == y.sharding and x.dtype == y.dtype, run.state["lora"], fresh.state["lora"]))
        assert f"LoRA initialised from init_lora = {tiny_root / f'{layout}.safetensors'} ({layout} layout): 7 of 7 " \
               "layers" in capsys.readouterr().out
    # a training run directory (its newest checkpoint, or one named) gives its LoRA
    run.state = {**run.state, "lora": trainer.place_like(_random_like(run.state["lora"], 2), run.state["lora"]),
                 "step": jax.device_put(np.int32(5), run.state["step"].sharding)}  # as if 5 steps were trained
    trainer.save(run, 5)
    run.manager.wait_until_finished()
    run.manager.close()
    for spec in (run.run_dir, run.run_dir / "checkpoints" / "5"):
        other = _run(tiny_root, f"from_run_{spec.name}", init_lora=str(spec))
        assert _equal(other.state["lora"], _random_like(run.state["lora"], 2))
    # a resumed run continues from its checkpoint and says that init_lora was not read
    capsys.readouterr()
    resumed = _run(tiny_root, run.run_dir.name, init_lora=str(tiny_root / "genmo.safetensors"))
    assert _equal(resumed.state["lora"], _random_like(run.state["lora"], 2)) and int(resumed.state["step"]) == 5
    out = capsys.readouterr().out
    assert f"init_lora = {tiny_root / 'genmo.safetensors'} not read: the LoRA is the checkpoint's (step 5)" in out
    assert "LoRA initialised" not in out


def test_init_lora_of_another_alpha_is_the_same_adapter_and_another_rank_is_refused(tiny_root):
    fresh = _run(tiny_root, "fresh_alpha")
    values = _random_like(fresh.state["lora"], 3)
    lora_write.save_genmo(tiny_root / "r4.safetensors", values, fresh.targets, cfg=fresh.dit_cfg)
    # alpha 8 at rank 4: scale 2, so b is halved; a @ b * scale is the file's
    run = _run(tiny_root, "alpha8", init_lora=str(tiny_root / "r4.safetensors"),
               lora=dict(qkv=dict(rank=4, alpha=8.0), out=dict(rank=4, alpha=8.0)))
    got = _host(run.state["lora"])
    assert np.array_equal(got["blocks"]["attn"]["qkv_x"]["a"], values["blocks"]["attn"]["qkv_x"]["a"])
    np.testing.assert_allclose(2 * got["blocks"]["attn"]["qkv_x"]["b"], values["blocks"]["attn"]["qkv_x"]["b"],
                               rtol=0, atol=0)
    with pytest.raises(ValueError) as e:
        _run(tiny_root, "rank2", init_lora=str(tiny_root / "r4.safetensors"),
             lora=dict(qkv=dict(rank=2, alpha=2.0), out=dict(rank=4, alpha=4.0)))
    text = str(e.value)
    assert text.startswith(f"init_lora = {tiny_root / 'r4.safetensors'}: its LoRA does not fit the config's `lora` "
                           "targets (4 layers)")
    assert ("blocks/attn/qkv_x (lora.qkv): the file has a [2, 32, 4] b [2, 4, 96], the config's LoRA a [2, 32, 2] "
            "b [2, 2, 96]") in text
    assert "proj" not in text  # the layers that fit are not named
    with pytest.raises(ValueError, match=r"blocks/attn/proj_x: the file has a \[2, 32, 4\] b \[2, 4, 32\]; the config "
                                         r"adapts no such layer"):
        _run(tiny_root, "no_out", init_lora=str(tiny_root / "r4.safetensors"), lora=dict(out=dict(rank=0)))
    with pytest.raises(ValueError, match="init_lora = 'nowhere.safetensors': no such LoRA file or training run"):
        _run(tiny_root, "missing", init_lora="nowhere.safetensors")


def test_what_a_file_holds_only_as_zeros_starts_fresh_and_a_sweep_is_refused(tiny_root, capsys):
    fresh = _run(tiny_root, "fresh_zeros")
    values = _random_like(fresh.state["lora"], 4)
    values["last_block"]["attn"]["qkv_y"]["b"][:] = 0  # a layer that adds nothing (lora_read drops it)
    values["blocks"]["attn"]["proj_x"]["b"][:, 3] = 0  # a rank component that adds nothing in any block
    lora_write.save_genmo(tiny_root / "zeros.safetensors", values, fresh.targets, cfg=fresh.dit_cfg)
    capsys.readouterr()
    got = _host(_run(tiny_root, "from_zeros", init_lora=str(tiny_root / "zeros.safetensors")).state["lora"])
    was = _host(fresh.state["lora"])
    assert np.array_equal(got["last_block"]["attn"]["qkv_y"]["a"], was["last_block"]["attn"]["qkv_y"]["a"])
    assert not got["last_block"]["attn"]["qkv_y"]["b"].any()  # fresh: a drawn, b zero (adds nothing, as in the file)
    px, fx = got["blocks"]["attn"]["proj_x"], values["blocks"]["attn"]["proj_x"]
    assert np.array_equal(px["a"][..., :3], fx["a"][..., :3]) and np.array_equal(px["b"], fx["b"])
    assert np.array_equal(px["a"][..., 3], was["blocks"]["attn"]["proj_x"]["a"][..., 3])  # fresh component
    assert np.array_equal(got["blocks"]["attn"]["qkv_x"]["a"], values["blocks"]["attn"]["qkv_x"]["a"])
    out = capsys.readouterr().out
    assert "6 of 7 layers" in out and "all zeros in the file, so fresh: last_block/attn/qkv_y" in out
    assert "nonzero rank components only in part (the rest fresh): blocks/attn/proj_x 3 of 4" in out
    sweep = types.SimpleNamespace(cfg=lora_config.get_config("sweep_demo"), sweep=object())
    sweep.cfg.init_lora = "lora.safetensors"
    with pytest.raises(ValueError, match="init_lora = 'lora.safetensors': a sweep's LoRAs start fresh"):
        trainer.load_state(sweep)
