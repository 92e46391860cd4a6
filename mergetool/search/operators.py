"""NSGA-II's variation operators on grouping matrices, and the evaluation order that reuses chain prefixes."""

from __future__ import annotations

from typing import Callable

import numpy as np

from mergetool.core import grouping


def crossover(A: np.ndarray, B: np.ndarray, rng: np.random.Generator, prob: float,
              kind: str = "one_point") -> list[np.ndarray]:
    """Crossover of whole component columns (each column is a partition of the tasks).

    one_point: children are A[:, :c] + B[:, c:] and B[:, :c] + A[:, c:], a cut along the components
    in forward order, so each child keeps a parent's chain prefix (prefix-activation reuse);
    uniform: each column from either parent."""
    if rng.random() >= prob or A.shape[1] < 2:
        return [A.copy(), B.copy()]
    if kind == "one_point":
        mask = np.arange(A.shape[1]) >= int(rng.integers(1, A.shape[1]))
    else:
        mask = rng.random(A.shape[1]) < 0.5
    c1, c2 = A.copy(), B.copy()
    c1[:, mask], c2[:, mask] = B[:, mask], A[:, mask]
    return [c1, c2]


def mutate(G: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Move one task of one component to another existing group or a new one; 1+ moves (geometric)."""
    T, L = G.shape
    if T < 2:
        return G
    for _ in range(min(L, int(rng.geometric(0.5)))):
        move_task(G, T, rng)
    return G


def move_task(G: np.ndarray, T: int, rng: np.random.Generator) -> None:
    """In place: one task t of one component l (rows 0..T-1 of G) to another existing group of that
    component, or to a new one when t shares its group."""
    l, t = int(rng.integers(G.shape[1])), int(rng.integers(T))
    col = G[:T, l]
    labels = np.unique(col)
    targets = [int(g) for g in labels if g != col[t]]
    if np.sum(col == col[t]) > 1:  # leaving a shared group for a fresh one
        targets.append(int(np.setdiff1d(np.arange(T), labels)[0]))
    if targets:
        G[t, l] = targets[int(rng.integers(len(targets)))]


def chain_order(items: list, key: Callable = lambda G: G, canonical: Callable = grouping.canonical) -> list:
    """Items sorted by their grouping's columns in forward order: consecutive evaluations then
    share the longest chain prefixes, which the evaluator's prefix-activation cache reuses. With a codec
    menu, `canonical` is the genome's (CandidateSpace.canonical): each column sorts with its codec."""
    return sorted(items, key=lambda x: canonical(np.asarray(key(x))).T.ravel().tolist())
