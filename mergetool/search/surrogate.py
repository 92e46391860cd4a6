"""Random-forest surrogate for P on the label-invariant co-membership encoding."""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np

from mergetool.core import grouping


def features(Gs: Sequence[np.ndarray]) -> np.ndarray:
    """One row of co-membership bits per grouping (invariant to group relabelling)."""
    return np.stack([grouping.co_membership(G) for G in Gs]).astype(np.float32)


class Surrogate:
    """RandomForestRegressor predicting performance P from a grouping."""

    def __init__(self, n_trees: int = 100, seed: int = 0, encode: Callable[[Sequence[np.ndarray]], np.ndarray] = features):
        """`encode` maps candidates to feature rows (CandidateSpace.features for a genome with codecs)."""
        from sklearn.ensemble import RandomForestRegressor

        self.model = RandomForestRegressor(n_estimators=n_trees, random_state=seed, n_jobs=1)
        self.encode = encode
        self.fitted = False

    def fit(self, Gs: Sequence[np.ndarray], performance: Sequence[float]) -> "Surrogate":
        X = self.encode(Gs)
        if X.shape[1] == 0:  # T == 1: nothing to learn
            X = np.zeros((len(Gs), 1), dtype=np.float32)
        self.model.fit(X, np.asarray(performance, dtype=np.float64))
        self.fitted = True
        return self

    def predict(self, Gs: Sequence[np.ndarray]) -> np.ndarray:
        X = self.encode(Gs)
        if X.shape[1] == 0:
            X = np.zeros((len(Gs), 1), dtype=np.float32)
        return self.model.predict(X)


def kendall_tau(records: Sequence[dict]) -> Optional[float]:
    """Kendall's tau of predicted vs real P over records that carry a prediction."""
    from scipy.stats import kendalltau

    pairs = [(r["predicted_performance"], r["performance"]) for r in records if r.get("predicted_performance") is not None]
    if len(pairs) < 2:
        return None
    pred, real = zip(*pairs)
    tau = kendalltau(pred, real).statistic
    return None if tau is None or math.isnan(tau) else float(tau)
