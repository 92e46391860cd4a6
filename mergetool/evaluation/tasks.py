"""Task data ready for evaluation: preprocessed once into batches, labels as class (or choice) ids."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from mergetool.core.errors import DataError, MergetoolError
from mergetool.evaluation.choice import CHOICE_KINDS, causal_batches, read_rows, seq2seq_batches
from mergetool.evaluation.data import read_split
from mergetool.evaluation.images import image_batches, load_processor, processor_dir
from mergetool.evaluation.metrics import REGRESSION
from mergetool.models.source import max_length_of
from mergetool.recipe.schema import Recipe, TaskConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "spiece.model", "vocab.json")


@dataclass
class TaskData:
    name: str
    metric: str
    batches: list[dict[str, torch.Tensor]]  # model inputs, padded per batch
    labels: np.ndarray  # references, in batch order (choice kinds: one per row, in record order)
    label_names: list[str]
    records: list[dict]  # the raw rows (custom evaluators get these)
    kind: str = "sequence_classification"
    pairs: Optional[np.ndarray] = None  # choice kinds: (row, choice) of each output, batch order
    norms: Optional[np.ndarray] = None  # choice kinds: each choice's length in characters

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

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token  # GPT-2 style tokenizers ship without one; masks keep padding out
    return tok


def load_preprocessor(kind: str, *dirs: Path, cache: Optional[dict] = None):
    """The tokenizer, or for image tasks the image processor, from the first folder holding one."""
    image = kind == "image_classification"
    folder = processor_dir(*dirs) if image else tokenizer_dir(*dirs)
    cache = {} if cache is None else cache
    if (image, folder) not in cache:
        cache[(image, folder)] = load_processor(folder) if image else load_tokenizer(folder)
    return cache[(image, folder)]


def task_data(recipe: Recipe, task: str, source, base_path: Path, *, split: str = "validation",
              batch_size: Optional[int] = None, cache: Optional[dict] = None,
              config: Optional[dict] = None) -> TaskData:
    """`load_task_data` with the task model's own preprocessor (else the base's); `config` replaces
    the model's config.json (adapters: see runner.adapter_config)."""
    kind = recipe.tasks[task].kind
    prep = load_preprocessor(kind, source.path, base_path, cache=cache)
    return load_task_data(recipe, task, source.config if config is None else config, prep, split=split,
                          batch_size=batch_size)


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
    """Read, label-map and preprocess one task's split into batches (text: length-sorted).

    `tokenizer` is the image processor for image_classification."""
    cfg: TaskConfig = recipe.tasks[task]
    spec = getattr(cfg, split)
    key = f"tasks.{task}.{split}"
    if spec is None:
        raise MergetoolError(f"task {task!r} has no {split} split", key=key, fix=f"add `{split}:` to the task")
    bs = batch_size or cfg.batch_size
    if cfg.kind in CHOICE_KINDS:
        return _choice_data(cfg, task, spec, key, model_config, tokenizer, bs, limit)
    records = read_split(spec, key=key, limit=limit)
    names = label_names(model_config)
    labels = map_labels([r[spec.label] for r in records], names, cfg.metric in REGRESSION, file=spec.path, key=key)
    if cfg.kind == "image_classification":
        if not spec.image:
            raise MergetoolError("an image task's split needs an `image` column", key=key, fix="add `image: <column>`")
        batches = image_batches(records, spec, tokenizer, batch_size=bs, key=key)
        return TaskData(task, cfg.metric, batches, labels, names, records, kind=cfg.kind)
    texts = [str(r[spec.text]) for r in records]
    pairs = [str(r[spec.text_pair]) for r in records] if spec.text_pair else None
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length_of([cfg.max_length], model_config))
    lengths = np.asarray([len(ids) for ids in enc["input_ids"]])
    order = np.argsort(-lengths, kind="stable")
    batches = []
    for start in range(0, len(order), bs):
        idx = order[start:start + bs]
        feats = [{k: enc[k][i] for k in enc.keys()} for i in idx]
        batches.append(dict(tokenizer.pad(feats, return_tensors="pt")))
    return TaskData(task, cfg.metric, batches, labels[order], names, [records[i] for i in order], kind=cfg.kind)


def _choice_data(cfg: TaskConfig, task: str, spec, key: str, model_config: dict, tokenizer, bs: int,
                 limit: Optional[int]) -> TaskData:
    if not spec.choices:
        raise MergetoolError("a choice task's split needs a `choices` column", key=key, fix="add `choices: <column>`")
    records = read_split(spec, key=key, limit=limit)
    texts, choices, labels = read_rows(records, spec, key=key)
    where = dict(max_length=max_length_of([cfg.max_length], model_config), batch_size=bs, file=spec.path, key=key)
    if cfg.kind == "causal_lm_choice":
        batches, pairs, norms = causal_batches(texts, choices, tokenizer, **where)
    else:
        start = model_config.get("decoder_start_token_id")
        start = model_config.get("pad_token_id", 0) if start is None else start
        batches, pairs, norms = seq2seq_batches(texts, choices, tokenizer, start_id=int(start or 0), **where)
    return TaskData(task, cfg.metric, batches, labels, [], records, kind=cfg.kind, pairs=pairs, norms=norms)
