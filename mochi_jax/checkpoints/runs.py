"""The LoRA of a training run directory, and LoRA specs as the commands take them.

A run directory (written by `python -m mochi_jax.train`) holds `config.json` (the run's settings,
its LoRA targets among them) and `checkpoints/<step>/` (orbax: the train state under `state/`,
the data loader's position under `data/`). A checkpoint is complete once orbax has written its
`_CHECKPOINT_METADATA`; a step folder without it (a save or a clean-up interrupted by a kill) and
orbax's temporary folders are passed over, so readers always take the newest complete checkpoint.

    factors, targets = load_run_lora("runs/mine")                 # the newest complete checkpoint
    lora = load_loras("style.safetensors:0.8,runs/mine", dit_cfg)  # one combined adapter, or None
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from mochi_jax.checkpoints import lora_files
from mochi_jax.models import lora as lora_lib

COMPLETE_MARKER = "_CHECKPOINT_METADATA"  # orbax writes it last, when a step's checkpoint is whole


def complete_steps(checkpoint_dir) -> list[int]:
    """Steps of the complete checkpoints in `checkpoint_dir` (ascending); half-written or
    half-deleted step folders and orbax's temporaries are left out."""
    d = Path(checkpoint_dir)
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir()
                  if p.is_dir() and p.name.isdigit() and (p / COMPLETE_MARKER).is_file() and (p / "state").is_dir())


def run_targets(run_dir) -> tuple[lora_lib.LoraTarget, ...]:
    """The LoRA targets of a run, from its config.json."""
    config = Path(run_dir) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{Path(run_dir)} is not a training run directory (no config.json)")
    return lora_lib.targets_from_config(json.loads(config.read_text())["lora"])


def load_run_lora(run_dir, step: int | None = None):
    """(factors, targets) of a training run: the LoRA of checkpoint `step` (default: the newest
    complete one) as numpy arrays on the host, with the targets of the run's config.json. Reads
    only the train state's LoRA, whatever mesh or hosts wrote it."""
    run_dir = Path(run_dir).absolute()
    targets = run_targets(run_dir)
    steps = complete_steps(run_dir / "checkpoints")
    if step is None and steps:
        step = steps[-1]
    if step is None or step not in steps:
        raise FileNotFoundError(f"{run_dir / 'checkpoints'}: no complete checkpoint"
                                + (f" at step {step}; have {steps}" if step is not None else ""))
    path = run_dir / "checkpoints" / str(step) / "state"
    checkpointer = ocp.StandardCheckpointer()
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    meta = checkpointer.metadata(path)
    meta = getattr(meta, "item_metadata", meta)  # orbax >= 0.11 wraps the tree
    target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), dict(meta))
    state = checkpointer.restore(path, target)
    return jax.tree_util.tree_map(np.asarray, state["lora"]), targets


def parse_loras(spec) -> list[tuple[str, float]]:
    """'a.safetensors:0.8,b.safetensors' (or a list of such items) -> [('a.safetensors', 0.8),
    ('b.safetensors', 1.0)]."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for item in filter(None, (str(s).strip() for s in items)):
        path, strength = item, 1.0
        m = re.fullmatch(r"(.+):([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)", item)
        if m:
            path, strength = m.group(1), float(m.group(2))
        out.append((path, strength))
    return out


def load_lora_or_run(path, dit_cfg):
    """(factors, targets) from a LoRA file in any supported format (checked against `dit_cfg`) or
    from a training run directory (its newest complete checkpoint)."""
    p = Path(path)
    if p.is_dir():
        return load_run_lora(p)
    if p.is_file():
        return lora_files.load_lora(p, cfg=dit_cfg)[:2]
    raise FileNotFoundError(f"LoRA {p} does not exist")


def load_loras(spec, dit_cfg):
    """(factors, targets) of the combined adapter for 'path[:strength],...', or None for no LoRA."""
    loras = [(*load_lora_or_run(path, dit_cfg), strength) for path, strength in parse_loras(spec)]
    return lora_files.combine(loras) if loras else None
