"""Every command the documentation gives parses: each `python -m mochi_jax.<command>` line of
README.md and docs/*.md names a config file and preset that exist, fields its config has, and
values of the fields' types, and each `python tools/<tool>.py` line is accepted by the tool's own
command line (the demo's commands also run, in tests/test_layout.py)."""

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
from ml_collections.config_flags import tuple_parser

from mochi_jax import cli

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = {"train": "configs/lora.py", "sample": "configs/sample.py", "evaluate": "configs/eval.py",
            "prepare": "configs/prepare.py", "aot": "configs/lora.py"}


def documented_commands(pattern: str = r"python -m (mochi_jax\.\w+)(.*)") -> list[tuple[str, int, list[str]]]:
    """(file, line, argv) of every `python -m mochi_jax.<command> ...` (or what `pattern` matches: the
    command, then its arguments) in the docs' code, with continuation lines joined and shell comments,
    `&&` suffixes and ssh quoting taken off."""
    out = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        lines = doc.read_text().splitlines()
        i = 0
        while i < len(lines):
            start, text = i, lines[i]
            while text.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                text = text.rstrip()[:-1] + " " + lines[i].strip()
            i += 1
            m = re.search(pattern, text)
            if not m or re.search(r"`python (-m|tools)", text) and "--config" not in text:
                continue  # a name in prose, not a command
            rest = m.group(2).split("  #")[0].split(" # ")[0].split(" && ")[0].strip().rstrip("'\"`").strip()
            try:
                argv = shlex.split(rest)
            except ValueError:
                argv = shlex.split(rest.replace("'", ""))
            out.append((doc.name, start + 1, [m.group(1), *argv]))
    return out


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
