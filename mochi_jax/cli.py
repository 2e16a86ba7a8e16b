"""The shared entry point of the `python -m mochi_jax.<command> --config=configs/<file>.py[:preset]` commands.

`--config` names a config file (any field overridable as --config.a.b=...). A relative path is
looked up in the current directory first, then among the installed project's configs
(`mochi_jax.configs`, the repository's configs/ folder), so the same spelling works from any
directory; an absolute path is used as it is.

User errors end a command with one message naming the path or setting and the reason, on stderr,
and exit status 2: a missing, unreadable or unwritable path, a path of the wrong kind (a file
where a folder is needed or the other way round), a full or read-only file system, an input or
setting the project refuses (ValueError and its kinds: LoraFormatError, ConversionError,
CacheError, VideoError, TargetError, the config checks) and flags the config cannot take.
Anything else is a bug and shows its traceback (so do user errors with MOCHI_JAX_TRACEBACK=1).
An outcome that is neither (training stopped early by a signal, or diverged) is one line with its
own exit status (the exception's `exit_status`; the statuses are listed in the README and docs/training.md).
"""

from __future__ import annotations

import ast
import difflib
import errno
import importlib.util
import os
import re
import sys
import warnings
from importlib import resources
from pathlib import Path

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from mochi_jax.lib import placement


def resolve_config(spec: str) -> str:
    """'configs/lora.py:demo' -> '/abs/.../configs/lora.py:demo' (see the module docstring); a
    file found nowhere is left as given, so the config loader names it in its error."""
    path, sep, preset = spec.partition(":")
    p = Path(path).expanduser()
    if p.is_absolute() or p.is_file():
        return str(p.absolute()) + sep + preset
    installed = Path(str(resources.files("mochi_jax.configs"))) / p.name
    if p.parent.name in ("configs", "") and installed.is_file():
        return str(installed) + sep + preset
    return spec


class ListParser(flags.ArgumentParser):
    """--config.<list field>='["a", "b"]' (or a tuple, or JSON): list and tuple fields of a config are
    set from the command line as Python literals; a bare word is a list of one."""

    syntactic_help = 'a Python list, e.g. \'["a dog surfing", "a cat"]\''

    def parse(self, argument):
        if isinstance(argument, (list, tuple)):
            return list(argument)
        try:
            value = ast.literal_eval(argument)
        except (ValueError, SyntaxError):
            return [argument]  # a single string
        if isinstance(value, (list, tuple)):
            return list(value)
        return [value]


config_flags.register_flag_parser_for_type(list, ListParser())


class BadFlags(ValueError):
    """A --config or --config.<field> flag the command cannot take."""


def _load_config(spec: str):
    """The ConfigDict that `--config=<file>[:preset]` names (the file run as the flag would run it)."""
    path, _, preset = spec.partition(":")
    if not Path(path).is_file():
        known = sorted(p.name for p in Path(str(resources.files("mochi_jax.configs"))).glob("*.py")
                       if not p.name.startswith("_") and p.name != "common.py")
        raise BadFlags(f"--config={spec}: no such config file (the project's: configs/{', configs/'.join(known)})")
    module_spec = importlib.util.spec_from_file_location(f"_mochi_jax_config_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
        return module.get_config(preset) if preset else module.get_config()
    except ValueError as e:  # the config's own check, e.g. an unknown preset
        raise BadFlags(f"--config={spec}: {e}") from None


def check_fields(config, argv: list[str]) -> None:
    """Refuse a `--config.<a.b.c>` that names no field of `config`, naming the nearest fields."""
    for arg in argv[1:]:
        name = arg.split("=", 1)[0]
        if not name.startswith(("--config.", "--noconfig.")):
            continue
        node, where = config, []
        for part in name.split(".", 1)[1].split("."):
            fields = list(node.keys()) if hasattr(node, "keys") else []
            if part not in fields:
                near = difflib.get_close_matches(part, fields, n=3, cutoff=0.6)
                place = ".".join(where) or "the config"
                hint = (f"did you mean {', '.join('.'.join([*where, f]) for f in near)}? " if near else "")
                raise BadFlags(f"{name}: {place} has no field {part!r}; {hint}"
                               f"{'its' if where else 'the'} fields: {', '.join(sorted(map(str, fields)))}"
                               if fields else f"{name}: {place} is a value, not a block of fields")
            node, where = node[part], where + [part]


def field_comments(*files) -> dict:
    """Comments of config fields, read from config files: the comment on a field's line, else the
    comment lines just above it. A `c.a.b = ...` line gives the field 'a.b'; a line with one
    `name=...` keyword gives (block, 'name'), the block being the last name of the latest `c.<path> =`
    or `def <block>(` line above it (common.py's block functions are named as the blocks)."""
    out: dict = {}
    block = ""
    for path in files:
        above: list[str] = []
        for line in Path(path).read_text().splitlines():
            text = line.strip()
            if text.startswith("#"):
                above.append(text.lstrip("# "))
                continue
            code, _, trailing = line.partition("  #")
            comment, above = trailing.strip() or " ".join(above), []
            target = re.match(r"\s*c\.([A-Za-z_][\w.]*)\s*=(?!=)", code)
            function = re.match(r"\s*def ([A-Za-z_]\w*)\(", code)
            if target or function:
                block = target.group(1).rsplit(".", 1)[-1] if target else function.group(1)
            keywords = re.findall(r"(?:^|[\s,(])([A-Za-z_]\w*)=(?!=)", code)
            if not comment:
                continue
            if target:
                out.setdefault(target.group(1), comment)
            elif len(keywords) == 1:
                out.setdefault((block, keywords[0]), comment)
    return out


def fields_help(spec: str, command: str) -> str:
    """What --help prints: the config file's description and every field with its default and the
    comment beside it in the config files."""
    path = Path(spec.partition(":")[0])
    config = _load_config(spec)
    comments = field_comments(path, path.with_name("common.py"))
    module = ast.get_docstring(ast.parse(path.read_text())) or ""
    lines = [f"python -m {command} --config={path.parent.name}/{path.name}[:preset] [--config.<field>=<value> ...]",
             "", module, "", "Fields (default; the comment beside it in the config file):"]

    def walk(node, where):
        for key in node.keys():
            value, name = node[key], ".".join([*where, str(key)])
            if hasattr(value, "keys") and len(value):
                walk(value, [*where, str(key)])
                continue
            note = comments.get(name) or comments.get((where[-1] if where else "", str(key)), "")
            note = note if len(note) <= 160 else note[:157] + "..."
            shown = value.to_dict() if hasattr(value, "to_dict") else value  # an empty block: {}
            lines.append(f"  --config.{name}={shown!r}" + (f"  # {note}" if note else ""))

    walk(config, [])
    lines += ["", "Lists and tuples are set as Python literals, e.g. --config.validation.prompts='[\"a\", \"b\"]'."]
    return "\n".join(lines)


def _resolve_argv(argv: list[str], default: str) -> list[str]:
    out, seen = [], False
    for i, a in enumerate(argv):
        if i > 0 and a.startswith("--config="):
            a, seen = "--config=" + resolve_config(a[len("--config="):]), True
        out.append(a)
    if not seen:
        out.insert(1, "--config=" + resolve_config(default))
    return out


# errnos that say something about the user's paths or disk, not about the code
USER_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENOSPC,
               errno.EROFS, errno.EDQUOT, errno.ENAMETOOLONG, errno.EFBIG, errno.ENOTEMPTY, errno.ELOOP}


