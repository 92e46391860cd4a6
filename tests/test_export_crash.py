"""Export leftovers: what a killed export leaves beside its target is cleaned by the next export.

Each temporary folder `.NAME.tmp-*` and each moved-aside `.NAME.old-*` names its owner (pid and host).
The next export to the same target removes those whose owner is dead on this host, restores an
interrupted replacement's old target when the target is missing (else removes it), and never touches a
live process's folder, another host's, or one without an owner. Every output file gets the ordinary
mode (0644 under umask 022), the router's weights too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from routed import invoke

from mergetool.library.reader import LibraryFiles
from mergetool.library.staging import host_id, make_tmp, swap_in
from mergetool.testing.toy import make_text_zoo, recipe_text

OTHER_HOST = "0badc0de" if host_id() != "0badc0de" else "0badcafe"


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A small exported library, and the recipe and grouping that export it again."""
    root = tmp_path_factory.mktemp("crash")
    base, tasks, data = make_text_zoo(root)
    recipe = root / "r.yaml"
    recipe.write_text(recipe_text(base, tasks, data, out=f"output: {root / 'run'}"))
    g = root / "g.json"
    g.write_text(json.dumps({"tasks": ["t0", "t1"], "grouping": [[0] * 8, [0, 1, 0, 1, 0, 1, 1, 1]]}))
    result, text = invoke("export", recipe, "--grouping", g, "--out", root / "lib")
    assert result.exit_code == 0, text
    return {"lib": root / "lib", "recipe": recipe, "grouping": g}


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _leftover(out: Path, kind: str, pid: int, host: str | None = None, lib: Path | None = None) -> Path:
    """A `.tmp-*`/`.old-*` folder as a run of `pid` on `host` names it (an `.old-*` holds `lib`)."""
    folder = out.parent / f".{out.name}.{kind}-{pid}-{host or host_id()}-k1ll3d00"
    folder.mkdir()
    if lib is not None:
        shutil.copytree(lib, folder / "lib")
    else:
        (folder / "partial.safetensors").write_bytes(b"half written")
    return folder


def _killed(code: str) -> None:
    """Run `code` in a child that kills itself with SIGKILL (no cleanup of any kind runs)."""
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert child.returncode == -9, child.stderr


def _crash_during_swap(out: Path, after: int) -> None:
    """A child that builds a new `out` and is killed just after the `after`-th rename of swap_in (1: the old
    target was moved aside, the new one not yet in place; 2: in place, the old not yet removed)."""
    _killed(f"""
import os
from pathlib import Path
import mergetool.library.staging as staging
real, calls = os.replace, []
def replace(a, b):
    real(a, b)
    calls.append(b)
    if len(calls) == {after}:
        os.kill(os.getpid(), 9)
staging.os.replace = replace
out = Path({str(out)!r})
tmp = staging.make_tmp(out)
(tmp / "manifest.json").write_text("new")
staging.swap_in(tmp, out)
""")


def _same_library(a: Path, b: Path) -> bool:
    return (a / "manifest.json").read_bytes() == (b / "manifest.json").read_bytes()


def test_killed_export_model_temp_folder_is_removed_by_the_next(zoo, tmp_path):
    out = tmp_path / "model"
    _killed(f"import os; from pathlib import Path; from mergetool.library.staging import make_tmp; "
            f"make_tmp(Path({str(out)!r})); os.kill(os.getpid(), 9)")
    killed = list(tmp_path.glob(".model.tmp-*"))
    assert len(killed) == 1
    stale = _leftover(out, "tmp", _dead_pid())
    live = _leftover(out, "tmp", os.getpid())  # a concurrent export of this very process
    other_host = _leftover(out, "tmp", _dead_pid(), host=OTHER_HOST)
    ownerless = tmp_path / ".model.tmp-abcd1234"  # an older version's: nobody can tell if it is live
    ownerless.mkdir()
    result, text = invoke("export-model", zoo["lib"], "--task", "t0", "--out", out)
    assert result.exit_code == 0, text
    assert not killed[0].exists() and not stale.exists()
    assert live.exists() and other_host.exists() and ownerless.exists()
    assert (out / "model.safetensors").is_file()


