"""The shared entry point of the `python -m mochi_jax.<command> --config=configs/<file>.py[:preset]` commands.

`--config` names a config file (any field overridable as --config.a.b=...). A relative path is
looked up in the current directory first, then among the installed project's configs
(`mochi_jax.configs`, the repository's configs/ folder), so the same spelling works from any
directory; an absolute path is used as it is.
"""

from __future__ import annotations

import sys
import warnings
from importlib import resources
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags


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


def _resolve_argv(argv: list[str], default: str) -> list[str]:
    out, seen = [], False
    for i, a in enumerate(argv):
        if i > 0 and a.startswith("--config="):
            a, seen = "--config=" + resolve_config(a[len("--config="):]), True
        out.append(a)
    if not seen:
        out.insert(1, "--config=" + resolve_config(default))
    return out


def run(default_config: str, fn, help_text: str):
    """Parse `--config` and call fn(config). absl logging is WARNING unless --verbosity is given
    (orbax logs every save and restore at INFO); JAX's os.fork warning is silenced because the only
    forks are ffmpeg subprocesses (fork + exec, no Python in the child)."""
    config = config_flags.DEFINE_config_file("config", None, help_text, lock_config=True)

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}; settings go in --config.<field>=...")
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)
        warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
        fn(config.value)

    app.run(main, argv=_resolve_argv(list(sys.argv), default_config))
