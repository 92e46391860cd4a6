"""Where a library lies: outputs (predictions, models, other libraries) are never written inside one, since
any file added to a library folder makes it fail verification (or, worse, hides among its files)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from mergetool.core.errors import MergetoolError
from mergetool.core.outputs import check_writable
from mergetool.core.paths import expand_user
from mergetool.library.manifest import MANIFEST


def library_containing(path: Path) -> Optional[Path]:
    """The library folder that `path` is in (or is), if any: a folder holding manifest.json and shards."""
    p = expand_user(path).absolute()
    for folder in (p, *p.parents):
        if (folder / MANIFEST).is_file() and any(folder.glob("*.safetensors")):
            return folder
    return None


def check_output(path: Path, key: str, *, folder: bool = False, may_be_a_library: bool = False) -> None:
    """The checks of every output before any work: writable as a file (or as a folder, whose missing parents
    the writer makes), and not inside a library (see refuse_inside_library)."""
    check_writable(path, key, folder=folder, parents=folder)
    refuse_inside_library(path, key, may_be_a_library=may_be_a_library)


def refuse_inside_library(path: Path, key: str, *, may_be_a_library: bool = False) -> None:
    """One line when an output would land inside a library folder, or replace one unless `may_be_a_library`
    (export --force replaces a library; export-model must not)."""
    lib = library_containing(Path(path).parent if may_be_a_library else Path(path))
    if lib is not None:
        raise MergetoolError(f"{path} is inside the library {lib}; writing there would corrupt it", key=key,
                             fix="write outside the library folder")