def test_killed_library_export_temp_folder_is_removed_by_the_next(zoo, tmp_path):
    out = tmp_path / "lib"
    stale = _leftover(out, "tmp", _dead_pid())
    live = _leftover(out, "tmp", os.getpid())
    result, text = invoke("export", zoo["recipe"], "--grouping", zoo["grouping"], "--out", out)
    assert result.exit_code == 0, text
    assert not stale.exists() and live.exists()
    LibraryFiles.load(out)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".lib.")) == [live.name]


def test_interrupted_swap_without_target_is_restored(zoo, tmp_path):
    out = tmp_path / "lib"
    shutil.copytree(zoo["lib"], out)
    _crash_during_swap(out, after=1)  # killed between moving the old library aside and the new one in
    assert not out.exists() and list(tmp_path.glob(".lib.old-*")) and list(tmp_path.glob(".lib.tmp-*"))
    result, text = invoke("export", zoo["recipe"], "--grouping", zoo["grouping"], "--out", out)
    assert result.exit_code == 2 and "already exists" in text, text  # restored, so not replaced without --force
    assert _same_library(out, zoo["lib"]) and not list(tmp_path.glob(".lib.*"))
    LibraryFiles.load(out, verify=True)


def test_interrupted_swap_with_target_removes_the_old(zoo, tmp_path):
    out = tmp_path / "lib"
    shutil.copytree(zoo["lib"], out)
    _crash_during_swap(out, after=2)  # killed after the new one is in place, before the old one is removed
    assert (out / "manifest.json").read_text() == "new" and list(tmp_path.glob(".lib.old-*"))
    live_old = _leftover(out, "old", os.getpid(), lib=zoo["lib"])
    result, text = invoke("export", zoo["recipe"], "--grouping", zoo["grouping"], "--out", out)
    assert result.exit_code == 2 and "exists" in text, text
    assert (out / "manifest.json").read_text() == "new"  # the completed swap's result is kept
    assert [p.name for p in tmp_path.glob(".lib.*")] == [live_old.name] and (live_old / "lib").is_dir()


def test_dead_old_folder_is_restored_by_export_model_too(zoo, tmp_path):
    out = tmp_path / "model"
    result, text = invoke("export-model", zoo["lib"], "--task", "t1", "--out", out)
    assert result.exit_code == 0, text
    aside = _leftover(out, "old", _dead_pid())
    os.replace(out, aside / "lib")  # as a kill between swap_in's two renames leaves it
    other_host = _leftover(out, "old", _dead_pid(), host=OTHER_HOST, lib=zoo["lib"])
    result, text = invoke("export-model", zoo["lib"], "--task", "t1", "--out", out)
    assert result.exit_code == 2 and "already exists" in text, text
    assert (out / "model.safetensors").is_file() and not aside.exists() and other_host.exists()
    result, text = invoke("export-model", zoo["lib"], "--task", "t1", "--out", out, "--force")
    assert result.exit_code == 0, text
    assert other_host.exists() and [p.name for p in tmp_path.glob(".model.*")] == [other_host.name]


def _modes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}


def test_every_output_file_has_the_ordinary_mode(zoo, tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    files = _modes(zoo["lib"])
    assert files["router.safetensors"] == 0o666 & ~mask, files
    assert set(files.values()) == {0o666 & ~mask}, files
    assert zoo["lib"].stat().st_mode & 0o777 == 0o777 & ~mask
    out = tmp_path / "model"
    result, text = invoke("export-model", zoo["lib"], "--task", "t0", "--out", out)
    assert result.exit_code == 0, text
    assert set(_modes(out).values()) == {0o666 & ~mask}


def test_swap_in_publishes_private_files(tmp_path):
    out = tmp_path / "out"
    tmp = make_tmp(out)
    assert tmp.name.startswith(f".out.tmp-{os.getpid()}-{host_id()}-")
    (tmp / "a.json").write_text("{}")
    (tmp / "a.json").chmod(0o600)  # as tempfile.mkstemp and safetensors make them
    swap_in(tmp, out)
    mask = os.umask(0o022)
    os.umask(mask)
    assert (out / "a.json").stat().st_mode & 0o777 == 0o666 & ~mask
    assert not tmp.exists() and not list(tmp_path.glob(".out.*"))
