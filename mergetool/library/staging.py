"""Outputs built in a temporary folder next to their target and swapped in whole, and what a killed
run leaves behind cleaned up by the next one.

`make_tmp(out)` makes `.NAME.tmp-PID-HOST-XXXXXXXX` beside `out`; `swap_in(tmp, out)` moves a replaced
target aside to `.NAME.old-PID-HOST-XXXXXXXX/lib`, renames tmp onto out, then removes the old one. Both
names carry their owner (pid, and a short hash of the host name), so that `recover(out)`, run by the next
export to the same target before it checks the target, touches only what a dead process left on this
host: a stale temporary folder is removed; an `.old-*` folder whose swap was interrupted is restored when
the target is missing, else removed. Folders of a live process, of another host (a shared file system)
or without an owner (older versions) are never touched.

`swap_in` also gives every file the mode an ordinary new file gets (0666 less the umask; the folder 0777
less the umask): writers such as `tempfile.mkstemp` or safetensors' own make private 0600 files.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Optional

OLD_LIB = "lib"  # the replaced target, inside its .old-* folder


def host_id() -> str:
    """This host, as it appears in owner tags: 8 hex digits of its name's sha256."""
    return hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def owner_tag() -> str:
    return f"{os.getpid()}-{host_id()}"


def _pattern(out: Path) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(out.name)}\.(tmp|old)-(\d{{1,10}})-([0-9a-f]{{8}})-[A-Za-z0-9_]+$")


def pid_alive(pid: int) -> bool:
    """Whether a process of this host has this pid; True when that cannot be told (never remove then)."""
    if os.name == "nt" or pid <= 0:  # os.kill(pid, 0) is no probe on Windows; 0 is the process group
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # EPERM: it exists, owned by another user
        return True
    return True


def _umask() -> int:
    """The process umask, read without changing it where /proc tells it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish_modes(folder: Path) -> None:
    """Ordinary permissions for an output folder and every file in it (not following links)."""
    mask = _umask()
    folder.chmod(0o777 & ~mask)
    for p in folder.iterdir():
        if p.is_file() and not p.is_symlink():
            p.chmod(0o666 & ~mask)


def make_tmp(out: Path) -> Path:
    """A fresh temporary folder next to `out` (same file system, so the final rename is atomic), named
    after its owner."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{owner_tag()}-", dir=out.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; an output is an ordinary folder
    return tmp


def swap_in(tmp: Path, out: Path) -> None:
    """Rename tmp onto out; a replaced target is moved aside first and removed afterwards."""
    tmp, out = Path(tmp), Path(out)
    publish_modes(tmp)
    old = None
    if out.exists() or out.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{owner_tag()}-", dir=out.parent))
        os.replace(out, old / OLD_LIB)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def leftovers(out: Path) -> list[tuple[str, Path]]:
    """(kind, folder) of every `.tmp-*`/`.old-*` folder beside `out` whose owner is dead on this host."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    pattern, here = _pattern(out), host_id()
    found = []
    try:
        entries = list(out.parent.iterdir())
    except OSError:  # an unreadable folder: nothing to clean that we could see
        return []
    for p in entries:
        m = pattern.match(p.name)
        if m and m.group(3) == here and p.is_dir() and not p.is_symlink() and not pid_alive(int(m.group(2))):
            found.append((m.group(1), p))
    return found


def recover(out: Path) -> Optional[Path]:
    """Clean what killed runs left beside `out`: restore the newest interrupted swap's old target when
    `out` is missing, remove the other stale folders. Returns the restored folder, if any."""
    out = Path(out)
    found = leftovers(out)
    olds = sorted((p for kind, p in found if kind == "old" and (p / OLD_LIB).exists()),
                  key=lambda p: p.stat().st_mtime, reverse=True)
    restored = None
    if olds and not out.exists() and not out.is_symlink():
        try:
            os.replace(olds[0] / OLD_LIB, out)
            restored = out
        except OSError:  # left where it is, with every other .old-* folder: nothing is lost
            found = [(kind, p) for kind, p in found if kind == "tmp"]
    for _, p in found:
        shutil.rmtree(p, ignore_errors=True)
    return restored
