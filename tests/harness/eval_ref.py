"""Inputs for the evaluation tests: random LoRAs for the demo DiT (as genmo files or as training
run directories) and a config pointing at tiny models."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mochi_jax.checkpoints import lora_write
from mochi_jax.demo import DIT
from mochi_jax.models.dit import DiTConfig, MochiDiT
from mochi_jax.models.lora import targets_from_config

DEMO_CFG = DiTConfig(**DIT, param_dtype="float32", compute_dtype="float32", remat="none")
LORA = {"qkv": dict(pattern=r"attn/qkv_[xy]$", rank=2, alpha=4.0), "out": dict(pattern=r"attn/proj_[xy]$", rank=2,
                                                                            alpha=2.0)}


def random_lora(seed: int, cfg: DiTConfig = DEMO_CFG, lora_cfg=None, scale: float = 0.3):
    """(tree, targets): the LoRA variables of MochiDiT(cfg, targets) with random a and b."""
    targets = targets_from_config(lora_cfg or LORA)
    p = cfg.patch_size
    args = (jnp.zeros((1, cfg.in_channels, 1, p, p)), jnp.zeros((1, 1, cfg.t5_dim)), jnp.ones((1, 1), bool),
            jnp.zeros((1,)))
    shapes = jax.eval_shape(lambda: MochiDiT(cfg, targets).init(jax.random.PRNGKey(0), *args))["lora"]
    leaves, treedef = jax.tree_util.tree_flatten(shapes)
    rng = np.random.default_rng(seed)
    values = [(scale * rng.standard_normal(x.shape)).astype(np.float32) for x in leaves]
    return jax.tree_util.tree_unflatten(treedef, values), targets


def genmo_file(path, seed: int, cfg: DiTConfig = DEMO_CFG, lora_cfg=None) -> Path:
    tree, targets = random_lora(seed, cfg, lora_cfg)
    return lora_write.save_genmo(path, tree, targets, cfg=cfg)


def run_dir(path, seed: int | None, cfg: DiTConfig = DEMO_CFG, lora_cfg=None) -> Path:
    """A training run directory as mochi_jax.train leaves it (config.json, checkpoints/<step>
    with state['lora']); seed=None: no checkpoint yet."""
    import orbax.checkpoint as ocp

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"lora": lora_cfg or LORA}))
    if seed is not None:
        tree, _ = random_lora(seed, cfg, lora_cfg)
        mngr = ocp.CheckpointManager(path.absolute() / "checkpoints")
        mngr.save(10, args=ocp.args.Composite(state=ocp.args.StandardSave({"step": np.int32(10), "lora": tree})))
        mngr.wait_until_finished()
        mngr.close()
    return path


def other_base(**changes) -> DiTConfig:
    return dataclasses.replace(DEMO_CFG, **changes)


def eval_config(root: Path, models: Path, loras, out: str = "out", **overrides):
    """configs/eval.py:demo pointed at `models` (write_demo_models) and a tiny CLIP under root."""
    from mochi_jax.configs.eval import get_config

    c = get_config("demo")
    del c.demo  # the test makes its own inputs
    c.model.update({k: str(models / k) for k in ("dit", "vae", "t5", "tokenizer")})
    c.clip.checkpoint, c.clip.tokenizer = str(root / "clip"), str(root / "clip_tokenizer")
    c.prompt_file = str(root / "prompts.txt")
    c.loras = ",".join(str(x) for x in loras)
    c.references = ""
    c.seeds = "0,1"
    c.sampling.update(dict(num_frames=7, height=32, width=48, steps=2))
    c.sheet_frames, c.sheet_height = 3, 32
    c.out_dir = str(root / out)
    # overrides by leaf name: dit= (model.dit), clip= / clip_tokenizer= (the CLIP block), or top-level fields
    where = {"dit": (c.model, "dit"), "clip": (c.clip, "checkpoint"), "clip_tokenizer": (c.clip, "tokenizer")}
    for k, v in overrides.items():
        node, key = where.get(k, (c, k))
        node[key] = v
    return c
