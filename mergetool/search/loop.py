"""Algorithm 1: surrogate-assisted NSGA-II over grouping matrices, resumable from its journal.

Determinism: the whole search is a function of (seed, settings, journal). Generation k draws
from np.random.default_rng([seed, k, ...]); evaluation number i is the i-th planned candidate.
On resume the loop runs again from the start and, for every planned i already in the journal,
takes the recorded result instead of calling evaluate(). Live results are JSON round-tripped
before use, so a replayed run sees bit-identical numbers and follows the same path.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Optional, Sequence

import numpy as np

from mergetool.core.errors import MergetoolError
from mergetool.search.executors import LocalExecutor
from mergetool.search.front import (
    hv_curve,
    hv_reference,
    hypervolume,
    nondominated,
    objectives,
    pareto_front,
    write_artifacts,
)
from mergetool.search.genome import CandidateSpace
from mergetool.search.init import initial_population
from mergetool.search.journal import Journal, read_state, write_state
from mergetool.search.operators import chain_order, crossover
from mergetool.search.racing import PARTIAL_NAME, race
from mergetool.search.surrogate import Surrogate, kendall_tau
from mergetool.search.types import EvalResult, SearchResult, SearchSettings

STATE_VERSION = 1
DRY_GENERATIONS = 5  # racing: this many generations in a row without a completed candidate ends the search
Progress = Callable[[int, int, float, Optional[float], Optional[float]], None]


def _pymoo():
    from pymoo.algorithms.moo.nsga2 import binary_tournament
    from pymoo.core.population import Population
    from pymoo.core.problem import Problem
    from pymoo.operators.selection.tournament import TournamentSelection
    from pymoo.operators.survival.rank_and_crowding import RankAndCrowding
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    return SimpleNamespace(
        Population=Population, problem=Problem(n_var=1, n_obj=2), survival=RankAndCrowding(),
        selection=TournamentSelection(func_comp=binary_tournament), nds=NonDominatedSorting(),
    )


def _as_result(res: Any) -> EvalResult:
    if isinstance(res, EvalResult):
        return res
    if isinstance(res, dict):
        keys = ("performance", "per_task", "storage_cost", "seconds", "cache", "subset")
        return EvalResult(**{k: res[k] for k in keys if k in res})
    return EvalResult(res.performance, res.per_task, res.storage_cost, getattr(res, "seconds", 0.0),
                      getattr(res, "cache", {}), getattr(res, "subset", None))


def _seed_int(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


# ---- the search ------------------------------------------------------------------------------

class _Run:
    """Bookkeeping shared by the generations: records in plan order, keys, counters, progress."""

    def __init__(self, problem, settings: SearchSettings, journal: Journal, executor, progress: Optional[Progress],
                 ref: tuple[float, float], partials: Optional[Journal] = None):
        self.problem, self.s, self.journal, self.executor = problem, settings, journal, executor
        self.progress, self.ref, self.partials = progress, ref, partials
        self.space = CandidateSpace.of(problem)
        self.records: list[dict] = []  # full evaluations, in plan order
        self.keys: set[str] = set()
        self.planned = 0  # plan index of the next candidate (full and raced ones share the numbering)
        self.evaluated_now = self.replayed = self.screened = self.partial = self.examples = 0
        self._front: list[dict] = []
        self._hv = 0.0
        self._hits = self._misses = 0
        self._costs: dict[str, float] = {}

    @property
    def n(self) -> int:
        return len(self.records)

    def cost(self, G: np.ndarray) -> float:
        k = self.space.key(G)
        if k not in self._costs:
            self._costs[k] = float(self.problem.storage_cost(G))
        return self._costs[k]

    def seen(self, rec: dict) -> None:
        """Account a full record (new or replayed): the running front and HV, cache counters, examples."""
        self._front = nondominated(self._front + [rec])
        self._hv = hypervolume(self._front, self.ref)
        self.examples += int((rec.get("cache") or {}).get("examples", 0))
        for k, v in (rec.get("cache") or {}).items():  # every "*hits" / "*misses" counter the evaluator reports
            if isinstance(v, (int, float)) and str(k).endswith("hits"):
                self._hits += v
            elif isinstance(v, (int, float)) and str(k).endswith("misses"):
                self._misses += v

    def report(self, done: int) -> None:
        if self.progress is None:
            return
        best = max((r["performance"] for r in self._front), default=None)
        total = self._hits + self._misses
        self.progress(done, self.s.evaluations, self._hv, best, self._hits / total if total else None)

    def replay(self, journal: Journal, i: int, G: np.ndarray) -> Optional[dict]:
        """The journal's record of planned candidate i (None when absent); it must hold the grouping planned."""
        rec = journal.get(i)
        if rec is not None and self.space.key(self.space.of_record(rec)) != self.space.key(G):
            raise MergetoolError(
                f"journal record i={i} holds a different grouping than this search plans; "
                "it was written with other settings, seed or problem",
                file=str(journal.path),
                fix="resume with the original settings and seed, or use a new run directory",
            )
        return rec

    def evaluate(self, Gs: Sequence[np.ndarray], preds: Optional[Sequence[float]], generation: int) -> list[dict]:
        """Evaluate planned candidates i = planned, planned+1, ... on all inputs: replay from the journal or run them."""
        batch: list[dict] = []
        todo: list[tuple[int, np.ndarray]] = []
        planned: dict[int, tuple[np.ndarray, Optional[float]]] = {}
        base, self.planned = self.planned, self.planned + len(Gs)
        for j, G in enumerate(Gs):
            i, pred = base + j, (None if preds is None else float(preds[j]))
            rec = self.replay(self.journal, i, G)
            if rec is not None:
                batch.append(rec)
                self.replayed += 1
                self.seen(rec)
            else:
                todo.append((i, G))
                planned[i] = (G, pred)
        if batch:
            self.report(self.n + len(batch))
        for i, res in self.executor.map(self.problem, todo):
            G, pred = planned[i]
            rec = self.journal.append(self.record(i, G, res, pred, generation))
            self.evaluated_now += 1
            batch.append(rec)
            self.seen(rec)
            self.report(self.n + len(batch))
        batch.sort(key=lambda r: r["i"])
        self.records.extend(batch)
        self.keys.update(self.space.key(self.space.of_record(r)) for r in batch)
        return batch

    def record(self, i: int, G: np.ndarray, res: Any, pred: Optional[float], generation: int) -> dict:
        """The journal record of one evaluation's result (full, or on the racing subset)."""
        res = _as_result(res)
        p = float(res.performance)
        if not math.isfinite(p):
            raise MergetoolError(
                f"evaluation {i} returned a non-finite performance ({p})",
                key="search",
                fix="check the task metrics; every task must score a finite number",
            )
        return {
            "i": i,
            **self.space.fields(G),
            "per_task": {str(k): float(v) for k, v in res.per_task.items()},
            "performance": p,
            "storage_cost": float(res.storage_cost),
            "predicted_performance": pred,
            "seconds": float(res.seconds),
            "cache": dict(res.cache or {}),
            "generation": generation,
            **({"subset": dict(res.subset)} if res.subset else {}),
        }


