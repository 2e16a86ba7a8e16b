"""Per-prompt validation settings: an entry of validation.prompts is a prompt or a dict setting its
own num_frames, height, width and seed; wrong entries are one ValueError naming the entry and the key,
raised before training; the videos come out in each entry's shape, one batch per shape."""

import os
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import jax
import numpy as np
import pytest

from mochi_jax import cli, demo, train
from mochi_jax.checkpoints import dit_config, load_dit
from mochi_jax.configs import lora as lora_config
from mochi_jax.lib import training
from mochi_jax.lib.validation import ValidationPrompt, Validator, by_shape, validation_prompts
from mochi_jax.models import lora as lora_lib
from mochi_jax.models.dit import MochiDiT

ROOT = Path(__file__).resolve().parents[1]


def _validation(prompts, **sampling):
    cfg = lora_config.get_config()
    cfg.validation.prompts = prompts
    cfg.validation.sampling.update(sampling)
    return cfg.validation


def test_strings_take_the_sampling_settings_and_dicts_set_their_own():
    v = _validation(["a cat", {"prompt": "a dog", "num_frames": 13}, "a bird",
                     {"prompt": "a fox", "height": 848, "width": 480, "seed": 7}])
    assert validation_prompts(v) == [
        ValidationPrompt(0, "a cat", 37, 480, 848, 12345),
        ValidationPrompt(1, "a dog", 13, 480, 848, 12346),  # unset keys: the sampling block's, seed + index
        ValidationPrompt(2, "a bird", 37, 480, 848, 12347),
        ValidationPrompt(3, "a fox", 37, 848, 480, 7)]
    groups = by_shape(validation_prompts(v))  # one batch per shape, in order of first appearance
    assert [[p.index for p in g] for g in groups] == [[0, 2], [1], [3]]
    assert validation_prompts(_validation([])) == []


def test_the_command_line_takes_a_list_of_strings_and_dicts():
    """--config.validation.prompts='[...]' (cli.ListParser) keeps the dicts as they are written."""
    value = cli.ListParser().parse('["a cat", {"prompt": "a dog", "num_frames": 13}]')
    assert value == ["a cat", {"prompt": "a dog", "num_frames": 13}]
    cfg = lora_config.get_config()
    cfg.lock()
    cfg.validation.prompts = value  # as config_flags sets the field
    assert [p.shape for p in validation_prompts(cfg.validation)] == [(37, 480, 848), (13, 480, 848)]


@pytest.mark.parametrize("prompts,message", [
    (["a cat", {"prompt": "a dog", "frames": 13}],
     "validation.prompts[1]: unknown key 'frames' (did you mean 'num_frames'?); an entry may set prompt, "
     "num_frames, height, width, seed"),
    ([{"prompt": "a dog", "num_frames": 12}], "validation.prompts[0]['num_frames'] must be 6k+1 (7, 13, 19, 25, "
                                              "31, 37, ...), got 12"),
    (["a", "b", {"prompt": "c", "height": 100}], "validation.prompts[2]['height'] must be a positive multiple of "
                                                 "16 (VAE x8, patch x2), got 100"),
    ([{"prompt": "a dog", "width": 480.0}], "validation.prompts[0]['width'] must be an integer, got 480.0"),
    ([{"prompt": "a dog", "seed": True}], "validation.prompts[0]['seed'] must be an integer, got True"),
    ([{"prompt": "a dog", "seed": -1}], "validation.prompts[0]['seed'] must be a non-negative integer, got -1"),
    ([{"num_frames": 13}], "validation.prompts[0]: no 'prompt' in {'num_frames': 13}; an entry needs its prompt"),
    ([{"prompt": 3}], "validation.prompts[0]: 'prompt' must be a string, got 3"),
    (["a cat", 5], "validation.prompts[1]: 5 is neither a prompt (a string) nor a dict of prompt, num_frames, "
                   "height, width, seed"),
], ids=["unknown_key", "num_frames", "height", "float", "bool", "negative_seed", "no_prompt", "prompt_not_str",
        "not_str_or_dict"])
def test_a_wrong_entry_is_one_error_naming_the_entry_and_the_key(prompts, message):
    with pytest.raises(ValueError) as e:
        validation_prompts(_validation(prompts))
    assert str(e.value) == message


def test_a_wrong_sampling_default_is_named_by_its_setting():
    with pytest.raises(ValueError, match=r"^validation.prompts\[0\]: num_frames \(from validation.sampling.num_frames"
                                         r"\) must be 6k\+1"):
        validation_prompts(_validation(["a cat"], num_frames=36))


def test_the_command_refuses_a_wrong_entry_before_it_writes_anything(tmp_path):
    """The flag parses (a dict inside the list literal) and the trainer refuses the entry at once: one
    line on stderr, exit status 2, no run directory."""
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "mochi_jax.train", f"--config.run_dir={run}",
                        """--config.validation.prompts=["a cat", {"prompt": "a dog", "frames": 13}]"""],
                       capture_output=True, text=True, cwd=ROOT, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == ("mochi_jax.train: validation.prompts[1]: unknown key 'frames' (did you mean "
                                "'num_frames'?); an entry may set prompt, num_frames, height, width, seed"), r.stderr
    assert not run.exists()


def test_the_trainer_refuses_a_wrong_entry_before_anything_else(tmp_path):
    cfg = lora_config.get_config()
    cfg.run_dir, cfg.cache = str(tmp_path / "run"), str(tmp_path / "no_cache")
    cfg.validation.prompts = ["a cat", {"prompt": "a dog", "height": 50}]
    with pytest.raises(ValueError, match=r"^validation.prompts\[1\]\['height'\] must be a positive multiple of 16"):
        train.train(cfg)
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def demo_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    demo.write_demo_models(root / "models")
    return root


@pytest.mark.slow
def test_each_entry_renders_in_its_own_shape(demo_models, tmp_path):
    """Three prompts, two shapes: the videos have their entry's frames and size and seed in the name
    (a string prompt's file name as before: step<N>_prompt<i>_seed<seed + i>.mp4)."""
    cfg = lora_config.demo(lora_config.get_config(), str(demo_models))
    cfg.validation.every = 1
    cfg.validation.sampling.update(dict(steps=2, guidance=1.0))  # 13 frames at 48x80 unless an entry says
    cfg.validation.prompts = ["a red ball", {"prompt": "a blue cube", "num_frames": 7, "height": 32, "width": 64,
                                             "seed": 5}, "a green cone"]
    dit_cfg = dit_config(cfg.model)
    _, params = load_dit(cfg.model.dit, dtype=dit_cfg.param_dtype, **dit_cfg.settings())
    targets = lora_lib.targets_from_config(cfg.lora.to_dict())
    lora = training.init_lora(MochiDiT(dit_cfg, targets), jax.random.PRNGKey(0))
    validator = Validator(cfg, dit_cfg, [], targets)
    assert [[p.index for p in group] for group, _, _ in validator.text] == [[0, 2], [1]]
    values, paths = validator(3, params, lora, tmp_path)
    assert values == {}
    assert [Path(p).relative_to(tmp_path).as_posix() for p in paths] == [
        "samples/step000003_prompt0_seed12345.mp4", "samples/step000003_prompt1_seed5.mp4",
        "samples/step000003_prompt2_seed12347.mp4"]
    shapes = [iio.imread(p).shape for p in paths]
    assert shapes == [(13, 48, 80, 3), (7, 32, 64, 3), (13, 48, 80, 3)]
    assert not np.array_equal(iio.imread(paths[0]), iio.imread(paths[2]))  # their own prompts and seeds
