"""Every command the documentation gives parses: each `python -m mochi_jax.<command>` line of
README.md and docs/*.md names a config file and preset that exist, fields its config has, and
values of the fields' types, and each `python tools/<tool>.py` line is accepted by the tool's own
command line (the demo's commands also run, in tests/test_layout.py)."""

import importlib.util
from pathlib import Path

import pytest
from ml_collections.config_flags import tuple_parser

from docs_commands import ROOT, documented_commands
from mochi_jax import cli

DEFAULTS = {"train": "configs/lora.py", "sample": "configs/sample.py", "evaluate": "configs/eval.py",
            "prepare": "configs/prepare.py", "aot": "configs/lora.py"}


COMMANDS = documented_commands()


def _parse(field: str, value: str, default):
    if isinstance(default, bool):
        assert value in ("True", "False", "true", "false", "1", "0"), f"{field}: {value!r} is not a bool"
    elif isinstance(default, int):
        int(value)
    elif isinstance(default, float):
        float(value)
    elif isinstance(default, tuple):
        tuple_parser.TupleParser().parse(value)
    elif isinstance(default, list):
        cli.ListParser().parse(value)


def test_the_docs_give_commands():
    assert len(COMMANDS) > 20 and {argv[0] for _, _, argv in COMMANDS} >= {
        f"mochi_jax.{c}" for c in ("train", "sample", "evaluate", "prepare", "aot")}


@pytest.mark.parametrize("where,line,argv", COMMANDS, ids=[f"{f}:{n}" for f, n, _ in COMMANDS])
def test_documented_command_parses(where, line, argv):
    command = argv[0].split(".", 1)[1]
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), DEFAULTS[command])
    if "{" in spec or "$" in spec:
        pytest.skip("a templated config path")
    config = cli._load_config(cli.resolve_config(spec))
    cli.check_fields(config, argv)
    for arg in argv[1:]:
        if arg.startswith("--config.") and "=" in arg:
            field, value = arg[len("--config."):].split("=", 1)
            node = config
            for part in field.split("."):
                node = node[part]
            _parse(field, value, node)


TOOL_COMMANDS = documented_commands(r"python (tools/\w+\.py)(.*)")


def test_the_docs_give_tool_commands():
    assert {argv[0] for _, _, argv in TOOL_COMMANDS} == {"tools/convert_weights.py", "tools/lora.py"}
    assert len(TOOL_COMMANDS) > 15


@pytest.mark.parametrize("where,line,argv", TOOL_COMMANDS, ids=[f"{f}:{n}" for f, n, _ in TOOL_COMMANDS])
def test_documented_tool_command_parses(where, line, argv):
    spec = importlib.util.spec_from_file_location(Path(argv[0]).stem, ROOT / argv[0])
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.parser().parse_args(argv[1:])  # argparse exits (status 2) on what the tool does not take
