"""Task data files: jsonl, csv or parquet, read as plain records with located errors."""

from __future__ import annotations

import csv
import random
from pathlib import Path
from typing import Callable, Iterator, Optional

from mergetool.core.errors import DataError
from mergetool.core.safejson import UnsafeJSON, parse_json
from mergetool.recipe.schema import DataSplit

FORMATS = (".jsonl", ".json", ".csv", ".parquet")


def iter_records(path: str | Path, *, key: Optional[str] = None) -> Iterator[tuple[int, dict]]:
    """Yield (1-based line or row number, record) from a jsonl, csv or parquet file."""
    path = Path(path)
    if not path.is_file():
        raise DataError("data file not found", file=path, key=key, fix="check the path (relative to the recipe)")
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise DataError(f"unsupported data format {suffix!r}", file=path, key=key,
                        fix="use .jsonl, .csv or .parquet")
    try:
        if suffix in (".jsonl", ".json"):
            yield from _jsonl(path, key)
        elif suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as f:
                for i, row in enumerate(csv.DictReader(f), start=2):
                    yield i, row
        else:
            import pyarrow.parquet as pq

            for i, row in enumerate(pq.read_table(path).to_pylist(), start=1):
                yield i, row
    except DataError:
        raise
    except (OSError, UnicodeDecodeError, csv.Error, ValueError) as exc:
        raise DataError(f"cannot read data: {type(exc).__name__}: {exc}", file=path, key=key) from None


def _jsonl(path: Path, key: Optional[str]) -> Iterator[tuple[int, dict]]:
    with path.open(encoding="utf-8") as f:
        yield from jsonl_records(f, file=path, key=key)


def jsonl_records(lines, *, file, key: Optional[str] = None,
                  on_bad: Optional[Callable[[int, str], None]] = None) -> Iterator[tuple[int, dict]]:
    """(1-based line number, object) per non-blank line. A bad line raises DataError, or, with
    `on_bad`, is reported to it as (line number, why) and skipped."""
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = parse_json(line, max_bytes=None)
        except UnsafeJSON as exc:
            rec, why = None, f"is not JSON: {exc}"
        else:
            why = "is not a JSON object"
        if isinstance(rec, dict):
            yield i, rec
        elif on_bad is not None:
            on_bad(i, why)
        else:
            raise DataError(f"line {i} {why}", file=file, key=key, line=i, fix="one JSON object per line")


def read_split(split: DataSplit, *, key: Optional[str] = None, limit: Optional[int] = None) -> list[dict]:
    """All records of a split, checked for its columns; a seeded subset of `limit` rows if set.

    The subset is drawn with `split.seed` so the same recipe always scores the same examples.
    """
    text = None if split.image and "text" not in split.model_fields_set else split.text  # images need no text
    columns = [c for c in (text, split.text_pair, split.image, split.choices, split.label) if c]
    records = []
    for i, rec in iter_records(split.path, key=key):
        missing = [c for c in columns if c not in rec or rec[c] is None]
        if missing:
            raise DataError(f"record {i} has no column {missing[0]!r} (it has {sorted(rec)[:8]})",
                            file=split.path, key=key, line=i,
                            fix=f"set the split's column name, e.g. {_field(missing[0], split)}: <column>")
        wrong = [c for c in (text, split.text_pair) if c and not isinstance(rec[c], str)]
        if wrong:
            raise DataError(f"record {i}: column {wrong[0]!r} is a {type(rec[wrong[0]]).__name__}, not text",
                            file=split.path, key=key, line=i, fix="write the input text as a string")
        records.append(rec)
    if not records:
        raise DataError("data file is empty", file=split.path, key=key, fix="add examples")
    n = limit if limit is not None else split.limit
    if n is not None and n < len(records):
        idx = sorted(random.Random(split.seed).sample(range(len(records)), n))
        records = [records[i] for i in idx]
    return records


def _field(column: str, split: DataSplit) -> str:
    for name in ("text", "text_pair", "image", "choices", "label"):
        if getattr(split, name) == column:
            return name
    return "text"
