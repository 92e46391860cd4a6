"""The one check of an output path, made before any work: the right kind, in a folder that exists and that
this process can write (probed with a temporary file, removed at once: permission bits lie for root, and
/proc or a read-only mount refuse only when written)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from mergetool.core.errors import MergetoolError
from mergetool.core.paths import expand_user


def check_writable(path: Path, key: str, *, folder: bool = False, parents: bool = False) -> None:
    """One line (MergetoolError naming `key`) unless `path` can be written as a file (or as a folder).
    `parents`: the writer creates missing parent folders, so the nearest existing one must be writable."""
    path = expand_user(path).absolute()
    if not folder and path.is_dir():
        raise MergetoolError(f"{path} is a directory", key=key, fix="give a file path")
    if folder and path.exists() and not path.is_dir():
        raise MergetoolError(f"{path} is a file", key=key, fix="give a folder path")
    parent = path.parent
    while parents and not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        what = "is a file" if parent.exists() else "does not exist"
        raise MergetoolError(f"the folder {parent} {what}", key=key, fix="create the folder or choose another path")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise MergetoolError(f"cannot write in {parent}: {e.strerror or e}", key=key,
                             fix="choose a folder you can write") from None
