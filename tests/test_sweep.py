"""Several LoRAs trained together on one base (configs/lora.py `sweep`, mochi_jax/lib/sweep.py):
each variant equals the same config trained alone, mixed ranks and targets stay exactly zero-padded,
the run resumes bit for bit, exports every variant, and evaluate compares them all."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eval_ref
from mochi_jax import demo, evaluate
from mochi_jax.demo import write_demo_clip
from mochi_jax.checkpoints import lora_read, runs
from mochi_jax.configs import lora as lora_config
from mochi_jax.lib import sweep as sweep_lib
from mochi_jax.lib import trainer, training
from mochi_jax.models import lora as lora_lib
from mochi_jax.models.dit import DiTConfig, MochiDiT, dummy_inputs

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("shared_compilations")
ONE = jax.sharding.SingleDeviceSharding(jax.devices()[0])
DC = DiTConfig(depth=3, num_heads=2, head_dim=16, text_width=32, t5_dim=32, param_dtype="float32",
               compute_dtype="float32", remat="none")


def _cfg(variants):
    cfg = lora_config.get_config()
    cfg.optim.update(dict(warmup_steps=0, lr=1e-2, schedule="constant"))
    cfg.lora.qkv.dropout = 0.1  # LoRA dropout: each variant's keys must equal its solo run's
    cfg.sweep.variants = variants
    return cfg


def _batch(i):
    r = np.random.default_rng(i)
    return {"mean": r.standard_normal((2, 12, 2, 4, 6)).astype(np.float32),
            "logvar": r.uniform(-4, -1, (2, 12, 2, 4, 6)).astype(np.float32),
            "t5_feats": r.standard_normal((2, 5, 32)).astype(np.float32),
            "t5_mask": np.array([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], bool)}


def _rel(x, y):
    return max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
               for a, b in zip(jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y)))


@pytest.mark.slow
def test_each_variant_equals_its_config_trained_alone():
    variants = {"qkv2": {"lora": {"qkv": {"rank": 2, "alpha": 3.0}, "out": {"rank": 0}}},  # other targets, rank
                "clip": {"optim": {"lr": 3e-3, "grad_clip": 0.5, "weight_decay": 0.1}},
                "own_seed": {"lora": {"out": {"rank": 8}}, "seed": 7}}
    cfg = _cfg(variants)
    sw = sweep_lib.from_config(cfg, DC)
    assert sw.names == ("clip", "own_seed", "qkv2")  # explicit variants in name order
    ranks = {"/".join(p): [r[i] for r in sw.ranks] + [sw.union[i].rank] for i, p in enumerate(sw.layers)}
    assert ranks["blocks/attn/qkv_x"] == [16, 16, 2, 16] and ranks["last_block/attn/proj_x"] == [16, 8, 0, 16]
    params = MochiDiT(DC).init(jax.random.PRNGKey(0), *dummy_inputs(DC))["params"]
    opts = sweep_lib.optimizers(sw)
    state = sweep_lib.init_state(sw, DC, opts, cfg.seed, ONE)
    start = jax.tree_util.tree_map(np.asarray, state["lora"])
    step = sweep_lib.make_step(sw, sweep_lib.model_of(sw, DC), opts, "normalized", 0.3)
    losses = []
    for i in range(4):
        state, out = step(state, params, _batch(i))
        losses.append(np.asarray(out["loss"]))
        assert out["finite"].all()

    for k, name in enumerate(sw.names):
        vc = sw.configs[k]
        model = MochiDiT(DC, lora_lib.targets_from_config(vc.lora.to_dict()))
        opt = training.make_optimizer(vc.optim)
        solo = training.init_state(model, opt, vc.seed, ONE)
        # every variant starts from exactly the initialisation of its run alone (its own seed included)
        assert _rel(sweep_lib.unpad(sw, k, start), solo["lora"]) == 0.0, name
        if vc.seed != cfg.seed:
            continue  # its own seed also draws its own noise when alone: not the same run
        solo_step = training.make_train_step(model, opt, "normalized", 0.3)
        for i in range(4):
            solo, out = solo_step(solo, params, _batch(i))
            assert abs(float(out["loss"]) - losses[i][k]) <= 1e-5 * abs(float(out["loss"])), (name, i)
        mine = sweep_lib.unpad(sw, k, state["lora"])
        assert jax.tree_util.tree_structure(mine) == jax.tree_util.tree_structure(solo["lora"])
        assert _rel(mine, solo["lora"]) < 2e-4, name  # measured 4e-6 and 4e-5 (grad clip): rounding, amplified by Adam

    # the zero padding stays exactly zero: qkv2 has no proj adapter and rank 2 of 16 on qkv
    blocks, k = state["lora"]["blocks"]["attn"], sw.names.index("qkv2")
    assert not np.any(np.asarray(blocks["proj_x"]["a"][k])) and not np.any(np.asarray(blocks["proj_x"]["b"][k]))
    assert not np.any(np.asarray(blocks["qkv_x"]["a"][k][..., 2:]))
    assert not np.any(np.asarray(blocks["qkv_x"]["b"][k][..., 2:, :]))
    assert np.any(np.asarray(blocks["qkv_x"]["b"][k][..., :2, :]))  # while the rank-2 part trained


def test_sweep_config():
    cfg = lora_config.get_config()
    cfg.sweep.rank, cfg.sweep.lr = "4,8", "1e-4, 1e-5"
    variants = runs.sweep_variants(cfg)
    assert [n for n, _ in variants] == ["r4_lr1e-04", "r4_lr1e-05", "r8_lr1e-04", "r8_lr1e-05"]
    v = dict(variants)["r8_lr1e-05"]
    assert (v.lora.qkv.rank, v.lora.qkv.alpha, v.lora.out.rank, v.optim.lr) == (8, 8.0, 8, 1e-5)  # alpha/rank kept
    assert not runs.sweep_variants(v) and v.batch_size == cfg.batch_size
    assert runs.sweep_variants(lora_config.get_config()) == []

    def refused(match, **sweep):
        c = lora_config.get_config()
        c.sweep.update(sweep)
        with pytest.raises(ValueError, match=match):
            sweep_lib.from_config(c, DC)

    refused("either", rank="4", variants={"a": {}})
    refused("sets batch_size", variants={"a": {"batch_size": 2}})
    refused(r"optim\.nope is not a field", variants={"a": {"optim": {"nope": 1}}})
    refused("not a usable variant name", variants={"a/b": {}})
    refused("comma-separated numbers", lr="fast")
    refused("differ in LoRA dropout", variants={"a": {}, "b": {"lora": {"qkv": {"dropout": 0.2}}}})
    refused("no LoRA target", variants={"a": {"lora": {"qkv": {"rank": 0}, "out": {"rank": 0}}}})


# ----------------------------------------------------------------------------- the trainer


def _demo_cfg(root, run, sweep=True, **kw):
    cfg = lora_config.demo(lora_config.get_config(), str(root))
    if sweep:
        cfg.sweep.variants = lora_config.get_config("sweep_demo").sweep.variants.to_dict()
    cfg.run_dir = str(Path(root) / run)
    cfg.update(dict(steps=8, log_every=4, validation=dict(every=0)))
    cfg.checkpoint.every = 4
    cfg.update(kw)
    return cfg


def _state_lora(run_dir):
    step = runs.complete_steps(Path(run_dir) / "checkpoints")[-1]
    return step, jax.tree_util.tree_map(np.asarray, runs.load_run_lora(Path(run_dir) / "variants" / "r2")[0])


@pytest.mark.slow
def test_sweep_run_resume_export_and_compare(tmp_path):
    root = tmp_path
    demo.ensure(lora_config.demo(lora_config.get_config(), str(root)))
    names = ["r2", "r4", "r4_lr1e-3"]

    # one uninterrupted sweep with validation at its end
    cfg = _demo_cfg(root, "whole")
    cfg.validation.every = 8
    whole = trainer.train(cfg)
    rows = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    for n in names:
        assert any(f"variant/{n}/loss" in r for r in rows) and any(f"variant/{n}/val_loss" in r for r in rows)
        assert list((whole / "samples" / n).glob("step000008_*.mp4"))
        for f in ("lora.safetensors", "lora_diffusers.safetensors", "config.json"):
            assert (whole / "variants" / n / f).is_file()
        # the exported files load through the project's loader and hold the checkpoint's LoRA
        factors, targets, _ = lora_read.load_lora(whole / "variants" / n / "lora.safetensors")
        ckpt, ckpt_targets = runs.load_run_lora(whole / "variants" / n)
        assert [t.rank for t in ckpt_targets] == [2, 2] if n == "r2" else [4, 4]
        for (p1, a), (p2, b) in zip(lora_lib.layers_of(factors), lora_lib.layers_of(ckpt)):
            assert p1 == p2 and np.allclose(a["a"], b["a"], atol=0) and np.allclose(a["b"], b["b"], atol=0)
    variant_cfg = json.loads((whole / "variants" / "r4_lr1e-3" / "config.json").read_text())
    assert variant_cfg["optim"]["lr"] == 1e-3 and not variant_cfg["sweep"]["variants"]

    # stopped at step 4 and resumed: bit for bit the same LoRAs
    cfg = _demo_cfg(root, "resumed", steps=4)
    trainer.train(cfg)
    cfg = _demo_cfg(root, "resumed")
    resumed = trainer.train(cfg)
    for n in names:
        a = runs.load_run_lora(whole / "variants" / n)[0]
        b = runs.load_run_lora(resumed / "variants" / n)[0]
        assert all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))

    # resuming with other variants is refused before anything runs
    other = _demo_cfg(root, "resumed", steps=12)
    other.sweep.variants = {"r4": {}}
    with pytest.raises(ValueError, match="other sweep variants"):
        trainer.setup(other)
    # the run as a whole is not one LoRA
    with pytest.raises(ValueError, match="variants/<name>"):
        runs.load_loras(str(whole), None)

    # evaluate takes the sweep's run directory as all its LoRAs, each against the base: the full report
    write_demo_clip(root / "clip", root / "clip_tokenizer")
    (root / "prompts.txt").write_text("a red ball bounces\n")
    report = evaluate.run(eval_ref.eval_config(root, root / "models", [whole], seeds="0"))
    assert [v["name"] for v in report["variants"]] == ["base"] + names and sorted(report["deltas"]) == names


@pytest.mark.slow
def test_sweep_on_meshes_equals_one_device_and_shares_the_base():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "harness"), str(ROOT)])}
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "harness" / "sweep_sharded_checks.py")],
                       capture_output=True, text=True, timeout=1200, cwd=ROOT, env=env)
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    assert r.returncode == 0 and line, r.stdout[-3000:] + r.stderr[-5000:]
    res = json.loads(line[0][len("RESULT "):])
    np.testing.assert_allclose(res["mesh"]["loss"], res["single"]["loss"], rtol=1e-5)
    assert res["mesh"]["lora_rel"] < 5e-5, res["mesh"]  # measured 1.0e-5: tensor-parallel sums in another order
    assert res["mesh"]["lora_sharding"].split("(", 1)[1].startswith("None, None, 'fsdp'")  # [K, layers, in, r]
    m = res["memory"]  # the arguments are the base's shards once, the state and the batch: nothing else
    assert m["argument_bytes"] == m["params_bytes"] + m["state_bytes"] + m["batch_bytes"], m
