"""Task metrics Φ_t: predictions and references in, one number out (higher is better)."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from mergetool.core.errors import DataError
from mergetool.core.userimport import function_named


def custom_evaluator(ref: str, key: str) -> Callable:
    """A task's `evaluator: "module:function"`, checked: it takes (outputs, labels, records)."""
    return function_named(ref, 3, key=key, error=DataError)


def custom_score(ref: str, key: str, outputs, labels, records) -> float:
    """The custom evaluator's score, which must be a finite number (higher is better)."""
    returned = custom_evaluator(ref, key)(outputs, labels, records)
    try:
        value = float(returned)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise DataError(f"{ref} returned a {type(returned).__name__}, not a finite number", key=key,
                        fix="return one float, higher is better")
    return value


def accuracy(pred: np.ndarray, ref: np.ndarray) -> float:
    return float(np.mean(pred == ref)) if len(ref) else 0.0


def f1(pred: np.ndarray, ref: np.ndarray) -> float:
    """Binary F1 of class 1 for two classes, macro F1 otherwise."""
    from sklearn.metrics import f1_score

    binary = set(np.unique(ref)).union(np.unique(pred)) <= {0, 1}
    return float(f1_score(ref, pred, average="binary" if binary else "macro", zero_division=0))


def f1_macro(pred: np.ndarray, ref: np.ndarray) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(ref, pred, average="macro", zero_division=0))


def matthews(pred: np.ndarray, ref: np.ndarray) -> float:
    from sklearn.metrics import matthews_corrcoef

    return float(matthews_corrcoef(ref, pred))


def pearson(pred: np.ndarray, ref: np.ndarray) -> float:
    from scipy.stats import pearsonr

    return float(np.nan_to_num(pearsonr(pred, ref)[0])) if np.std(pred) > 0 else 0.0


def spearman(pred: np.ndarray, ref: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(np.nan_to_num(spearmanr(pred, ref)[0])) if np.std(pred) > 0 else 0.0


def pearson_spearman(pred: np.ndarray, ref: np.ndarray) -> float:
    """The GLUE STS-B score: the mean of Pearson and Spearman correlations."""
    return (pearson(pred, ref) + spearman(pred, ref)) / 2


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": accuracy, "f1": f1, "f1_macro": f1_macro, "matthews": matthews,
    "pearson_spearman": pearson_spearman, "pearson": pearson, "spearman": spearman,
}
REGRESSION = {"pearson_spearman", "pearson", "spearman"}


def score(metric: str, outputs: np.ndarray, ref: np.ndarray) -> float:
    """Score raw model outputs (logits; a single column for regression) against references."""
    if metric in REGRESSION:
        pred = outputs.reshape(len(outputs), -1)[:, 0]
    else:
        pred = outputs.argmax(-1)
    return METRICS[metric](pred, ref)
