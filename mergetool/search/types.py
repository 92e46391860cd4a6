"""The search's light types: settings, one evaluation's result, the problem protocol, the result."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Protocol

import numpy as np

from mergetool.core.errors import MergetoolError
from mergetool.core.results import PRECISIONS, EvalResult


class SearchProblem(Protocol):
    """What the search needs from the evaluation engine."""

    T: int
    L: int

    def evaluate(self, G: np.ndarray) -> EvalResult: ...

    def storage_cost(self, G: np.ndarray) -> float: ...

    # optional: def task_vectors(self) -> Sequence[np.ndarray]  # L arrays of shape (T, D_l)
    # racing:   def use_racing(self, fraction: float, seed: int) -> None; def evaluate_subset(self, G) -> EvalResult
    #           (evaluate() then also fills EvalResult.subset)
    # bf16:     def use_precision(self, precision: str) -> None; def evaluate_fp32(self, G) -> EvalResult


SURROGATES = ("random_forest", "none")
INITS = ("kmeans", "random")
CROSSOVERS = ("one_point", "uniform")


@dataclass(frozen=True)
class RacingSettings:
    """Racing (successive halving on validation inputs): a candidate is scored on a fixed subset first
    (`fraction` of each task's inputs, whole batches) and completed only if the upper confidence bound of
    its subset P (one-sided `confidence`, plus `margin`) beats what the front already holds at its C."""

    fraction: float = 0.25
    confidence: float = 0.95
    margin: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise MergetoolError(f"racing fraction must be in (0, 1], got {self.fraction}",
                                 key="search.racing.fraction", fix="use e.g. 0.25 (a quarter of each task's inputs)")
        if not 0.0 < self.confidence < 1.0:
            raise MergetoolError(f"racing confidence must be in (0, 1), got {self.confidence}",
                                 key="search.racing.confidence", fix="use e.g. 0.95")
        if not self.margin >= 0.0:
            raise MergetoolError(f"racing margin must be >= 0, got {self.margin}",
                                 key="search.racing.margin", fix="use 0 (or a small slack such as 0.01)")


@dataclass(frozen=True)
class SearchSettings:
    """Search knobs. Defaults follow the paper (Sec. IV-C): population 20, 300 real evaluations."""

    population: int = 20
    evaluations: int = 300
    surrogate: str = "random_forest"  # "random_forest" | "none"
    init: str = "kmeans"  # "kmeans" | "random"
    seed: int = 0
    offspring: Optional[int] = None  # candidates per generation; default 4 x population (surrogate) or the per-generation cap
    max_evals_per_generation: Optional[int] = None  # real evaluations per generation; default population
    crossover_prob: float = 0.9
    crossover: str = "one_point"  # "one_point": cut along the components (forward order) | "uniform": by column
    rf_trees: int = 100
    hv_ref: Optional[tuple[float, float]] = None  # (P_ref, C_ref); default (0, T + 1)
    write_artifacts: bool = True  # front.json, hv.csv, pareto.png, hv.png next to the journal
    racing: Optional[RacingSettings] = None  # None: every candidate is evaluated on all inputs
    precision: str = "fp32"  # "bf16": screen under bf16 autocast; the final front is re-scored at fp32

    def __post_init__(self) -> None:
        def bad(k: str, msg: str, fix: str) -> MergetoolError:
            return MergetoolError(msg, key=f"search.{k}", fix=fix)

        if self.population < 2:
            raise bad("population", f"population must be at least 2, got {self.population}", "use 20 (paper)")
        if self.evaluations < 1:
            raise bad("evaluations", f"evaluations must be at least 1, got {self.evaluations}", "use 300 (paper)")
        if self.surrogate not in SURROGATES:
            raise bad("surrogate", f"unknown surrogate {self.surrogate!r}", f"use one of {', '.join(SURROGATES)}")
        if self.init not in INITS:
            raise bad("init", f"unknown init {self.init!r}", f"use one of {', '.join(INITS)}")
        if self.crossover not in CROSSOVERS:
            raise bad("crossover", f"unknown crossover {self.crossover!r}", f"use one of {', '.join(CROSSOVERS)}")
        if self.offspring is not None and self.offspring < 1:
            raise bad("offspring", "offspring must be at least 1", "leave it unset for 4 x population")
        if self.max_evals_per_generation is not None and self.max_evals_per_generation < 1:
            raise bad("max_evals_per_generation", "max_evals_per_generation must be at least 1", "leave it unset")
        if not 0.0 <= self.crossover_prob <= 1.0:
            raise bad("crossover_prob", "crossover_prob must be in [0, 1]", "use 0.9")
        if self.precision not in PRECISIONS:
            raise bad("precision", f"unknown precision {self.precision!r}", f"use one of {', '.join(PRECISIONS)}")
        if self.rf_trees < 1:
            raise bad("rf_trees", "rf_trees must be at least 1", "use 100")

    @property
    def per_generation(self) -> int:
        return self.max_evals_per_generation or self.population

    @property
    def n_offspring(self) -> int:
        if self.offspring:
            return self.offspring
        return 4 * self.population if self.surrogate == "random_forest" else self.per_generation

    def fingerprint(self) -> dict[str, Any]:
        """Settings that fix the search trajectory (the budget may grow on resume; outputs may change)."""
        d = asdict(self)
        for k in ("evaluations", "write_artifacts", "hv_ref"):
            d.pop(k)
        for k, default in (("racing", None), ("precision", "fp32")):  # absent when off: older runs still resume
            if d[k] == default:
                d.pop(k)
        return d


@dataclass
class SearchResult:
    records: list[dict]  # every journal record, sorted by "i"
    front: list[dict]  # non-dominated records as front.json entries
    hv: float
    hv_ref: tuple[float, float]
    hv_curve: list[tuple[int, float]]  # (evaluations, hv)
    evaluations: int  # full evaluations in the journal
    evaluated_now: int  # evaluate() calls made by this process
    replayed: int  # records taken from the journal instead of evaluate()
    screened: int  # candidates whose P the surrogate predicted
    generations: int
    kendall_tau: Optional[float]  # predicted vs real P over the journal
    init_used: str
    stopped: str  # "budget" | "exhausted"
    artifacts: dict[str, str] = field(default_factory=dict)
    partial: int = 0  # raced candidates scored on the subset only (dropped, or left by the budget)
    examples: int = 0  # validation inputs run through a model, over full and partial evaluations
    rescored: int = 0  # front points re-scored at fp32 after a bf16 search
