"""Append-only evaluation journal (evaluations.jsonl) and the search state record.

One JSON line per real evaluation, flushed and fsync'ed. A line cut by a kill is dropped on
open (the file is truncated back to the last complete line). Records are keyed by "i", the
position of the evaluation in the search plan, so lines written out of order (parallel
executors) replay in the same order.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from mergetool.core.errors import MergetoolError
from mergetool.core.safejson import is_number, parse_json

FIELDS = (
    "i",
    "grouping",
    "per_task",
    "performance",
    "storage_cost",
    "predicted_performance",
    "seconds",
    "cache",
    "generation",
)
OPTIONAL = ("codecs", "subset", "continued", "screened_performance")  # codec menu, racing and bf16 records
STATE_NAME = "search_state.json"


def state_path(journal_path) -> Path:
    return Path(journal_path).with_name(STATE_NAME)


def _parse(lines: list[bytes], path: Path) -> tuple[list[dict], int, bool]:
    """Parse the lines; returns (records, byte length of the good prefix, last record lacks its newline)."""
    records: list[dict] = []
    good = 0
    no_newline = False
    for n, raw in enumerate(lines, start=1):
        text = raw.strip()
        if not text:
            good += len(raw)
            continue
        try:
            rec = parse_json(text, max_bytes=None)  # UnsafeJSON is a ValueError; never a RecursionError
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
            missing = [f for f in FIELDS if f not in rec]
            if missing:
                raise ValueError(f"missing {', '.join(missing)}")
            _check_types(rec)
        except ValueError as e:
            if n == len(lines):  # cut by a kill mid-write: drop it
                break
            raise MergetoolError(
                f"journal line {n} is not a valid evaluation record ({e})",
                file=str(path),
                line=n,
                fix="restore the journal or start a new run directory",
            ) from None
        records.append(rec)
        good += len(raw)
        no_newline = not raw.endswith(b"\n")
    return records, good, no_newline


def read_journal(path) -> list[dict]:
    """All complete records, sorted by "i" (read-only; a cut last line is ignored)."""
    path = Path(path)
    if not path.exists():
        return []
    records, _, _ = _parse(path.read_bytes().splitlines(keepends=True), path)
    return _check(records, path)


def _check_types(rec: dict) -> None:
    """The fields every reader relies on have their types (an edited journal fails here, in one line)."""
    if not isinstance(rec["i"], int) or isinstance(rec["i"], bool) or rec["i"] < 0:
        raise ValueError("i is not a non-negative integer")
    if not isinstance(rec["grouping"], list) or not is_number(rec["storage_cost"]):
        raise ValueError("grouping is not a list or storage_cost not a number")
    if rec.get("performance") is not None and not is_number(rec["performance"]):
        raise ValueError("performance is not a number")
    if not isinstance(rec["per_task"], dict) or not all(v is None or is_number(v) for v in rec["per_task"].values()):
        raise ValueError("per_task is not a mapping of task -> number")
    if "codecs" in rec and not (isinstance(rec["codecs"], list) and all(isinstance(c, str) for c in rec["codecs"])):
        raise ValueError("codecs is not a list of codec labels")


def _check(records: list[dict], path: Path) -> list[dict]:
    by_i: dict[int, dict] = {}
    for r in records:
        i = int(r["i"])
        if i in by_i:
            raise MergetoolError(f"journal holds evaluation i={i} twice", file=str(path), fix="start a new run directory")
        by_i[i] = r
    return [by_i[i] for i in sorted(by_i)]


class Journal:
    """The journal opened for appending; repairs a cut last line on open."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        records: list[dict] = []
        if self.path.exists():
            data = self.path.read_bytes()
            records, good, no_newline = _parse(data.splitlines(keepends=True), self.path)
            if good < len(data) or no_newline:
                with open(self.path, "r+b") as f:
                    f.truncate(good)  # drop the cut line
                    f.seek(good)
                    if no_newline:
                        f.write(b"\n")
                    f.flush()
                    os.fsync(f.fileno())
        self.records: dict[int, dict] = {int(r["i"]): r for r in _check(records, self.path)}
        self._f = open(self.path, "a", encoding="utf-8")

    def __len__(self) -> int:
        return len(self.records)

    def get(self, i: int) -> Optional[dict]:
        return self.records.get(i)

    def append(self, record: dict) -> dict:
        """Write one record as a line, flush and fsync; returns the JSON round-tripped record."""
        fields = FIELDS + tuple(f for f in OPTIONAL if f in record)
        line = json.dumps({f: record[f] for f in fields}, default=str)  # odd cache values become strings
        self._f.write(line + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        rec = json.loads(line)
        self.records[int(rec["i"])] = rec
        return rec

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_state(journal_path) -> Optional[dict[str, Any]]:
    p = state_path(journal_path)
    if not p.exists():
        return None
    try:
        return parse_json(p.read_bytes(), max_bytes=None)
    except ValueError:
        return None  # a torn write cannot happen (atomic replace); treat garbage as absent


def write_state(journal_path, state: dict[str, Any]) -> None:
    """Atomically replace the state record (write temp, fsync, rename)."""
    p = state_path(journal_path)
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(state, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)