def _population(pm, recs: list[dict]):
    """A pymoo Population over records (X = index into recs, F = (-P, C), feasible)."""
    n = len(recs)
    return pm.Population.new("X", np.arange(n)[:, None], "F", objectives(recs), "CV", np.zeros((n, 1)))


def survive(pm, recs: list[dict], n: int, rng: np.random.Generator) -> tuple[list[dict], Any]:
    """NSGA-II survival (rank + crowding) to n records; returns (records, pymoo Population with rank/crowding)."""
    pop = pm.survival.do(pm.problem, _population(pm, recs), n_survive=min(n, len(recs)), random_state=rng)
    kept = [recs[int(x)] for x in pop.get("X")[:, 0]]
    pop.set("X", np.arange(len(kept))[:, None])
    return kept, pop


def offspring(pm, pop, pop_recs: list[dict], n: int, rng: np.random.Generator, seen: set[str],
              crossover_prob: float, kind: str, space: CandidateSpace) -> list[np.ndarray]:
    """Up to n new canonical genomes from binary tournaments, crossover and mutation (deduped)."""
    algo = SimpleNamespace(tournament_type="comp_by_dom_and_crowding", random_state=rng)
    out: list[np.ndarray] = []
    keys: set[str] = set()
    for _ in range(20):  # bounded: a nearly exhausted space yields few new children
        if len(out) >= n:
            break
        pairs = pm.selection.do(pm.problem, pop, max(1, math.ceil((n - len(out)) / 2)), n_parents=2,
                                to_pop=False, algorithm=algo, random_state=rng)
        for a, b in pairs:
            A, B = space.of_record(pop_recs[int(a)]), space.of_record(pop_recs[int(b)])
            for child in crossover(A, B, rng, crossover_prob, kind):
                G = space.canonical(space.mutate(child, rng))
                k = space.key(G)
                if k not in seen and k not in keys and len(out) < n:
                    keys.add(k)
                    out.append(G)
    return out


