"""Files and documents of the fuzz suite: strategy helpers (`pick`, `faults`), writing YAML/JSON, deep
nesting, relisting a library, and paths into JSON documents.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from fuzz_support import (
    OK,
)
from hypothesis import strategies as st

# ---------------------------------------------------------------------------------- files

def pick(draw, options: Sequence[tuple], faulty: bool):
    """One (value, verdict, ...) option: any of them when this dimension is the example's fault, else an OK one."""
    return draw(st.sampled_from(list(options) if faulty else [o for o in options if o[1] == OK]))


def faults(*dims: str) -> st.SearchStrategy[str]:
    """Which dimension of an example may be wrong: none (a third of the examples), one, or all ("any")."""
    return st.sampled_from(["none"] * max(2, len(dims) // 2) + list(dims) + ["any"])


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


def to_yaml(data: Any) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=10_000)


HUGE = "__FUZZ_HUGE_NUMBER__"  # json.dumps cannot write 1e400: this string is replaced by the literal


def to_json(data: Any) -> str:
    text = json.dumps(data, allow_nan=True)
    return text.replace(f'"{HUGE}"', "1e400")


def nested(depth: int, kind: str = "list") -> str:
    """A JSON/YAML flow document nested `depth` deep."""
    if kind == "list":
        return "[" * depth + "]" * depth
    return '{"a": ' * depth + "1" + "}" * depth


def relist(lib: Path) -> None:
    """Rewrite the manifest's checksums and sizes to match the files as they are now (a tampered
    library whose integrity check passes: only the sanity checks can refuse it)."""
    import hashlib

    mpath = lib / "manifest.json"
    try:
        m = json.loads(mpath.read_text(encoding="utf-8"))
        files = m["files"]
        assert isinstance(files, dict)
    except Exception:  # noqa: BLE001 - the manifest itself was broken on purpose
        return
    for name in list(files):
        p = lib / name
        if isinstance(files[name], dict) and p.is_file() and not p.is_symlink():
            files[name] = {**files[name], "sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
                           "bytes": p.stat().st_size}
    mpath.write_text(to_json(m), encoding="utf-8")


def json_paths(doc: Any, limit_depth: int = 7) -> list[tuple]:
    """Every location in a JSON document (keys and indices), breadth-first, the root excluded."""
    out: list[tuple] = []
    stack = [((), doc)]
    while stack:
        loc, node = stack.pop(0)
        if len(loc) >= limit_depth:
            continue
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for k, v in items:
            out.append(loc + (k,))
            stack.append((loc + (k,), v))
    return out


DELETE = object()


def set_at(doc: Any, loc: tuple, value: Any) -> bool:
    """doc[loc] = value (or delete it); False when the location no longer exists."""
    node = doc
    for k in loc[:-1]:
        try:
            node = node[k]
        except (KeyError, IndexError, TypeError):
            return False
    k = loc[-1]
    if isinstance(node, dict):
        if value is DELETE:
            node.pop(k, None)
        else:
            node[k] = value
        return True
    if isinstance(node, list) and isinstance(k, int) and k < len(node):
        if value is DELETE:
            del node[k]
        else:
            node[k] = value
        return True
    return False


def get_at(doc: Any, loc: tuple, default: Any = None) -> Any:
    node = doc
    for k in loc:
        try:
            node = node[k]
        except (KeyError, IndexError, TypeError):
            return default
    return node
