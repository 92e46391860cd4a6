"""The run directory: what a search leaves behind, and how later commands find it.

    <output>/run.json                  recipe copy, its hash, versions, seed
    <output>/search/                   evaluations.jsonl, search_state.json, front.json, hv.csv,
                                       pareto.png, hv.png, reference.json, test_scores.json, summary.md
    <output>/baselines/baselines.json  from `mergetool baselines`
    <output>/router/                   the cached router
    <output>/libraries/budget-<B>/     the default `export --out`
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from mergetool.core.errors import MergetoolError
from mergetool.core.safejson import UnsafeJSON, is_number, parse_json
from mergetool.library.location import library_containing
from mergetool.recipe import Recipe, load_recipe, parse_recipe


def recipe_hash(recipe: Recipe) -> str:
    """Hash of everything that shapes a search's results (the evaluation budget may grow on resume;
    a run directory may be moved or copied, so `output` is left out)."""
    data = recipe.model_dump(mode="json")
    data.pop("output", None)
    data["search"].pop("evaluations", None)
    data["search"].pop("executor", None)
    data["search"].pop("ray", None)
    data.pop("router", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("mergetool", "torch", "transformers", "mergekit", "pymoo", "scikit-learn", "safetensors"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def write_json_atomic(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    return path


def prepare_run(recipe: Recipe, *, resume: bool, force: bool) -> Path:
    """Create or reopen the run directory for a search; refuse a run of a different recipe."""
    run = recipe.run_dir
    info_path = run / "run.json"
    journal = run / "search" / "evaluations.jsonl"
    digest = recipe_hash(recipe)
    _check_output_dir(run, recipe)
    lib = library_containing(run)
    if lib is not None:
        raise MergetoolError(f"output {run} is inside the library {lib}", file=recipe.path,
                             key="output", fix="set `output` to a folder outside any library")
    if info_path.is_file():
        old = _run_info(info_path, recipe, force).get("recipe_sha256")
        if old != digest and not force:
            raise MergetoolError(f"run directory {run} belongs to a different recipe (hash {str(old)[:12]})",
                                 file=recipe.path, key="output",
                                 fix="use --force to start over, or set another `output`")
        if old == digest and journal.is_file() and not (resume or force):
            raise MergetoolError(f"a search already ran in {run}", file=recipe.path, key="output",
                                 fix="--resume continues it, --force starts over")
    if force and (run / "search").exists():
        shutil.rmtree(run / "search")
    try:
        (run / "search").mkdir(parents=True, exist_ok=True)
        write_json_atomic(info_path, {
            "recipe_path": str(recipe.path) if recipe.path else None, "recipe_sha256": digest,
            "recipe_text": recipe.text, "seed": recipe.search.seed, "versions": versions(),
        })
    except OSError as e:
        raise MergetoolError(f"cannot write the run directory {run}: {e.strerror or e}", file=recipe.path,
                             key="output", fix="set `output` to a folder you can write") from None
    return run


def _check_output_dir(run: Path, recipe: Recipe) -> None:
    """`output` must be (or be creatable as) a folder: not a file, nor under one."""
    p = run
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        where = "is" if p == run else f"is under {p}, which is"
        raise MergetoolError(f"output {run} {where} a file, not a folder", file=recipe.path, key="output",
                             fix="set `output` to a folder")


def _run_info(path: Path, recipe: Recipe, force: bool) -> dict:
    """run.json, or {} with --force when it is unreadable (then it is rewritten)."""
    info = _parsed(path)
    if isinstance(info, dict):
        return info
    if force:
        return {}
    raise MergetoolError(f"{path} is not a readable run record", file=recipe.path, key="output",
                         fix="--force starts the run over, or restore run.json")


def resolve_run(arg: Optional[Path]) -> tuple[Path, Recipe]:
    """RUN argument: a run directory (with run.json) or a recipe file; defaults to the current folder."""
    arg = Path(arg) if arg else Path.cwd()
    if arg.is_file():
        recipe = load_recipe(arg)
        return recipe.run_dir, recipe
    info = arg / "run.json"
    if not info.is_file():
        raise MergetoolError(f"{arg} is neither a recipe nor a run directory (no run.json)", key="RUN",
                             fix="pass the recipe or the recipe's `output` folder after `mergetool search`")
    data = _parsed(info)
    if not isinstance(data, dict) or not isinstance(data.get("recipe_text"), str):
        raise MergetoolError(f"{info} is not a readable run record", key="RUN",
                             fix="pass the recipe instead, or re-run `mergetool search --force`")
    path = Path(data["recipe_path"]) if isinstance(data.get("recipe_path"), str) else None
    recipe = load_recipe(path) if path is not None and path.is_file() else None
    if recipe is None or recipe_hash(recipe) != data.get("recipe_sha256"):
        recipe = parse_recipe(data["recipe_text"], path or arg / "recipe.yaml")  # the recipe the run used
    return arg, recipe


def read_front(run_dir: Path, *, key: str = "RUN", otherwise: str = "") -> list[dict]:
    """RUN/search/front.json, checked: a list of {id, grouping, storage_cost, ...}; one line when it is not.
    `otherwise` ends each fix with the caller's alternative (", or pass --grouping G.json")."""
    path = run_dir / "search" / "front.json"
    if not path.is_file():
        raise MergetoolError(f"no Pareto front at {path}", key=key, fix=f"run `mergetool search` first{otherwise}")
    bad = MergetoolError("front.json is not a list of {id, grouping, performance, storage_cost, per_task}",
                         file=str(path), fix=f"re-run `mergetool search`{otherwise}")
    front = _parsed(path)
    if not isinstance(front, list) or not all(_front_record(r) for r in front):
        raise bad
    return front


def _front_record(r) -> bool:
    return (isinstance(r, dict) and {"id", "grouping", "storage_cost"} <= set(r) and isinstance(r["id"], int)
            and isinstance(r["grouping"], list) and is_number(r["storage_cost"])
            and (r.get("performance") is None or is_number(r["performance"]))
            and isinstance(r.get("per_task", {}), dict) and all(is_number(v) for v in r.get("per_task", {}).values()))


def read_references(path: Path) -> Optional[dict]:
    """reference.json: {name: {storage_cost, validation: {performance}}}, None when absent; one line when not."""
    refs = read_json_record(path)
    if refs is not None and not all(isinstance(r, dict) and is_number(r.get("storage_cost"))
                                    and isinstance(r.get("validation"), dict)
                                    and is_number(r["validation"].get("performance")) for r in refs.values()):
        raise MergetoolError(f"{path.name} is not a readable JSON record", file=str(path),
                             fix="delete it and re-run the command that writes it")
    return refs


def read_json_record(path: Path) -> Optional[dict]:
    """A run's JSON record (reference.json, baselines.json), None when absent; one line when unreadable."""
    if not path.is_file():
        return None
    data = _parsed(path)
    if not isinstance(data, dict):
        raise MergetoolError(f"{path.name} is not a readable JSON record", file=str(path),
                             fix="delete it and re-run the command that writes it")
    return data


def _parsed(path: Path):
    """The JSON in `path`, or None when it cannot be read or parsed (the callers say what they expected)."""
    try:
        return parse_json(path.read_bytes(), max_bytes=None)
    except (OSError, UnsafeJSON):
        return None