def user_error(e: BaseException) -> str | None:
    """The message for an error the user can fix (see the module docstring), or None for a bug.
    An OSError reads '<path>: <reason>' (its filename is the path the project meant, never a
    temporary file: the project's writers name the real one)."""
    if isinstance(e, OSError) and (e.errno in USER_ERRNOS or isinstance(
            e, (FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError, FileExistsError))):
        if e.filename is not None and e.strerror:
            where = str(e.filename) + (f" -> {e.filename2}" if e.filename2 is not None else "")
            return f"{where}: {e.strerror}"
        return str(e) or type(e).__name__
    if isinstance(e, ValueError):
        return str(e) or type(e).__name__
    return None


def fail(command: str, e: BaseException) -> int:
    """Print `<command>: <message>` for a user error and return exit status 2, or for an outcome
    with its own status (an exception's `exit_status`: training stopped early or diverged) return
    that; re-raise anything else (a bug), or everything with MOCHI_JAX_TRACEBACK=1."""
    status = getattr(e, "exit_status", None)
    message = str(e) if status else user_error(e)
    if message is None or os.environ.get("MOCHI_JAX_TRACEBACK"):
        raise e
    print(f"{command}: {message}", file=sys.stderr, flush=True)
    return status or 2


def run(default_config: str, fn, help_text: str, command: str, show_devices: bool = True):
    """Parse `--config` and call fn(config); `command` ('mochi_jax.train') prefixes error messages.
    absl logging is WARNING unless --verbosity is given (orbax logs every save and restore at
    INFO); JAX's os.fork warning is silenced because the only forks are ffmpeg subprocesses (fork +
    exec, no Python in the child). User errors exit with status 2 and one message (see above),
    also flags absl or the config file refuse. The first line names the devices (`show_devices`;
    the fit check, which compiles for other devices, leaves it out)."""
    config = config_flags.DEFINE_config_file("config", None, help_text, lock_config=True)
    started = []

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}; settings go in --config.<field>=...")
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)
        warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
        started.append(True)
        try:
            placement.start(config.value.get("distributed"))  # the processes joined, the devices up, quietly
            if show_devices and jax.process_index() == 0:
                print(f"{command}: {placement.describe_devices()}", flush=True)
            fn(config.value)
        except Exception as e:  # noqa: BLE001 - user errors become one line, bugs are re-raised
            sys.exit(fail(command, e))

    def parse(args):  # absl's flag errors in one line too
        try:
            return flags.FLAGS(args)
        except flags.Error as e:
            print(f"{command}: bad flags: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
            sys.exit(2)

    argv = _resolve_argv(list(sys.argv), default_config)
    spec = next(a for a in argv[1:] if a.startswith("--config=")).split("=", 1)[1]
    try:
        if any(a in ("--help", "-h", "--helpshort") for a in argv[1:]):
            print(fields_help(spec, command))
            sys.exit(0)
        check_fields(_load_config(spec), argv)
    except BadFlags as e:
        print(f"{command}: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    try:
        app.run(main, argv=argv, flags_parser=parse)
    except SystemExit as e:
        if not started and e.code not in (0, None):
            sys.exit(2)  # absl refused the flags or the config file, and said why
        raise
    except Exception as e:  # noqa: BLE001 - a flag the config loader could not take (an unknown field, a bad value)
        if started:
            raise
        message = str(e).split("\\n")[-1].strip("'\" ")  # absl's repr of a KeyError: keep its last line
        print(f"{command}: bad flags: {' '.join(message.split())}", file=sys.stderr)
        sys.exit(2)
