"""The shared entry point of the `python -m mochi_jax.<command> --config=configs/<file>.py[:preset]` commands."""

from __future__ import annotations

import warnings


def run(default_config: str, fn, help_text: str):
    """Parse `--config` (an ml_collections config file, any field overridable as --config.a.b=...)
    and call fn(config). absl logging is WARNING unless --verbosity is given (orbax logs every
    save and restore at INFO); JAX's os.fork warning is silenced because the only forks are
    ffmpeg subprocesses (fork + exec, no Python in the child)."""
    from absl import app, flags, logging
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file("config", default_config, help_text, lock_config=True)

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}; settings go in --config.<field>=...")
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)
        warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
        fn(config.value)

    app.run(main)
