"""`export-model`: one task's chain, dequantised, as a plain Hugging Face checkpoint."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

from mergetool.core.errors import LibraryError
from mergetool.library.manifest import TOKENIZER_FILES
from mergetool.library.reader import LibraryFiles
from mergetool.library.safetensors_io import StreamWriter
from mergetool.library.sanity import check_task
from mergetool.library.staging import make_tmp, recover, swap_in
from mergetool.library.writer import EXTRA_FILES


def _check_out(out: Path, force: bool) -> None:
    recover(out)  # what a killed export-model left beside the target
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise LibraryError(f"{out} already exists", key="--out", fix="choose another --out or pass --force")
    looks_model = (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    if not out.is_dir() or out.is_symlink() or (any(out.iterdir()) and not looks_model):
        raise LibraryError(f"{out} exists and is not a model folder; --force only replaces model folders",
                           key="--out", fix="choose another --out")


def export_model(lib, task: str, out, *, force: bool = False, budget: Optional[float] = None,
                 solution: Optional[int] = None) -> Path:
    """Write config.json (the task's labels), model.safetensors (original names) and the tokenizer.

    `lib` is a library folder or an opened (verified) LibraryFiles."""
    out = Path(out).absolute()
    _check_out(out, force)
    if not isinstance(lib, LibraryFiles):
        lib = LibraryFiles.load(lib, budget=budget, solution=solution, verify=True)
    t = lib.manifest.task(task)
    check_task(lib.path, lib.manifest, task, lib.chain(task), lib.config(task))  # every weight, its head too
    tmp = make_tmp(out)
    try:
        w = StreamWriter(tmp / "model.safetensors")
        for name, tensor in lib.task_state(task).items():
            w.add(name, tensor)
        w.close()
        shutil.copyfile(lib.path / t.config, tmp / "config.json")
        for name in TOKENIZER_FILES + EXTRA_FILES:
            if name in lib.manifest.files:
                shutil.copyfile(lib.path / name, tmp / name)
        swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
