"""The project's file writes: whole files only, with the permissions any other program's new files
get (the umask), errors naming the real path, never a temporary file.

    make_dirs(folder)              mkdir -p, a file in the way named as such
    writable_dir(folder)           make it and check files can be created there, before any work
    write_atomically(path, data)   bytes, text or a writer function -> a temporary file renamed into place
    as_disk_error(e, path)         a library's error for a full disk -> OSError(ENOSPC) naming `path`
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Callable


def _named(e: OSError, path) -> OSError:
    """The same OSError (same type, errno and reason) naming `path` instead of a temporary file."""
    return type(e)(e.errno, e.strerror or str(e), str(path)) if e.errno else OSError(f"{path}: {e}")


def as_disk_error(e: BaseException, path) -> BaseException:
    """`e`, or for an error that says the disk is full in a library's words (tensorstore's
    RESOURCE_EXHAUSTED, a wrapped or unnamed ENOSPC / EDQUOT) the OSError naming `path`."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return e if e.filename else _named(e, path)
    text = str(e)
    if "RESOURCE_EXHAUSTED" in text or "No space left on device" in text or "Disk quota exceeded" in text:
        return OSError(errno.ENOSPC, "No space left on device", str(path))
    return e


def make_dirs(folder) -> Path:
    """mkdir -p, with a file in the way named as such (NotADirectoryError naming that file)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        in_the_way = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), folder)
        raise NotADirectoryError(errno.ENOTDIR, "Not a directory (a file is in the way)", str(in_the_way)) from e
    except OSError as e:
        raise _named(e, e.filename or folder) from e
    return folder


def writable_dir(folder) -> Path:
    """Make `folder` (and its parents) and check that files can be created in it, before any work
    is spent on what goes there. Raises the OSError (PermissionError, NotADirectoryError, EROFS,
    ENOSPC, ...) naming the folder, never a probe file."""
    folder = make_dirs(folder)
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise _named(e, folder) from e
    return folder


def write_atomically(path, data: bytes | str | Callable) -> Path:
    """Write `data` (bytes, text, or a function that writes to a binary file object) to `path`
    through a temporary file in the same folder, renamed into place when complete: a reader sees
    no file or the whole file. The file is created with open(), so it has the permissions any
    program's new file gets (0o666 minus the umask). An error (no such folder, permission, a
    read-only or full file system, `path` being a folder) names `path`, not the temporary file."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "Is a directory (a file name is needed)", str(path))
    make_dirs(path.parent)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename: a crash leaves the old file or the new one
        os.replace(tmp, path)
    except OSError as e:
        raise _named(e, path) from e
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # a read-only folder: there is nothing to remove
            pass
    return path

