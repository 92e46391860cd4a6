"""Hypothesis strategies of the fuzz suite: recipe mutations with a verdict, recipes generated from the
JSON Schema, raw YAML texts and predict input lines.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from fuzz_files import (
    DELETE,
    nested,
    set_at,
)
from fuzz_support import (
    ANY,
    BAD,
    OK,
    _short,
)
from hypothesis import strategies as st

# ---------------------------------------------------------------------------------- recipe strategies

@dataclass(frozen=True)
class Mut:
    """One edit of a recipe dict: set `loc` to `value` (or DELETE); `verdict` for the whole recipe."""
    loc: tuple
    value: Any
    verdict: str
    label: str

    def __repr__(self) -> str:
        v = "<delete>" if self.value is DELETE else _short(repr(self.value))
        return f"Mut({'.'.join(map(str, self.loc)) or '<root>'} = {v}; {self.verdict}: {self.label})"


NAN, INF = float("nan"), float("inf")
JUNK_SCALARS = [None, True, "", "abc", [], {}, {"a": 1}, [1, 2], -1, 0, 10**30, 1e308, NAN, INF, -INF]


def _num_case(v: Any) -> str:
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return type(v).__name__


def number_slot(loc: tuple, *, lo=None, hi=None, lo_in=True, hi_in=True, integer=False, required=False,
                finite=True, name: str = "") -> st.SearchStrategy[Mut]:
    """A numeric recipe field: values inside its range (ok), outside, non-finite, of the wrong type (bad)."""
    name = name or ".".join(map(str, loc))

    def inside(v) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        if isinstance(v, float) and not math.isfinite(v):
            return not finite and not math.isnan(v) and (hi is None or v < 0) and (lo is None or v > 0)
        if integer and not float(v).is_integer():
            return False
        if lo is not None and not (lo <= v if lo_in else lo < v):
            return False
        return hi is None or (v <= hi if hi_in else v < hi)

    if integer:
        good = st.integers(min_value=lo if lo is None else int(lo) + (0 if lo_in else 1),
                           max_value=None if hi is None else int(hi) - (0 if hi_in else 1)).map(
            lambda v: max(min(v, 10**6), -10**6) if lo is None or hi is None else v)
    else:
        good = st.floats(min_value=lo, max_value=hi, exclude_min=lo is not None and not lo_in,
                         exclude_max=hi is not None and not hi_in, allow_nan=False, allow_infinity=False)
    edges = [NAN, INF, -INF, -1, 0, 1, 0.5, 1.5, 2, 1e308, -1e308, 2**64, 2**70, "abc", "", [], {"x": 1}, "1e400"]
    for b in (lo, hi):
        if b is not None:
            edges += [b, b - 1, b + 1, b - 1e-9, b + 1e-9]
    if not required:
        edges.append(DELETE)
    if required:
        edges.append(None)

    def verdict(v) -> str:
        if v is DELETE:
            return ANY
        if isinstance(v, bool):
            return ANY  # lax YAML/pydantic coercion is not this suite's business
        if inside(v):
            return ANY if abs(v) > 1e9 else OK  # absurd but in range: refusing it is fine too
        return BAD

    return st.one_of(good, st.sampled_from(edges)).map(
        lambda v: Mut(loc, v, verdict(v), f"{name}={_short(repr(v)) if v is not DELETE else 'deleted'}"
                      f"{'' if verdict(v) != BAD else ' (out of range/type)'}"))


def choice_slot(loc: tuple, choices: Sequence[str], *, bad_extra: Sequence = (), name: str = "") -> st.SearchStrategy[Mut]:
    name = name or ".".join(map(str, loc))
    bad = ["", "nope", " " + choices[0], choices[0] + "x", 5, [], {"a": 1}, *bad_extra]
    return st.one_of(
        st.sampled_from(list(choices)).map(lambda v: Mut(loc, v, OK, f"{name}={v}")),
        st.sampled_from(bad).map(lambda v: Mut(loc, v, BAD, f"{name}={v!r} (not a choice)")),
    )


TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
ODD_NAMES = ["", "../x", "..", ".", "a/b", "/abs", "x" * 65, "x" * 300, "bad name!", "tâche", "t0\n", "-x", ".hidden",
             "C:\\x", "a\x00b", "🤖", "con", "t" + "é" * 10, " t0", "t0 "]
ODD_PATHS = ["", "../x.jsonl", "../../../../../../nonexistent-fuzz/x.jsonl", "/nonexistent-fuzz/x.jsonl",
             "/dev/null", "~/nonexistent-fuzz.jsonl", "x" * 300 + ".jsonl", "dir/", "${FUZZ_UNSET_VAR}/x.jsonl",
             "C:\\data\\x.jsonl", "\u00e9\u00e8.jsonl", "a\nb.jsonl"]


def name_value(taken: Sequence[str] = ("t0",)) -> st.SearchStrategy[tuple[str, str]]:
    """(task name, verdict): names as file names are safe only when they match TASK_NAME; a name already
    taken by another task is a duplicate."""
    return st.one_of(
        st.from_regex(TASK_NAME, fullmatch=True).filter(lambda s: len(s) <= 64 and "\n" not in s),
        st.sampled_from(ODD_NAMES + list(taken)),
    ).map(lambda s: (s, OK if TASK_NAME.match(s) and "\n" not in s and s not in taken else BAD))


def rename_task(recipe: dict, old: str, new: str) -> dict:
    r = copy.deepcopy(recipe)
    for m in r.get("models", []):
        if isinstance(m, dict) and m.get("name") == old:
            m["name"] = new
    if isinstance(r.get("tasks"), dict) and old in r["tasks"]:
        r["tasks"] = {(new if k == old else k): v for k, v in r["tasks"].items()}
    return r


def apply(recipe: dict, muts: Iterable[Mut]) -> dict:
    """The recipe with the edits made (a whole-recipe edit first); missing parent mappings are created."""
    r = copy.deepcopy(recipe)
    for m in sorted(muts, key=lambda m: len(m.loc) != 0):
        value = DELETE if m.value is DELETE else copy.deepcopy(m.value)
        if m.loc == ():
            r = value
            continue
        node = r
        for k in m.loc[:-1]:
            if isinstance(node, dict):
                if not isinstance(node.get(k), (dict, list)):
                    node[k] = {}
                node = node[k]
            elif isinstance(node, list) and isinstance(k, int) and k < len(node):
                node = node[k]
            else:
                node = None
                break
        if node is not None:
            set_at(node, m.loc[-1:], value)
    return r


def named_paths(recipe: Any, base_dir: Path) -> list[Path]:
    """The local paths a recipe names (models, data, output): reading them is reading its inputs."""
    out = []

    def add(v):
        if isinstance(v, str) and v.strip() and not v.startswith("pkg:") and "\x00" not in v:
            p = Path(os.path.expanduser(v))
            p = p if p.is_absolute() else base_dir / p
            if str(p.resolve()) != "/":
                out.append(p)

    if not isinstance(recipe, dict):
        return out
    add(recipe.get("base_model"))
    add(recipe.get("output"))
    for m in recipe.get("models") or [] if isinstance(recipe.get("models"), list) else []:
        if isinstance(m, dict):
            add(m.get("model"))
    tasks = recipe.get("tasks")
    for t in tasks.values() if isinstance(tasks, dict) else []:
        for split in ("validation", "test", "router"):
            if isinstance(t, dict) and isinstance(t.get(split), dict):
                add(t[split].get("path"))
    return out


@contextmanager
def scratch(root: Path):
    """A fresh folder for one example, removed afterwards."""
    root.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(dir=root))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------------------- schema-driven

def from_schema(schema: dict, *, junk: float = 0.1, max_items: int = 3) -> st.SearchStrategy:
    """Values of a (pydantic) JSON Schema: $ref, anyOf, enum/const, objects, arrays, numbers with bounds,
    strings; with probability `junk` any value is replaced by an out-of-schema scalar."""
    defs = schema.get("$defs", {})

    def gen(s: dict, depth: int) -> st.SearchStrategy:
        if "$ref" in s:
            return st.deferred(lambda: gen(defs[s["$ref"].split("/")[-1]], depth + 1))
        if "anyOf" in s:
            return st.one_of([gen(x, depth) for x in s["anyOf"]])
        if "const" in s:
            return st.just(s["const"])
        if "enum" in s:
            return st.sampled_from(s["enum"])
        t = s.get("type")
        if t == "object" or "properties" in s:
            props = s.get("properties", {})
            required = set(s.get("required", []))
            extra = s.get("additionalProperties")
            fixed = {k: gen(v, depth + 1) for k, v in props.items() if k in required}
            optional = {k: gen(v, depth + 1) for k, v in props.items() if k not in required}
            base = st.fixed_dictionaries(fixed, optional=optional)
            if isinstance(extra, dict) and depth < 6:
                more = st.dictionaries(st.from_regex(TASK_NAME, fullmatch=True), gen(extra, depth + 1),
                                       max_size=max_items)
                return st.tuples(base, more).map(lambda bm: {**bm[1], **bm[0]})
            if extra is True:
                return st.tuples(base, st.dictionaries(st.sampled_from(["weight", "lambda", "density", "t", "x"]),
                                                      st.floats(-2, 2), max_size=2)).map(lambda bm: {**bm[1], **bm[0]})
            return base
        if t == "array":
            item = s.get("items")
            if isinstance(item, dict):
                return st.lists(gen(item, depth + 1), min_size=s.get("minItems", 0),
                                max_size=max(s.get("minItems", 0), s.get("maxItems", max_items)))
            if "prefixItems" in s:
                return st.tuples(*[gen(x, depth + 1) for x in s["prefixItems"]]).map(list)
            return st.lists(st.integers(), max_size=max_items)
        if t == "integer":
            lo = s.get("minimum", s.get("exclusiveMinimum", -10) + (1 if "exclusiveMinimum" in s else 0))
            hi = s.get("maximum", s.get("exclusiveMaximum", lo + 1000) - (1 if "exclusiveMaximum" in s else 0))
            return st.integers(min_value=lo, max_value=min(hi, lo + 10**6))
        if t == "number":
            return st.floats(min_value=s.get("minimum", s.get("exclusiveMinimum")),
                             max_value=s.get("maximum", s.get("exclusiveMaximum")),
                             exclude_min="exclusiveMinimum" in s, exclude_max="exclusiveMaximum" in s,
                             allow_nan=False, allow_infinity=False)
        if t == "boolean":
            return st.booleans()
        if t == "string":
            return st.text(st.characters(codec="utf-8", exclude_characters="$"), max_size=12)
        if t == "null":
            return st.none()
        return st.one_of(st.none(), st.integers(), st.text(max_size=5))

    junk_values = st.sampled_from([5, -3, "x", [], {}, None, NAN, INF, 2**70, [[1]], {"q": [1]}])
    top = gen(schema, 0)
    if not junk:
        return top
    # junk replaces whole sections: the schema says which, jsonschema says whether the result is invalid
    sections = st.lists(st.tuples(st.sampled_from(sorted(schema.get("properties", {}))), junk_values), max_size=2)
    return st.tuples(top, sections).map(lambda tj: {**tj[0], **dict(tj[1])} if isinstance(tj[0], dict) else tj[0])


def schema_invalid(schema: dict, data: Any) -> Optional[str]:
    """The first JSON Schema error of `data`, or None."""
    import jsonschema

    try:
        err = next(iter(jsonschema.Draft202012Validator(schema).iter_errors(data)), None)
    except Exception as exc:  # noqa: BLE001 - a NaN in an enum comparison, etc.
        return f"schema check raised {type(exc).__name__}"
    return None if err is None else f"{'.'.join(map(str, err.absolute_path)) or '<root>'}: {err.message[:120]}"


# ---------------------------------------------------------------------------------- YAML text

YAML_PIECES = [
    ("anchor+alias", "x: &a [1, 2]\ny: *a\n", BAD),
    ("merge key", "base: &b {population: 2}\nsearch:\n  <<: *b\n", BAD),
    ("python tag", "name: !!python/object/apply:os.system ['true']\n", BAD),
    ("binary tag", "name: !!binary aGVsbG8=\n", BAD),
    ("set tag", "name: !!set {a, b}\n", BAD),
    ("tab indent", "search:\n\tpopulation: 2\n", BAD),
    ("two documents", "---\nname: a\n---\nname: b\n", BAD),
    ("duplicate key", "name: a\nname: b\n", BAD),
    ("deep flow 200", "deep: " + "[" * 200 + "]" * 200 + "\n", BAD),
    ("unclosed", "name: [unclosed\n", BAD),
    ("bom", "\ufeffname: a\n", ANY),
    ("crlf", "name: a\r\nother: 1\r\n", ANY),
    ("null doc", "~\n", BAD),
    ("scalar doc", "just a string\n", BAD),
    ("list doc", "- a\n- b\n", BAD),
    ("nul byte", "name: a\x00b\n", BAD),
    ("env var", "name: ${FUZZ_UNSET_VAR}\n", BAD),
    ("long line", "name: " + "x" * 20000 + "\n", ANY),
    ("unicode key", "nämé: 1\n", BAD),
    ("int key", "1: a\n", BAD),
    ("complex key", "? [a, b]\n: c\n", BAD),
    ("timestamp", "name: 2001-12-14t21:59:43.10-05:00\n", ANY),
    ("empty", "", BAD),
    ("comment only", "# nothing\n", BAD),
]


def yaml_text(valid_text: str) -> st.SearchStrategy[tuple[bytes, str, str]]:
    """(recipe bytes, verdict, label): a valid recipe's text with pieces spliced in, cut, or garbled."""
    lines = valid_text.splitlines(keepends=True)

    def splice(args) -> tuple[bytes, str, str]:
        (label, piece, verdict), where, mode = args
        where = min(where, len(lines))
        if mode == "insert":  # a bad piece spoils the recipe wherever it lands
            text = "".join(lines[:where]) + piece + "".join(lines[where:])
        elif mode == "replace":  # a lone piece is never a whole recipe
            text, verdict = piece, BAD
        else:  # the recipe cut before line `where` (required keys lost), then the piece
            text = "".join(lines[:where]) + piece
            verdict = verdict if where == len(lines) else BAD
        return text.encode("utf-8"), verdict, f"{mode} {label} at line {where + 1}"

    def garble(args) -> tuple[bytes, str, str]:
        cut, junk = args
        raw = valid_text.encode("utf-8")
        return raw[:cut] + junk, ANY, f"cut at byte {cut} + {junk[:20]!r}"

    non_utf8 = st.sampled_from([b"\xff\xfe", b"\x80", b"name: caf\xe9\n", b"\xc3\x28"]).map(
        lambda b: (valid_text.encode() + b, BAD, f"non-UTF-8 bytes {b!r}"))
    return st.one_of(
        st.tuples(st.sampled_from(YAML_PIECES), st.integers(0, len(lines)),
                  st.sampled_from(["insert", "replace", "truncate"])).map(splice),
        st.tuples(st.integers(0, len(valid_text)), st.binary(max_size=30)).map(garble),
        non_utf8,
    )


