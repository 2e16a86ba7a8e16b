"""The commands explain themselves: --help lists every field of the command's config with its
default and comment; list and tuple fields are set from the command line as Python literals."""

import subprocess
import sys
from pathlib import Path

import pytest
from mochi_jax import cli

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {"mochi_jax.train": "configs/lora.py", "mochi_jax.sample": "configs/sample.py",
            "mochi_jax.evaluate": "configs/eval.py", "mochi_jax.prepare": "configs/prepare.py"}


def _leaves(node, where=()):
    for key in node.keys():
        value = node[key]
        if hasattr(value, "keys") and len(value):
            yield from _leaves(value, (*where, key))
        else:
            yield ".".join((*where, key))


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_lists_every_field_with_its_default(command):
    spec = cli.resolve_config(COMMANDS[command])
    text = cli.fields_help(spec, command)
    listed = [line.split("=", 1)[0].strip()[len("--config."):] for line in text.splitlines()
              if line.startswith("  --config.")]
    assert listed == list(_leaves(cli._load_config(spec))), text
    assert all("\n" not in line for line in text.splitlines())


def test_help_shows_the_comment_of_the_field_not_of_a_namesake():
    text = cli.fields_help(cli.resolve_config("configs/lora.py"), "mochi_jax.train")
    line = {x.split("=", 1)[0].strip(): x for x in text.splitlines() if x.startswith("  --config.")}
    assert line["--config.optim.warmup_steps"].endswith("=200  # linear from 0")
    assert "# steps between validation videos" in line["--config.validation.every"]
    assert "#" not in line["--config.checkpoint.every"]  # the validation block's `every` is another field
    assert "spiece.model" in line["--config.model.tokenizer"] and "#" not in line["--config.validation.clip.tokenizer"]


def test_help_is_the_commands_answer_with_status_0():
    r = subprocess.run([sys.executable, "-m", "mochi_jax.sample", "--help"], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "--config.sampling.guidance=6.0  # classifier-free guidance scale" in r.stdout


def test_a_list_field_takes_a_python_literal_or_a_bare_word():
    parse = cli.ListParser().parse
    assert parse('["a dog surfing", "a cat"]') == ["a dog surfing", "a cat"]
    assert parse("('a', 'b')") == ["a", "b"] and parse("[0.2, 0.8]") == [0.2, 0.8]
    assert parse("a dog surfing") == ["a dog surfing"]  # a bare word is a list of one


def test_a_full_size_model_on_cpu_cores_gets_a_line_on_installing_a_gpu_or_tpu_runtime():
    from mochi_jax.lib import placement

    assert placement.describe_devices().startswith("devices: ") and "(cpu)" in placement.describe_devices()
    note = placement.cpu_note(3072)  # Mochi 1's width, on this test's CPU devices
    assert note and "pip install -e '.[cuda]'" in note and "pip install -e '.[tpu]'" in note
    assert placement.cpu_note(32) is None  # the demo's tiny model runs on CPU as intended
