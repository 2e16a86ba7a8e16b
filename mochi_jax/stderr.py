"""Holding back what native libraries print on stderr (file descriptor 2, which Python's sys.stderr
does not see): `dropping_stderr(noise)` runs a block and then prints only the lines that do not match
`noise`. The standard library only, so a command can use it around `import jax` itself; the bottom
of the package's layers (every module may import it)."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile


@contextlib.contextmanager
def dropping_stderr(noise: re.Pattern):
    """Run the body with what it prints on stderr (the C++ libraries' logs included) held back, then
    print the lines that do not match `noise`."""
    sys.stderr.flush()
    with tempfile.TemporaryFile() as printed:
        saved = os.dup(2)
        os.dup2(printed.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            printed.seek(0)
            kept = [line for line in printed.read().decode(errors="replace").splitlines() if not noise.search(line)]
            if kept:
                print("\n".join(kept), file=sys.stderr, flush=True)
