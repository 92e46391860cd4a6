"""Library tampering strategies (manifest, configs, safetensors headers, files) and CLI option values of
the fuzz suite.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fuzz_files import (
    DELETE,
    HUGE,
    json_paths,
    nested,
    set_at,
    to_json,
    write,
)
from fuzz_strategies import (
    INF,
    NAN,
)
from fuzz_support import (
    _short,
)
from hypothesis import strategies as st

# ---------------------------------------------------------------------------------- library tampering

JSON_JUNK = [None, True, False, -5, -1, 0, 1, 0.5, 10**30, 2**63, HUGE, NAN, INF, "", "x", "../../secret.json",
             "/etc/passwd", "A" * 300, "\u0000", [], {}, [1, "a"], {"a": 1}, json.loads(nested(80))]
DTYPES = ["I32", "F16", "BF16", "I8", "U8", "BOOL", "F64", "I64", "XX", "", 5, None]
SHAPES = [[HUGE], [-1], [0], [10**12], [10**12, 10**12], [], [1.5], ["a"], None, 5, [2**63]]
OFFSETS = [[0, 0], [-8, 8], [0, 10**15], [8, 4], [0], "x", None, [0, 2**70]]
METADATA = [5, [], "x", None, {"format": 5}, {"format": ["pt"]}, {"a": {"b": 1}}, {"format": "pt", "x": None}]


@dataclass(frozen=True)
class Tamper:
    """One change to a copy of a library; `apply(lib, secret)` performs it."""
    kind: str
    target: str
    loc: tuple = ()
    value: Any = None

    def __repr__(self) -> str:
        v = "" if self.value is None and self.kind not in ("json_set",) else f" = {_short(repr(self.value))}"
        return f"Tamper({self.kind} {self.target}{'.' + '.'.join(map(str, self.loc)) if self.loc else ''}{v})"

    def apply(self, lib: Path, secret: Path) -> None:
        p = lib / self.target
        if self.kind in ("json_set", "json_delete"):
            try:
                doc = json.loads(p.read_text(encoding="utf-8"))
            except Exception:  # noqa: BLE001 - an earlier tamper broke it
                return
            set_at(doc, self.loc, DELETE if self.kind == "json_delete" else copy.deepcopy(self.value))
            p.write_text(to_json(doc), encoding="utf-8")
        elif self.kind == "json_replace":
            write(p, self.value)
        elif self.kind == "header_set":
            _edit_header(p, self.loc, self.value)
        elif self.kind == "bytes":
            if not p.is_file():
                return
            raw = bytearray(p.read_bytes())
            op, n = self.value
            if op == "truncate":
                raw = raw[: min(n, len(raw))]
            elif op == "flip" and raw:
                raw[n % len(raw)] ^= 0xFF
            elif op == "empty":
                raw = bytearray()
            elif op == "append":
                raw += b"\x00" * n
            p.write_bytes(bytes(raw))
        elif self.kind == "delete":
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
        elif self.kind == "symlink":
            if p.exists() or p.is_symlink():
                p.unlink() if not p.is_dir() or p.is_symlink() else shutil.rmtree(p)
            target = {"secret": secret / "secret.json", "secret_dir": secret, "loop": p, "dangling":
                      lib / "nowhere", "sibling": lib / "manifest.json"}[self.value]
            os.symlink(target, p)
        elif self.kind == "extra":
            name, data = self.value
            if data is None:
                (lib / name).mkdir(exist_ok=True)
            else:
                write(lib / name, data)
        elif self.kind == "recipe_paths":
            _point_recipe_at(lib, secret, self.value)


def _edit_header(path: Path, loc: tuple, value: Any) -> None:
    try:
        raw = path.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
    except Exception:  # noqa: BLE001 - an earlier tamper broke it
        return
    if loc and loc[0] == "<tensor>":
        names = sorted(k for k in header if k != "__metadata__")
        if not names:
            return
        loc = (names[0],) + loc[1:]
    set_at(header, loc, DELETE if value is DELETE else copy.deepcopy(value))
    text = to_json(header).encode("utf-8")
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])


def _point_recipe_at(lib: Path, secret: Path, how: str) -> None:
    """The manifest's embedded recipe reads its data from the secret folder (absolute, `../`, symlink)."""
    import yaml

    mpath = lib / "manifest.json"
    try:
        m = json.loads(mpath.read_text(encoding="utf-8"))
        r = yaml.safe_load(m["recipe"])
    except Exception:  # noqa: BLE001
        return
    target = {"absolute": str(secret / "secret.jsonl"),
              "parent": os.path.relpath(secret / "secret.jsonl", lib),
              "link": "data/secret.jsonl"}[how]
    if how == "link":
        (lib / "data").mkdir(exist_ok=True)
        os.symlink(secret / "secret.jsonl", lib / "data" / "secret.jsonl")
    for task in (r.get("tasks") or {}).values():
        for split in ("validation", "test", "router"):
            if isinstance(task.get(split), dict):
                task[split]["path"] = target
    m["recipe"] = yaml.safe_dump(r, sort_keys=False)
    mpath.write_text(json.dumps(m), encoding="utf-8")