def screen(pm, run: _Run, cands: list[np.ndarray], cap: int, k: int, rng: np.random.Generator) -> tuple[list[int], np.ndarray]:
    """Train the RF on all real evaluations, predict P, take the predicted non-dominated set (capped by crowding)."""
    sur = Surrogate(run.s.rf_trees, seed=_seed_int(run.s.seed, k, 7), encode=run.space.features)
    sur.fit([run.space.of_record(r) for r in run.records], [r["performance"] for r in run.records])
    pred = sur.predict(cands)
    run.screened += len(cands)
    F = np.column_stack([-pred, [run.cost(G) for G in cands]])
    front = np.asarray(pm.nds.do(F, only_non_dominated_front=True), dtype=int)
    if len(front) > cap:
        pop = pm.Population.new("X", front[:, None], "F", F[front], "CV", np.zeros((len(front), 1)))
        front = pm.survival.do(pm.problem, pop, n_survive=cap, random_state=rng).get("X")[:, 0].astype(int)
    return sorted(int(j) for j in front), pred


def _start(problem, s: SearchSettings, journal: Journal, journal_path: Path, space: CandidateSpace) -> tuple:
    """(state, initial population, init used): checks the journal against the budget and the settings,
    then reuses the saved initial population or draws it (K-means over the models' task vectors)."""
    if len(journal) > s.evaluations:
        raise MergetoolError(
            f"the journal already holds {len(journal)} evaluations, more than the budget of {s.evaluations}",
            file=str(journal_path), key="search.evaluations", fix=f"set evaluations to at least {len(journal)}",
        )
    fingerprint = {"version": STATE_VERSION, "T": space.T, "L": space.L, "settings": s.fingerprint()}
    if space.coded:  # absent without a menu: plain searches keep their fingerprint
        fingerprint["codecs"] = list(space.menu)
    state = read_state(journal_path) or {}
    if state and state.get("fingerprint") != fingerprint:
        raise MergetoolError(
            "this run directory holds a search with other settings (seed, population, surrogate, init, codec menu "
            "or T x L)",
            file=str(journal_path), fix="resume with the original settings or use a new run directory",
        )
    if "initial_population" in state:  # resume without recomputing K-means over the models
        init, init_used = [np.asarray(G, dtype=np.int64) for G in state["initial_population"]], state["init_used"]
    else:
        init, init_used = initial_population(problem, s, space)
    state = {"fingerprint": fingerprint, "initial_population": [G.tolist() for G in init], "init_used": init_used,
             "generation": 0, "evaluations": len(journal), "screened": 0, "complete": False}
    write_state(journal_path, state)
    return state, init, init_used


def _generation(pm, run: "_Run", pop, pop_recs, k: int, rng: np.random.Generator) -> Optional[list]:
    """One generation's offspring, screened by the surrogate when on, evaluated in chain order; None when
    variation found no unseen grouping."""
    s = run.s
    cands = offspring(pm, pop, pop_recs, s.n_offspring, rng, run.keys, s.crossover_prob, s.crossover, run.space)
    if not cands:
        return None
    if s.surrogate == "random_forest":
        chosen, pred = screen(pm, run, cands, s.per_generation, k, rng)
        chosen = chain_order(chosen, key=lambda j: cands[j], canonical=run.space.canonical)
        Gs, preds = [cands[j] for j in chosen], [float(pred[j]) for j in chosen]
    else:
        Gs, preds = chain_order(cands[: s.per_generation], canonical=run.space.canonical), None
    if s.racing:
        return race(run, Gs, preds, k)
    left = s.evaluations - run.n
    return run.evaluate(Gs[:left], None if preds is None else preds[:left], k)


def _configure(problem, s: SearchSettings) -> None:
    """Tell the problem about racing and precision; refuse a problem that cannot do what was asked."""
    needs = (["use_racing", "evaluate_subset"] if s.racing else []) + \
        (["use_precision", "evaluate_fp32"] if s.precision != "fp32" else [])
    missing = [m for m in needs if not callable(getattr(problem, m, None))]
    if missing:
        raise MergetoolError(f"this problem has no {', '.join(missing)}", key="search.racing" if s.racing else
                             "search.precision", fix="turn racing off (--no-racing) or use precision fp32")
    if s.racing:
        problem.use_racing(s.racing.fraction, s.seed)
    if s.precision != "fp32":
        problem.use_precision(s.precision)


