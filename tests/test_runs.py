"""The LoRA of a training run directory (mochi_jax/checkpoints/runs.py): the newest complete
checkpoint is read, whatever an interrupted save or clean-up left behind, and reading it is quiet.
The runs here are written with the trainer's own save call (runs.save_checkpoint), without training."""

import json
import logging
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mochi_jax.checkpoints import runs


def _lora(step: int) -> dict:
    """A LoRA on qkv_x of a depth-3, width-8 DiT whose values tell the step."""
    return {"blocks": {"attn": {"qkv_x": {"a": jnp.full((2, 8, 2), float(step)), "b": jnp.ones((2, 2, 24))}}}}


def _make_run(path, steps=(2, 4)):
    """A run directory as the trainer leaves it: config.json, and checkpoints of the train state
    {step, lora, opt, rng} with the data loader's position."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"lora": {"qkv": {"pattern": "attn/qkv_x$", "rank": 2,
                                                                    "alpha": 4.0}}}))
    manager = runs.checkpoint_manager(path / "checkpoints", keep=3)
    for step in steps:
        lora = _lora(step)
        state = {"step": jnp.int32(step), "lora": lora, "opt": optax.adamw(1e-3).init(lora),
                 "rng": jax.random.PRNGKey(step)}
        runs.save_checkpoint(manager, step, state, {"epoch": 0, "position": step})
    manager.wait_until_finished()
    manager.close()
    return path


def test_half_deleted_and_temporary_checkpoints_are_passed_over(tmp_path):
    run = _make_run(tmp_path / "run")
    factors, targets = runs.load_run_lora(run)
    assert float(factors["blocks"]["attn"]["qkv_x"]["a"][0, 0, 0]) == 4.0
    assert [(t.pattern, t.rank, t.alpha) for t in targets] == [("attn/qkv_x$", 2, 4.0)]

    # a kill during orbax's clean-up of an old checkpoint (or at the end of a save): the newest step
    # folder lost its metadata; and an interrupted save left a whole-looking temporary folder
    (run / "checkpoints" / "4" / runs.COMPLETE_MARKER).unlink()
    shutil.copytree(run / "checkpoints" / "2", run / "checkpoints" / "6.orbax-checkpoint-tmp-1795975061")
    assert runs.complete_steps(run / "checkpoints") == [2]
    assert runs.incomplete_steps(run / "checkpoints") == [4]
    factors, _ = runs.load_run_lora(run)
    assert float(factors["blocks"]["attn"]["qkv_x"]["a"][0, 0, 0]) == 2.0
    with pytest.raises(FileNotFoundError, match=r"no complete checkpoint at step 4; have \[2\]"):
        runs.load_run_lora(run, step=4)

    shutil.rmtree(run / "checkpoints" / "2" / "state")  # a folder without its state is incomplete too
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        runs.load_run_lora(run)


def test_loading_a_run_lora_is_quiet(tmp_path, caplog):
    """No orbax warning (e.g. 'Item "data" was found in the checkpoint, but could not be restored')
    and no log record at WARNING or above: `sample` and `evaluate` read runs this way."""
    run = _make_run(tmp_path / "run")
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        factors, _ = runs.load_run_lora(run)
        factors2, _ = runs.load_lora_or_run(run, dit_cfg=None)
    noisy = [f"{r.name} {r.levelname}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.WARNING]
    assert not noisy, noisy
    assert not caught, [str(w.message) for w in caught]
    jax.tree_util.tree_map(np.testing.assert_array_equal, factors, factors2)
