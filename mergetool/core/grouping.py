"""Grouping matrices G (T x L ints): canonical form, keys, chains and search-space size.

G[t, l] is the group of task t's component l. A column is a partition of the T tasks; labels
only name groups, so two matrices with the same partitions in every column are the same
configuration. The canonical form relabels each column by first appearance (0-based).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Iterable

import numpy as np

from mergetool.core.errors import MergetoolError

Chain = tuple[tuple[int, ...], ...]


def _as_matrix(G) -> np.ndarray:
    arr = np.asarray(G)
    if arr.ndim != 2:
        raise MergetoolError(
            f"a grouping must be a 2-D T x L matrix, got {arr.ndim} dimension(s)",
            key="grouping",
            fix="give one row per task and one column per component",
        )
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.issubdtype(arr.dtype, np.number) or not np.all(np.equal(np.mod(arr, 1), 0)):
            raise MergetoolError(
                "a grouping must hold whole-number group labels",
                key="grouping",
                fix="use integers 0..T-1",
            )
    return arr.astype(np.int64)


def _canonical_cols(arr: np.ndarray) -> list[list[int]]:
    cols = []
    for col in arr.T.tolist():
        seen: dict[int, int] = {}
        cols.append([seen.setdefault(v, len(seen)) for v in col])
    return cols


def canonical(G) -> np.ndarray:
    """Relabel the groups of every column by first appearance: [[2],[0],[2]] -> [[0],[1],[0]]."""
    arr = _as_matrix(G)
    return np.asarray(_canonical_cols(arr), dtype=np.int64).reshape(arr.shape[1], arr.shape[0]).T.copy()


def key(G) -> str:
    """Stable string key of the canonical G: columns joined by ';', labels by ','."""
    return ";".join(",".join(map(str, col)) for col in _canonical_cols(_as_matrix(G)))


def members(G, t: int, l: int) -> tuple[int, ...]:
    """The tasks sharing task t's group at component l (sorted, t included)."""
    arr = _as_matrix(G)
    return tuple(int(s) for s in np.flatnonzero(arr[:, l] == arr[t, l]))


def chain_key(G, t: int) -> Chain:
    """Task t's expert chain: per component, the sorted tasks in t's group (label-free)."""
    arr = _as_matrix(G)
    if not 0 <= t < arr.shape[0]:
        raise MergetoolError(f"task index {t} is outside 0..{arr.shape[0] - 1}", key="grouping")
    return tuple(members(arr, t, l) for l in range(arr.shape[1]))


def expert_key(l: int, group_members: Iterable[int]) -> tuple[int, tuple[int, ...]]:
    """Cache key of one modular expert: (component, sorted member tasks)."""
    return int(l), tuple(sorted(int(m) for m in group_members))


def experts(G) -> list[tuple[int, tuple[int, ...]]]:
    """All expert keys of G, component by component, groups in canonical order."""
    c = canonical(G)
    out = []
    for l in range(c.shape[1]):
        for n in range(int(c[:, l].max()) + 1 if c.shape[0] else 0):
            out.append(expert_key(l, np.flatnonzero(c[:, l] == n)))
    return out


def n_groups(G) -> np.ndarray:
    """N_l: the number of distinct groups per component."""
    arr = _as_matrix(G)
    return np.asarray([len(np.unique(arr[:, l])) for l in range(arr.shape[1])], dtype=np.int64)


def all_singletons(T: int, L: int) -> np.ndarray:
    """Every task keeps its own copy of every component (no merging)."""
    return np.repeat(np.arange(T, dtype=np.int64)[:, None], L, axis=1)


def all_shared(T: int, L: int) -> np.ndarray:
    """Every component merged across all tasks (one model)."""
    return np.zeros((T, L), dtype=np.int64)


def validate(G, T: int, L: int) -> np.ndarray:
    """Check shape (T, L) and labels 0 <= g < T; return G as int64 or raise MergetoolError."""
    arr = _as_matrix(G)
    if arr.shape != (T, L):
        raise MergetoolError(
            f"grouping has shape {arr.shape[0]}x{arr.shape[1]}, expected {T}x{L} (tasks x components)",
            key="grouping",
            fix=f"give {T} rows (tasks) and {L} columns (components)",
        )
    bad = np.argwhere((arr < 0) | (arr >= T))
    if len(bad):
        t, l = (int(v) for v in bad[0])
        raise MergetoolError(
            f"group label {int(arr[t, l])} at task {t}, component {l} is outside 0..{T - 1}",
            key="grouping",
            fix=f"use labels between 0 and {T - 1}",
        )
    return arr


@lru_cache(maxsize=None)
def bell(n: int) -> int:
    """Bell number B(n): the number of partitions of n tasks (exact, Bell triangle)."""
    if n < 0:
        raise ValueError("bell(n) needs n >= 0")
    row = [1]
    for _ in range(n):
        nxt = [row[-1]]
        for v in row:
            nxt.append(nxt[-1] + v)
        row = nxt
    return row[0]


def set_partitions(n: int) -> list[tuple[int, ...]]:
    """All B(n) partitions of n tasks, as restricted growth strings (task t is in group rgs[t])."""
    out = [()]
    for _ in range(n):
        out = [rgs + (g,) for rgs in out for g in range(max(rgs, default=-1) + 2)]
    return out


def search_space_size(T: int, L: int) -> int:
    """Number of distinct configurations: Bell(T)^L."""
    return bell(T) ** L


def search_space_log10(T: int, L: int) -> float:
    """log10 of the search-space size: L * log10(Bell(T))."""
    return L * math.log10(bell(T))


def co_membership(G) -> np.ndarray:
    """Label-invariant encoding: per component, the T(T-1)/2 'same group' bits (i < j), concatenated."""
    arr = _as_matrix(G)
    i, j = np.triu_indices(arr.shape[0], k=1)
    return (arr[i, :] == arr[j, :]).T.reshape(-1).astype(np.uint8)