# ---------------------------------------------------------------------------------- predict inputs

@dataclass(frozen=True)
class Line:
    raw: bytes
    kind: str  # good | bad | blank | maybe

    def __repr__(self) -> str:
        return f"Line({self.kind}: {self.raw[:80]!r}{'...' if len(self.raw) > 80 else ''})"


WORDS = [f"w{i}" for i in range(59)]


def _j(obj) -> bytes:
    return json.dumps(obj).encode("utf-8")


def predict_line(field_name: str = "text", *, good_only: bool = False) -> st.SearchStrategy[Line]:
    words = st.lists(st.sampled_from(WORDS + ["[UNK]", "zzz", "é", "🤖"]), min_size=1, max_size=12).map(" ".join)
    if good_only:
        return words.map(lambda t: Line(_j({field_name: t}), "good"))
    return st.one_of(
        words.map(lambda t: Line(_j({field_name: t}), "good")),
        words.map(lambda t: Line(_j({field_name: t, "id": 7, "extra": [1, {"a": None}]}), "good")),
        st.text(min_size=1, max_size=40).filter(lambda s: s.strip()).map(lambda t: Line(_j({field_name: t}), "good")),
        st.sampled_from([5000, 40000]).map(lambda n: Line(_j({field_name: "w1 " * n}), "good")),  # > position table
        st.sampled_from([None, [], {}, ["w1"], {"a": "w1"}, True]).map(lambda v: Line(_j({field_name: v}), "bad")),
        st.sampled_from([1, 2.5, 10**30]).map(lambda v: Line(_j({field_name: v}), "maybe")),
        st.just(Line(_j({field_name: ""}), "maybe")),
        st.just(Line(_j({"other": "w1"}), "bad")),
        st.sampled_from([b"{oops", b"[1]", b'"w1"', b"null", b"42", b"{'text': 'w1'}", b'{"text": "w1"',
                         b'{"text": NaN}', b'{"text": "w1", "x": 1e400}', b'{"text": "w1", "text": 5}']).map(
            lambda raw: Line(raw, "bad" if raw not in (b'{"text": "w1", "x": 1e400}', b'{"text": "w1", "text": 5}')
                             else "maybe")),
        st.sampled_from([b'{"text": "caf\xe9"}', b"\xff\xfe\x00", b'{"text": "\xc3\x28"}']).map(lambda r: Line(r, "bad")),
        st.sampled_from([b"", b"   ", b"\t"]).map(lambda r: Line(r, "blank")),
        st.sampled_from([100, 1000]).map(lambda d: Line(b'{"text": "w1", "x": ' + nested(d).encode() + b"}", "maybe")),
    )
