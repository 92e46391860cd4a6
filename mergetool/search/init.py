"""Initial population P_0: K-means over homologous components (paper Sec. III-C) or random."""

from __future__ import annotations

import warnings
from typing import Iterable, Optional

import numpy as np

from mergetool.core import grouping
from mergetool.core.errors import MergetoolError


def kmeans_partitions(vectors: np.ndarray, seed: int, ks: Optional[Iterable[int]] = None) -> dict[int, np.ndarray]:
    """Cluster the T task vectors of one component for each k; returns {k: canonical labels}.

    Rows are L2-normalised first, so clusters follow direction (task-vector similarity), not size.
    """
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    X = np.asarray(vectors)
    X = X.reshape(X.shape[0], -1)
    if not np.issubdtype(X.dtype, np.floating):
        X = X.astype(np.float64)
    T = X.shape[0]
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    X = X / np.where(norms > 0, norms, 1.0)
    out: dict[int, np.ndarray] = {}
    # T points fit in one of K-means' 256-sample chunks: extra OpenMP threads only spin (10x slower on busy CPUs)
    with threadpool_limits(limits=1, user_api="openmp"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate points give fewer clusters than k
        for k in sorted(set(ks) if ks is not None else range(1, T + 1)):
            if k <= 1:
                labels = np.zeros(T, dtype=np.int64)
            elif k >= T:
                labels = np.arange(T, dtype=np.int64)
            else:
                labels = KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(X)
            out[k] = grouping.canonical(labels[:, None])[:, 0]
    return out


def _to_numpy(X) -> np.ndarray:
    """numpy view of an array or a (CPU, possibly bfloat16) torch tensor."""
    if hasattr(X, "detach") and hasattr(X, "float"):
        X = X.detach().float().cpu().numpy()
    return np.asarray(X)


def spread_ks(T: int, n: int) -> list[int]:
    """Up to n values of k in 1..T, evenly spread and always including 1 and T."""
    if T <= n:
        return list(range(1, T + 1))
    return sorted({int(round(v)) for v in np.linspace(1, T, max(n, 2))})


def silhouette_k(vectors: np.ndarray, parts: dict[int, np.ndarray]) -> Optional[int]:
    """The k in 2..T-1 whose clustering has the best silhouette (None when T < 3)."""
    from sklearn.metrics import silhouette_score

    X = np.asarray(vectors)
    X = X.reshape(X.shape[0], -1)
    best, best_s = None, -np.inf
    for k, labels in sorted(parts.items()):
        n = len(np.unique(labels))
        if 2 <= n <= X.shape[0] - 1:
            sc = float(silhouette_score(X, labels, metric="cosine"))
            if sc > best_s:
                best, best_s = k, sc
    return best


def kmeans_population(task_vectors: Iterable[np.ndarray], T: int, L: int, size: int, seed: int) -> list[np.ndarray]:
    """P_0 from per-component clusterings of the task vectors.

    1. the k-clustering in every component, for k spread over 1..T (so all-shared and
       all-singletons are included);
    2. per component, the k with the best silhouette;
    3. mixtures: per-component k drawn near that best k (+-1), or uniformly in 1..T, alternately.
    """
    parts: list[dict[int, np.ndarray]] = []
    best: list[int] = []
    for l, X in enumerate(task_vectors):  # may be a generator: one component in memory at a time
        X = _to_numpy(X)
        if X.shape[0] != T:
            raise MergetoolError(
                f"task vectors of component {l} have {X.shape[0]} rows, expected {T} (one per task)",
                key="search.init",
            )
        parts.append(kmeans_partitions(X, seed, range(1, T + 1)))
        best.append(silhouette_k(X, parts[-1]) or max(1, T // 2))
    if len(parts) != L:
        raise MergetoolError(f"got task vectors for {len(parts)} components, expected {L}", key="search.init")
    rng = np.random.default_rng([seed, 0, 1])

    def build(ks_per_component) -> np.ndarray:
        return np.stack([parts[l][int(ks_per_component[l])] for l in range(L)], axis=1)

    pop = [build([k] * L) for k in spread_ks(T, size)] + [build(best)]
    tries = 0
    while len(_dedupe(pop)) < size and tries < 50 * size:
        tries += 1
        if tries % 2:
            k_l = np.clip(np.asarray(best) + rng.integers(-1, 2, size=L), 1, T)
        else:
            k_l = rng.integers(1, T + 1, size=L)
        pop.append(build(k_l))
    return _fill_random(_dedupe(pop), T, L, size, rng)


def random_partition(T: int, rng: np.random.Generator) -> np.ndarray:
    """One random partition of T tasks: k ~ U{1..T} groups, labels drawn uniformly."""
    k = int(rng.integers(1, T + 1))
    return grouping.canonical(rng.integers(0, k, size=T)[:, None])[:, 0]


def random_population(T: int, L: int, size: int, seed: int) -> list[np.ndarray]:
    """P_0 of random groupings, plus the all-singletons and all-shared anchors."""
    rng = np.random.default_rng([seed, 0, 2])
    pop = [grouping.all_singletons(T, L), grouping.all_shared(T, L)]
    return _fill_random(_dedupe(pop), T, L, size, rng)


def _dedupe(pop: list[np.ndarray]) -> list[np.ndarray]:
    seen: dict[str, np.ndarray] = {}
    for G in pop:
        seen.setdefault(grouping.key(G), grouping.canonical(G))
    return list(seen.values())


def _fill_random(pop: list[np.ndarray], T: int, L: int, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    pop = pop[:size]
    keys = {grouping.key(G) for G in pop}
    tries = 0
    while len(pop) < size and tries < 50 * size:  # bounded: tiny spaces have fewer than `size` configurations
        tries += 1
        G = np.stack([random_partition(T, rng) for _ in range(L)], axis=1)
        k = grouping.key(G)
        if k not in keys:
            keys.add(k)
            pop.append(grouping.canonical(G))
    return pop


def initial_population(problem, settings, space=None) -> tuple[list[np.ndarray], str]:
    """P_0 for the settings; falls back to random when the problem offers no task vectors. With a codec
    menu (`space`, a CandidateSpace), the groupings become genomes (CandidateSpace.with_codecs)."""
    T, L, size = int(problem.T), int(problem.L), settings.population
    if settings.init == "kmeans":
        tv = getattr(problem, "task_vectors", None)
        vectors = tv() if callable(tv) else None
        if vectors is not None:
            pop, used = kmeans_population(vectors, T, L, size, settings.seed), "kmeans"
        else:
            pop, used = random_population(T, L, size, settings.seed), "random (problem has no task vectors)"
    else:
        pop, used = random_population(T, L, size, settings.seed), "random"
    return (pop if space is None else space.with_codecs(pop, size, settings.seed)), used
