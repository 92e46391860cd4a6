"""What the search varies: a grouping G, and (with a codec menu of K > 1 entries) a codec per component.

The genome is G itself (T x L) when the menu has one codec, so such a search, its journal and its keys are
exactly those of a plain grouping search. With K > 1 it is a (T + 1) x L matrix: rows 0..T-1 are G, row T
holds each component's menu index. Crossover exchanges whole columns, so a component keeps its codec with its
partition; mutation moves a task (as before) or re-draws one component's codec. A per-component choice (not
per expert) keeps the stored base's accounting simple (a component's base is stored once when its experts are
delta-coded) and multiplies the space by K^L only.

Records and front.json carry G under "grouping" and, with a menu, the codec labels under "codecs".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from mergetool.core import grouping
from mergetool.core.errors import MergetoolError

CODEC_MOVE = 0.35  # share of mutation moves that re-draw a component's codec (the rest move a task)


@dataclass(frozen=True)
class CandidateSpace:
    """The search space of one problem: T tasks, L components, the codec menu's labels."""

    T: int
    L: int
    menu: tuple[str, ...] = ("full",)

    @classmethod
    def of(cls, problem) -> "CandidateSpace":
        menu = tuple(getattr(problem, "codec_menu", None) or ("full",))
        return cls(int(problem.T), int(problem.L), menu)

    @property
    def K(self) -> int:
        return len(self.menu)

    @property
    def coded(self) -> bool:
        return self.K > 1

    # --- genome <-> (G, codecs) <-> record --------------------------------------------------------
    def split(self, X) -> tuple[np.ndarray, Optional[list[int]]]:
        """(G, per-component menu indices or None without a menu)."""
        X = np.asarray(X, dtype=np.int64)
        if not self.coded:
            return X, None
        return X[: self.T], [int(c) for c in X[self.T]]

    def join(self, G, codecs: Optional[Sequence[int]] = None) -> np.ndarray:
        G = np.asarray(G, dtype=np.int64)
        if not self.coded:
            return G
        row = np.zeros(self.L, dtype=np.int64) if codecs is None else np.asarray(codecs, dtype=np.int64)
        return np.vstack([G, row[None, :]])

    def canonical(self, X) -> np.ndarray:
        G, codecs = self.split(X)
        return self.join(grouping.canonical(G), codecs)

    def key(self, X) -> str:
        """grouping.key(G) without a menu (the keys of a plain search); with one, the codecs appended."""
        G, codecs = self.split(X)
        k = grouping.key(G)
        return k if codecs is None else f"{k}|{','.join(map(str, codecs))}"

    def fields(self, X) -> dict:
        """A record's "grouping" (canonical) and, with a menu, its "codecs" (labels)."""
        G, codecs = self.split(X)
        out: dict = {"grouping": grouping.canonical(G).tolist()}
        if codecs is not None:
            out["codecs"] = [self.menu[c] for c in codecs]
        return out

    def of_record(self, rec: dict) -> np.ndarray:
        """The genome of a record (journal line or front.json entry)."""
        G = np.asarray(rec["grouping"], dtype=np.int64)
        if not self.coded:
            return G
        labels = rec.get("codecs")
        if not isinstance(labels, list) or len(labels) != self.L or any(c not in self.menu for c in labels):
            raise MergetoolError(f"record i={rec.get('i', rec.get('id'))} has no valid per-component codecs for "
                                 f"the menu {', '.join(self.menu)}", key="codecs",
                                 fix="resume with the recipe the run was started with, or use a new run directory")
        return self.join(G, [self.menu.index(c) for c in labels])

    def validate(self, X) -> np.ndarray:
        G, codecs = self.split(X)
        G = grouping.validate(G, self.T, self.L)
        if codecs is not None and not all(0 <= c < self.K for c in codecs):
            raise MergetoolError(f"a codec index is outside 0..{self.K - 1}", key="codecs")
        return self.join(G, codecs)

    # --- search operators -------------------------------------------------------------------------
    def size(self) -> int:
        """Distinct candidates: Bell(T)^L · K^L."""
        return grouping.search_space_size(self.T, self.L) * self.K ** self.L

    def mutate(self, X: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """1+ moves (geometric, at most L): a task to another group of its component, or (with a menu)
        one component's codec to another menu entry."""
        from mergetool.search.operators import move_task, mutate

        X = np.array(X, dtype=np.int64)
        if not self.coded:
            return mutate(X, rng)  # exactly the plain search's draws
        for _ in range(min(self.L, int(rng.geometric(0.5)))):
            if self.T < 2 or rng.random() < CODEC_MOVE:
                l = int(rng.integers(self.L))
                X[self.T, l] = (X[self.T, l] + int(rng.integers(1, self.K))) % self.K
            elif self.T >= 2:
                move_task(X, self.T, rng)
        return X

    def features(self, Xs: Sequence[np.ndarray]) -> np.ndarray:
        """Surrogate inputs: per component the co-membership bits (label-invariant) and, with a menu, a
        one-hot of its codec."""
        rows = []
        for X in Xs:
            G, codecs = self.split(X)
            parts = [grouping.co_membership(G).astype(np.float32)]
            if codecs is not None:
                parts.append(np.eye(self.K, dtype=np.float32)[codecs].reshape(-1))
            rows.append(np.concatenate(parts))
        return np.stack(rows)

    def with_codecs(self, Gs: Sequence[np.ndarray], size: int, seed: int) -> list[np.ndarray]:
        """Initial genomes from initial groupings: the two extremes, all-shared and all-singletons, under each
        menu entry on every component (up to half the population), so P_0 spans the cheapest to the richest
        storage of every codec (all-singletons under one codec is that codec's individual models); then every
        grouping with a codec drawn per component. Deduplicated, at most `size`."""
        if not self.coded:
            return [np.asarray(G, dtype=np.int64) for G in Gs][:size]
        rng = np.random.default_rng([seed, 0, 4])
        out: dict[str, np.ndarray] = {}

        def add(G, codecs) -> None:
            X = self.canonical(self.join(G, codecs))
            out.setdefault(self.key(X), X)

        for G in (grouping.all_shared(self.T, self.L), grouping.all_singletons(self.T, self.L)):
            for c in range(self.K):
                if len(out) < size // 2:
                    add(G, [c] * self.L)
        for G in Gs:
            add(G, rng.integers(self.K, size=self.L))
        return list(out.values())[:size]

def codec_summary(labels: Optional[Sequence[str]]) -> str:
    """A record's per-component codecs in a few words: "low_rank:16 ×12, full ×8" (most used first)."""
    if not labels:
        return ""
    counts: dict[str, int] = {}
    for c in labels:
        counts[c] = counts.get(c, 0) + 1
    return ", ".join(f"{c} ×{n}" for c, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