def _rescore(problem, records: list[dict], journal_path: Path) -> list[dict]:
    """The front of a reduced-precision search, re-scored at fp32 (cached in rescored.jsonl): the points
    the picks (G1/G2/G3, budgets) are made from. Each keeps its screening score as "screened_performance"."""
    out = []
    with Journal(journal_path.with_name("rescored.jsonl")) as cache:
        for rec in nondominated(records):
            done = cache.get(int(rec["i"]))
            if done is None:
                r = _as_result(problem.evaluate_fp32(CandidateSpace.of(problem).of_record(rec)))
                done = cache.append(dict(rec, performance=float(r.performance),
                                         per_task={str(k): float(v) for k, v in r.per_task.items()},
                                         screened_performance=rec["performance"]))
            out.append(done)
    return nondominated(out)


def _loop(pm, run: _Run, state: dict, journal_path: Path) -> tuple[int, str]:
    """Generations until the budget of full evaluations; returns (last generation, why it stopped)."""
    s = run.s
    pop_recs, pop = survive(pm, run.records, s.population, np.random.default_rng([s.seed, 0, 3]))
    space = run.space.size()
    k, stalls, dry = 1, 0, 0
    while run.n < s.evaluations:
        if len(run.keys) >= space or stalls >= 3:
            return k - 1, "exhausted"
        if dry >= DRY_GENERATIONS:  # racing dropped every candidate of the last generations
            return k - 1, "converged"
        rng = np.random.default_rng([s.seed, k])
        new = _generation(pm, run, pop, pop_recs, k, rng)
        if new is None:  # no new candidate this generation
            stalls, k = stalls + 1, k + 1
            continue
        stalls, dry = 0, (dry + 1 if not new else 0)
        pop_recs, pop = survive(pm, pop_recs + new, s.population, rng)
        state.update(generation=k, evaluations=run.n, screened=run.screened, partial=run.partial)
        write_state(journal_path, state)
        k += 1
    return k - 1, "budget"


def run_search(problem, settings: SearchSettings, journal_path, *, progress: Optional[Progress] = None,
               executor=None) -> SearchResult:
    """Run Algorithm 1 until `settings.evaluations` full evaluations; resume from the journal if present."""
    T, L = int(problem.T), int(problem.L)
    if T < 1 or L < 1:
        raise MergetoolError(f"the search needs at least one task and one component (got T={T}, L={L})", key="search")
    journal_path = Path(journal_path)
    s, ref, pm = settings, hv_reference(T, settings.hv_ref), _pymoo()
    _configure(problem, s)
    executor = executor or LocalExecutor()
    journal = Journal(journal_path)
    partials = Journal(journal_path.with_name(PARTIAL_NAME)) if s.racing else None
    try:
        run = _Run(problem, s, journal, executor, progress, ref, partials)
        state, init, init_used = _start(problem, s, journal, journal_path, run.space)
        first = [run.space.validate(G) for G in init[: s.evaluations]]
        run.evaluate(chain_order(first, canonical=run.space.canonical), None, 0)
        generations, stopped = _loop(pm, run, state, journal_path)
        state.update(generation=generations, evaluations=run.n, screened=run.screened, partial=run.partial,
                     complete=True, stopped=stopped)
        write_state(journal_path, state)
    finally:
        journal.close()
        if partials is not None:
            partials.close()

    records = run.records
    front_recs = _rescore(problem, records, journal_path) if s.precision != "fp32" else records
    artifacts = write_artifacts(front_recs, journal_path.parent, ref) if s.write_artifacts else {}
    return SearchResult(
        records=records, front=pareto_front(front_recs), hv=hypervolume(front_recs, ref), hv_ref=ref,
        hv_curve=hv_curve(records, ref), evaluations=run.n, evaluated_now=run.evaluated_now, replayed=run.replayed,
        screened=run.screened, generations=generations if run.n else 0, kendall_tau=kendall_tau(records),
        init_used=init_used, stopped=stopped, artifacts=artifacts, partial=run.partial, examples=run.examples,
        rescored=len(front_recs) if s.precision != "fp32" else 0,
    )
