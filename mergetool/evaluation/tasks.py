"""Task data ready for evaluation: tokenised once, length-sorted batches, labels as class ids."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from mergetool.errors import DataError, MergetoolError
from mergetool.evaluation.data import read_split
from mergetool.evaluation.metrics import REGRESSION
from mergetool.recipe.schema import Recipe, TaskConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "spiece.model", "vocab.json")


@dataclass
class TaskData:
    name: str
    metric: str
    batches: list[dict[str, torch.Tensor]]  # model inputs, padded per batch
    labels: np.ndarray  # references, in batch order
    label_names: list[str]
    records: list[dict]  # the raw rows (custom evaluators get these)

    @property
    def size(self) -> int:
        return len(self.labels)


def tokenizer_dir(*dirs: Path) -> Path:
    """The first folder holding tokenizer files (the task model's own, then the base's)."""
    for d in dirs:
        if d is not None and any((Path(d) / f).is_file() for f in TOKENIZER_FILES):
            return Path(d)
    raise MergetoolError(f"no tokenizer files in {', '.join(str(d) for d in dirs if d)}", key="models",
                         fix="save the tokenizer next to the fine-tune (tokenizer.save_pretrained)")


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def label_names(config: dict) -> list[str]:
    id2label = config.get("id2label") or {}
    n = int(config.get("num_labels") or len(id2label) or 2)
    return [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(n)]


def map_labels(values: list, names: list[str], regression: bool, *, file, key) -> np.ndarray:
    """Data labels (names as in id2label, or class ids) to class ids; floats for regression."""
    if regression:
        try:
            return np.asarray([float(v) for v in values], dtype=np.float64)
        except (TypeError, ValueError):
            raise DataError("regression labels must be numbers", file=file, key=key) from None
    index = {n: i for i, n in enumerate(names)}
    out = np.empty(len(values), dtype=np.int64)
    for i, v in enumerate(values):
        if isinstance(v, str) and v in index:
            out[i] = index[v]
        elif isinstance(v, (int, np.integer)) or (isinstance(v, str) and v.strip().lstrip("-").isdigit()):
            out[i] = int(v)
            if not 0 <= out[i] < len(names):
                raise DataError(f"label {v!r} is not among the model's {len(names)} classes", file=file, key=key,
                                fix=f"use class ids 0..{len(names) - 1} or the names {names[:6]}")
        else:
            raise DataError(f"label {v!r} is not among the model's classes {names[:8]}", file=file, key=key,
                            fix="write labels as the model's id2label names or as class ids")
    return out


def load_task_data(recipe: Recipe, task: str, model_config: dict, tokenizer, *, split: str = "validation",
                   batch_size: Optional[int] = None, limit: Optional[int] = None) -> TaskData:
    """Read, label-map and tokenise one task's split into length-sorted batches."""
    cfg: TaskConfig = recipe.tasks[task]
    spec = getattr(cfg, split)
    key = f"tasks.{task}.{split}"
    if spec is None:
        raise MergetoolError(f"task {task!r} has no {split} split", key=key, fix=f"add `{split}:` to the task")
    if cfg.kind not in ("sequence_classification", "custom"):
        raise MergetoolError(f"task kind {cfg.kind!r} is not supported by the evaluator yet", key=f"tasks.{task}.kind",
                             fix="use sequence_classification or custom")
    records = read_split(spec, key=key, limit=limit)
    names = label_names(model_config)
    labels = map_labels([r[spec.label] for r in records], names, cfg.metric in REGRESSION, file=spec.path, key=key)
    texts = [str(r[spec.text]) for r in records]
    pairs = [str(r[spec.text_pair]) for r in records] if spec.text_pair else None
    enc = tokenizer(texts, pairs, truncation=True, max_length=cfg.max_length)
    lengths = np.asarray([len(ids) for ids in enc["input_ids"]])
    order = np.argsort(-lengths, kind="stable")
    bs = batch_size or cfg.batch_size
    batches = []
    for start in range(0, len(order), bs):
        idx = order[start:start + bs]
        feats = [{k: enc[k][i] for k in enc.keys()} for i in idx]
        batches.append(dict(tokenizer.pad(feats, return_tensors="pt")))
    return TaskData(task, cfg.metric, batches, labels[order], names, [records[i] for i in order])
