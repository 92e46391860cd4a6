"""Racing on validation inputs: each task's fixed subset of whole batches, and what its score is worth.

The subset is drawn once per (data, fraction, seed): among seeded random draws of whole batches, the one
whose label counts are closest (L1) to `fraction` × the split's label counts, so it is stratified by label
and sized to the fraction. Because it is made of whole batches, a full evaluation is the subset's batches
plus the others, and every batch runs the same forward either way: a raced-then-completed score is
bitwise the one-shot score.

The uncertainty of a subset score is its standard error: binomial (Agresti-Coull) for accuracy, a seeded
bootstrap over rows for the other metrics. A custom evaluator is a black box: its error is unknown (inf),
so racing never drops a candidate on it.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from mergetool.evaluation.choice import choice_predictions
from mergetool.evaluation.metrics import METRICS, REGRESSION
from mergetool.evaluation.tasks import TaskData

DRAWS = 64  # candidate subsets per task; the best stratified one is kept
BOOTSTRAP = 200
PER_ROW_METRICS = ("accuracy", "acc_norm")  # a mean of per-row 0/1 scores: binomial error, paired comparison


def batch_len(batch: dict) -> int:
    """Model outputs one batch gives: its inputs' first dimension."""
    return int(next(iter(batch.values())).shape[0])


def batch_rows(data: TaskData) -> list[np.ndarray]:
    """Per batch, the row indices (into data.labels, batch order) whose outputs it holds. For choice
    kinds a row's choices may span two batches; the row is listed by each."""
    out, start = [], 0
    for batch in data.batches:
        n = batch_len(batch)
        rows = np.arange(start, start + n) if data.pairs is None else np.unique(data.pairs[start:start + n, 0])
        out.append(rows)
        start += n
    return out


def draw_subset(data: TaskData, fraction: float, seed: int) -> tuple[int, ...]:
    """Sorted batch indices of the task's racing subset (all batches when fraction is 1)."""
    n = len(data.batches)
    if fraction >= 1.0 or n <= 1:
        return tuple(range(n))
    rows = batch_rows(data)
    labels = np.asarray(data.labels)
    classes = np.unique(labels) if labels.dtype.kind in "iub" else None

    def counts(ids: Sequence[int]) -> np.ndarray:
        r = np.unique(np.concatenate([rows[b] for b in ids])) if ids else np.zeros(0, dtype=int)
        if classes is None:  # regression: stratify by size only
            return np.asarray([len(r)], dtype=float)
        return np.asarray([np.sum(labels[r] == c) for c in classes], dtype=float)

    target = fraction * counts(range(n))
    rng = np.random.default_rng([seed, zlib.crc32(data.name.encode())])
    best, best_d = None, math.inf
    k0 = round(fraction * n)
    sizes = sorted({min(n - 1, max(1, k)) for k in (k0 - 1, k0, k0 + 1)})  # batch sizes differ (the last is short)
    for _ in range(DRAWS):
        k = sizes[int(rng.integers(len(sizes)))]
        ids = tuple(sorted(int(b) for b in rng.choice(n, k, replace=False)))
        d = float(np.abs(counts(ids) - target).sum())
        if d < best_d:
            best, best_d = ids, d
    return best


@dataclass(frozen=True)
class SubsetView:
    """The rows of a task's split that a subset of batches covers, in batch order (what scoring needs)."""

    name: str
    metric: str
    labels: np.ndarray
    records: list
    pairs: Optional[np.ndarray]
    norms: Optional[np.ndarray]
    outputs_index: np.ndarray  # which concatenated subset outputs belong to those rows


def subset_view(data: TaskData, ids: Sequence[int]) -> SubsetView:
    """Rows covered by batches `ids`. For choice kinds, only rows whose every choice is in the subset."""
    sizes = [batch_len(b) for b in data.batches]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    out_idx = np.concatenate([np.arange(starts[b], starts[b + 1]) for b in ids]) if ids else np.zeros(0, int)
    if data.pairs is None:
        rows = out_idx
        return SubsetView(data.name, data.metric, np.asarray(data.labels)[rows], [data.records[i] for i in rows],
                          None, None, np.arange(len(rows)))
    pairs = data.pairs[out_idx]
    full_count = np.bincount(data.pairs[:, 0], minlength=len(data.labels))
    sub_count = np.bincount(pairs[:, 0], minlength=len(data.labels))
    whole = np.flatnonzero((sub_count == full_count) & (sub_count > 0))
    keep = np.isin(pairs[:, 0], whole)
    remap = np.full(len(data.labels), -1)
    remap[whole] = np.arange(len(whole))
    new_pairs = np.column_stack([remap[pairs[keep, 0]], pairs[keep, 1]])
    norms = None if data.norms is None else np.asarray(data.norms)[out_idx][keep]
    return SubsetView(data.name, data.metric, np.asarray(data.labels)[whole], [data.records[i] for i in whole],
                      new_pairs, norms, np.flatnonzero(keep))


def predictions(metric: str, outputs: np.ndarray, view) -> np.ndarray:
    """Per-row predictions from raw outputs (classification, regression or choice kinds)."""
    if view.pairs is not None:
        return choice_predictions(outputs, view.pairs, len(view.labels), view.norms if metric == "acc_norm" else None)
    if metric in REGRESSION:
        return outputs.reshape(len(outputs), -1)[:, 0]
    return outputs.argmax(-1)


def standard_error(metric: str, pred: np.ndarray, labels: np.ndarray, seed: int = 0) -> float:
    """Standard error of the metric over these rows: binomial for accuracy, bootstrap otherwise."""
    n = len(labels)
    if n == 0:
        return math.inf
    if metric in PER_ROW_METRICS:
        p = (float(np.sum(pred == labels)) + 2.0) / (n + 4.0)  # Agresti-Coull: no zero width at 0 or 1
        return math.sqrt(p * (1.0 - p) / n)
    fn = METRICS[metric]
    rng = np.random.default_rng(seed)
    draws = [fn(pred[idx], labels[idx]) for idx in rng.integers(0, n, size=(BOOTSTRAP, n))]
    return float(np.std(draws, ddof=1))
