"""Load a recipe: YAML with positions, `~` and `${VAR}` expansion, paths made absolute, located errors."""

from __future__ import annotations

import difflib
import os
import re
import typing
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ValidationError

from mergetool.core.errors import MultiError, RecipeError
from mergetool.core.paths import expand_user
from mergetool.recipe.schema import Recipe

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_SPLITS = ("validation", "test", "router")
MAX_RECIPE_BYTES = 2**20  # resource limits (README: "Limits"): a recipe is a few KB; this stops bombs
MAX_RECIPE_DEPTH = 64


def looks_like_path(ref: str, base_dir: Optional[Path] = None) -> bool:
    """True for references that must only ever be read locally (never sent to the Hub)."""
    if ref.startswith(("./", "../", "/", "~", ".\\", "..\\")) or ref in (".", ".."):
        return True
    return base_dir is not None and (base_dir / ref).exists()


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file; raises RecipeError / MultiError with file:line:col."""
    path = expand_user(path)
    if not path.is_file():
        raise RecipeError("recipe file not found", file=path, fix="check the path")
    try:
        if path.stat().st_size > MAX_RECIPE_BYTES:
            raise RecipeError(f"the recipe is larger than {MAX_RECIPE_BYTES // 1024} KB", file=path,
                              fix="a recipe names files; keep data and weights in their own files")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read recipe: {exc}", file=path) from None
    return parse_recipe(text, path)


def parse_recipe(text: str, path: Optional[Path] = None) -> Recipe:
    """Validate recipe YAML `text`; `path` locates errors and anchors relative paths."""
    path = Path(path).resolve() if path else None
    base_dir = path.parent if path else Path.cwd()
    data, positions = _parse_yaml(text, path)

    def err(message: str, loc: tuple, fix: Optional[str] = None) -> RecipeError:
        line, col = _position(positions, loc)
        return RecipeError(message, file=path, key=_label(loc), fix=fix, line=line, col=col)

    errors: list[RecipeError] = []
    data = _expand_env(data, (), err, errors)
    if errors:
        raise MultiError(errors)
    _resolve_paths(data, base_dir)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        errs = [_from_pydantic(e, data, err) for e in exc.errors()]
        raise MultiError(sorted(errs, key=lambda x: (x.line or 0, x.col or 0))) from None
    return recipe.with_source(path, text, positions)


# --- YAML with positions -------------------------------------------------------------------------

def _parse_yaml(text: str, path: Optional[Path]) -> tuple[Any, dict]:
    if len(text) > MAX_RECIPE_BYTES:
        raise RecipeError(f"the recipe is larger than {MAX_RECIPE_BYTES // 1024} KB", file=path,
                          fix="a recipe names files; keep data and weights in their own files")
    try:
        _check_events(text, path)  # aliases and depth, before anything recursive builds the document
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise _broken(exc, path) from None
    if not isinstance(data, dict) or node is None:
        raise RecipeError("a recipe is a YAML mapping (name:, base_model:, models:, tasks:, ...)", file=path)
    positions: dict = {(): (node.start_mark.line + 1, node.start_mark.column + 1)}
    dupes: list[RecipeError] = []
    _walk(node, (), positions, dupes, path)
    if dupes:
        raise MultiError(dupes)
    return data, positions


def _broken(exc: yaml.YAMLError, path: Optional[Path]) -> RecipeError:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return RecipeError(f"broken YAML: {problem}", file=path, line=mark.line + 1 if mark else None,
                       col=mark.column + 1 if mark else None, fix="fix the YAML syntax at that position")


def _check_events(text: str, path: Optional[Path]) -> None:
    """Refuse anchors and aliases (a "billion laughs" expands a few lines into gigabytes) and nesting deeper
    than MAX_RECIPE_DEPTH, reading the event stream (flat: no recursion, nothing expanded)."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        where = dict(file=path, line=event.start_mark.line + 1, col=event.start_mark.column + 1)
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise RecipeError("YAML anchors and aliases (&name, *name) are not allowed in recipes", **where,
                              fix="write the value out in full")
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_RECIPE_DEPTH:
                raise RecipeError(f"the recipe is nested deeper than {MAX_RECIPE_DEPTH} levels", **where,
                                  fix="a recipe is a few levels deep; check the indentation or brackets")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def _walk(node: yaml.Node, loc: tuple, positions: dict, dupes: list, path: Optional[Path]) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set = set()
        for key_node, value_node in node.value:
            key = key_node.value
            if not isinstance(key, str):
                dupes.append(RecipeError("a key must be a plain name, not a list or mapping", file=path,
                                         line=key_node.start_mark.line + 1, col=key_node.start_mark.column + 1,
                                         fix="write `name: value`"))
                continue
            if key in seen:
                dupes.append(RecipeError(
                    f"duplicate key {key!r}", file=path, key=_label(loc + (key,)),
                    line=key_node.start_mark.line + 1, col=key_node.start_mark.column + 1,
                    fix="keep one of the two entries"))
            seen.add(key)
            positions[loc + (key,)] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            _walk(value_node, loc + (key,), positions, dupes, path)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            positions[loc + (i,)] = (item.start_mark.line + 1, item.start_mark.column + 1)
            _walk(item, loc + (i,), positions, dupes, path)