def tampers(lib: Path) -> st.SearchStrategy[Tamper]:
    """Changes to a library: JSON edits (manifest, configs, router, tokenizer), whole-file replacements,
    safetensors header edits, byte damage, deletions, symlinks, extra files, recipe paths."""
    jsons = {p.name: json.loads(p.read_text()) for p in sorted(lib.glob("*.json"))}
    shards = sorted(p.name for p in lib.glob("*.safetensors"))
    files = sorted(p.name for p in lib.iterdir())
    per_file = {name: json_paths(doc) for name, doc in jsons.items()}
    json_names = sorted(per_file)
    edits = st.sampled_from(json_names).flatmap(lambda n: st.tuples(
        st.just(n), st.sampled_from(per_file[n] or [("x",)]), st.sampled_from(JSON_JUNK + [DELETE])).map(
        lambda t: Tamper("json_delete" if t[2] is DELETE else "json_set", t[0], t[1],
                         None if t[2] is DELETE else t[2])))
    whole = st.tuples(st.sampled_from(json_names), st.sampled_from(
        ["{}", "[]", '"x"', "5", "null", "not json", "{", b"\xff\xfe", "", nested(5000), nested(70, "obj"),
         '{"a": 1e400}', '{"a": NaN}'])).map(lambda t: Tamper("json_replace", t[0], (), t[1]))
    targeted = st.sampled_from([
        Tamper("json_set", "config.json", ("hidden_size",), 32), Tamper("json_set", "config.json", ("model_type",), "nope"),
        Tamper("json_set", "config.json", ("vocab_size",), 3), Tamper("json_set", "config.json", ("max_position_embeddings",), 2),
        Tamper("json_set", "config.json", ("num_hidden_layers",), 5), Tamper("json_set", "config.json", ("num_attention_heads",), 3),
        Tamper("json_replace", "config.json", (), "[1, 2]"), Tamper("json_replace", "tokenizer.json", (), "{}"),
        Tamper("json_set", "router.json", ("max_length",), -5), Tamper("json_set", "router.json", ("in_dim",), 7),
        Tamper("json_set", "router.json", ("hidden",), [3, 3]), Tamper("json_set", "router.json", ("tasks",), ["a"]),
        Tamper("json_set", "manifest.json", ("router", "max_length"), -5),
        Tamper("json_set", "manifest.json", ("tasks", 0, "labels"), []),
        Tamper("json_set", "manifest.json", ("tasks", 0, "heads"), {}),
        Tamper("json_set", "manifest.json", ("tasks", 0, "name"), "../escape"),
        Tamper("json_set", "manifest.json", ("tasks", 0, "name"), "x" * 300),
        Tamper("json_set", "manifest.json", ("default_solution",), 7),
        Tamper("json_set", "manifest.json", ("storage_cost",), HUGE),
        Tamper("json_set", "manifest.json", ("format_version",), 3),
        Tamper("json_set", "manifest.json", ("base", "config"), "../outside.json"),
        Tamper("recipe_paths", "manifest.json", (), "absolute"), Tamper("recipe_paths", "manifest.json", (), "parent"),
        Tamper("recipe_paths", "manifest.json", (), "link"),
        Tamper("header_set", "router.safetensors", ("__metadata__",), 5),
        Tamper("header_set", "router.safetensors", ("__metadata__",), {"format": ["pt"]}),
        *[Tamper("header_set", s, ("<tensor>", "dtype"), "I32") for s in shards[:2]],
        *[Tamper("header_set", s, ("<tensor>", "shape"), [HUGE]) for s in shards[:2]],
    ])
    header = st.tuples(st.sampled_from(shards), st.one_of(
        st.tuples(st.just(("<tensor>", "dtype")), st.sampled_from(DTYPES)),
        st.tuples(st.just(("<tensor>", "shape")), st.sampled_from(SHAPES)),
        st.tuples(st.just(("<tensor>", "data_offsets")), st.sampled_from(OFFSETS)),
        st.tuples(st.just(("__metadata__",)), st.sampled_from(METADATA)),
        st.tuples(st.just(("<tensor>",)), st.sampled_from([DELETE, 5, [], {}])),
        st.tuples(st.just(("extra/../name",)), st.just({"dtype": "F32", "shape": [1], "data_offsets": [0, 4]})),
    )).map(lambda t: Tamper("header_set", t[0], t[1][0], t[1][1]))
    damage = st.tuples(st.sampled_from(files), st.sampled_from(
        [("truncate", 0), ("truncate", 7), ("truncate", 100), ("flip", -1), ("flip", 9), ("empty", 0), ("append", 16)])
    ).map(lambda t: Tamper("bytes", t[0], (), t[1]))
    removal = st.sampled_from(files).map(lambda f: Tamper("delete", f))
    links = st.tuples(st.sampled_from(files), st.sampled_from(["secret", "secret_dir", "loop", "dangling", "sibling"])
                      ).map(lambda t: Tamper("symlink", t[0], (), t[1]))
    extra = st.sampled_from([("weights.pkl", b"\x80\x04K\x01."), (".hidden", "x"), ("sub", None),
                             ("model.safetensors", b"\x00" * 16), ("experts-99999-of-00001.safetensors", b"")]
                            ).map(lambda v: Tamper("extra", v[0], (), v))
    return st.one_of(targeted, targeted, targeted, edits, edits, whole, header, header, damage, removal, links, extra)


# ---------------------------------------------------------------------------------- CLI options

BAD_NUMBERS = ["abc", "", "-1", "0", "nan", "inf", "-inf", "1e400", "-1e400", "0x10", "1,5", "1.5.1", "--1"]
ODD_NUMBERS = ["9" * 40, " 3", "१२", "1_0", "+2"]  # Python's float() takes them: accepting them is fine too