def _position(positions: dict, loc: tuple) -> tuple[Optional[int], Optional[int]]:
    loc = tuple(loc)
    while loc and loc not in positions:
        loc = loc[:-1]
    return positions.get(loc, (None, None))


def _label(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# --- expansion and paths --------------------------------------------------------------------------

def _expand_env(value: Any, loc: tuple, err, errors: list) -> Any:
    if isinstance(value, dict):
        return {k: _expand_env(v, loc + (k,), err, errors) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, loc + (i,), err, errors) for i, v in enumerate(value)]
    if isinstance(value, str) and "${" in value:
        def sub(m: re.Match) -> str:
            name, default = m.group(1), m.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            errors.append(err(f"environment variable ${{{name}}} is not set", loc,
                              f"export {name}=... or write ${{{name}:-default}}"))
            return m.group(0)
        return _ENV.sub(sub, value)
    return value


def _resolve_paths(data: dict, base_dir: Path) -> None:
    def local(p: Any) -> Any:
        return str((base_dir / expand_user(p)).resolve()) if isinstance(p, str) else p

    def model_ref(ref: Any) -> Any:
        if isinstance(ref, str) and not ref.startswith("pkg:") and looks_like_path(ref, base_dir):
            return local(ref)
        return ref

    data["base_model"] = model_ref(data.get("base_model"))
    models, tasks = data.get("models"), data.get("tasks")  # wrong types are the schema's to report
    for entry in models if isinstance(models, list) else []:
        if isinstance(entry, dict):
            entry["model"] = model_ref(entry.get("model"))
    for task in tasks.values() if isinstance(tasks, dict) else []:
        for split in _SPLITS:
            if isinstance(task, dict) and isinstance(task.get(split), dict):
                task[split]["path"] = local(task[split].get("path"))
    if isinstance(data.get("output"), str):
        data["output"] = local(data["output"])


# --- pydantic errors as one located line each -----------------------------------------------------

def _from_pydantic(e: dict, data: dict, err) -> RecipeError:
    loc = tuple(e["loc"])
    kind = e["type"]
    msg = e["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if kind == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.5)
        fix = f"did you mean {close[0]!r}?" if close else f"allowed keys: {', '.join(allowed)}"
        return err(f"unknown key {loc[-1]!r}", loc, fix)
    if kind == "missing":
        return err("missing required key", loc, f"add `{loc[-1]}:` here")
    if kind == "literal_error":
        expected = re.findall(r"'([^']*)'", msg)
        got = e.get("input")
        close = difflib.get_close_matches(str(got), expected, n=1, cutoff=0.5)
        fix = f"did you mean {close[0]!r}?" if close else f"use one of {', '.join(expected)}"
        return err(f"invalid value {got!r}", loc, fix)
    if not loc or loc in (("models",),) and "task" in msg:
        loc = ("tasks",) if "under `models`" in msg else ("models",)
    got = e.get("input")
    shown = f" (got {got!r})" if kind.endswith(("_type", "_parsing")) and not isinstance(got, (dict, list)) else ""
    fix = _TYPE_FIXES.get(kind)
    return err(msg + shown, loc, fix.format(**(e.get("ctx") or {})) if fix else None)


_TYPE_FIXES = {  # pydantic error type -> fix (formatted with the error's ctx)
    "greater_than_equal": "use a value >= {ge}", "greater_than": "use a value > {gt}",
    "less_than_equal": "use a value <= {le}", "less_than": "use a value < {lt}",
    "tuple_type": "write a list here", "list_type": "write a list here",
    "dict_type": "write a mapping (key: value) here", "int_type": "write a whole number here",
    "int_parsing": "write a whole number here", "int_from_float": "write a whole number here",
    "float_type": "write a number here", "float_parsing": "write a number here",
    "string_type": "write a string here", "bool_type": "write true or false here",
    "bool_parsing": "write true or false here",
}


def _allowed_keys(loc: tuple) -> list[str]:
    model: Any = Recipe
    for part in loc:
        model = _inner(model)
        if isinstance(model, type) and issubclass(model, BaseModel):
            model = model.model_fields[part].annotation if part in model.model_fields else None
        elif isinstance(part, (int, str)):  # tuple item or dict value
            model = _item(model)
        if model is None:
            return []
    model = _inner(model)
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def _inner(tp: Any) -> Any:
    """Strip Optional[...] to the model type."""
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _item(tp: Any) -> Any:
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin in (tuple, list) and args:
        return args[0]
    if origin is dict and len(args) == 2:
        return args[1]
    return None
