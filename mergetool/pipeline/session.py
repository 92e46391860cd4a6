"""Recipe → plan → experts → evaluator → search → summary: the offline stage (Algorithm 1).

`Session` opens the models once and builds what the commands need. `MergeProblem` is the search's
black box; it pickles as its recipe text, so Ray workers rebuild it on their side.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from mergetool.core.grouping import all_shared, all_singletons, canonical, key
from mergetool.core.results import EvalResult
from mergetool.evaluation.engine import Evaluator, default_prefix_budget
from mergetool.merge.experts import ExpertStore
from mergetool.merge.quantize import QuantSpec
from mergetool.models.plan import Plan, build_plan, open_models
from mergetool.pipeline.rundir import read_json_record, read_references, write_json_atomic
from mergetool.recipe import Recipe, parse_recipe
from mergetool.search import SearchSettings
from mergetool.search.genome import CandidateSpace, codec_summary
from mergetool.search.types import RacingSettings


class Session:
    """Models opened once; experts and evaluators built on demand."""

    def __init__(self, recipe: Recipe, *, device: str = "auto", plan: Optional[Plan] = None):
        self.recipe, self.device = recipe, device
        self.base, self.tasks = open_models(recipe)
        self.plan = plan or build_plan(recipe, sources=(self.base, self.tasks), check_values=False)
        self._evaluators: dict = {}

    @cached_property
    def store(self) -> ExpertStore:
        return ExpertStore(self.recipe, self.plan, self.base, self.tasks)

    @cached_property
    def full_precision_store(self) -> ExpertStore:
        return ExpertStore(self.recipe, self.plan, self.base, self.tasks, quantization=QuantSpec(bits=32),
                           full_only=True)

    def evaluator(self, split: str = "validation", *, quantized: bool = True, caches: bool = True,
                  precision: str = "fp32") -> Evaluator:
        k = (split, quantized, caches) + ((precision,) if precision != "fp32" else ())
        if k not in self._evaluators:
            store = self.store if quantized else self.full_precision_store
            # the search's evaluator (validation, quantised) gets the full prefix budget; one-off scoring
            # (references, test scores, baselines) a quarter, so one process never holds several full ones
            budget = None if (split, quantized) == ("validation", True) else default_prefix_budget() // 4
            self._evaluators[k] = Evaluator(store, split=split, device=self.device, caches=caches,
                                            prefix_cache_bytes=budget, precision=precision)
        return self._evaluators[k]

    def score_store(self, store: ExpertStore, G, split: str = "validation", *,
                    subset: Optional[tuple[float, int]] = None, part: str = "full") -> EvalResult:
        """G scored with another store's experts (baselines) on this session's data and modules. With
        `subset` (racing: fraction, seed), part="subset" scores that subset only, and a later "full" call
        on the same store runs only the other batches."""
        k = ("other store", split)
        if k not in self._evaluators:
            self._evaluators[k] = Evaluator(store, split=split, device=self.device, memo=False, prefix=False)
        ev = self._evaluators[k]
        if ev.store is not store:
            ev.use_store(store)
        if subset is not None and ev.subsets is None:
            ev.use_subset(*subset)
        return ev.evaluate_subset(G) if part == "subset" else ev.evaluate(G)

    def release(self) -> None:
        """Drop what one-off scoring built (other splits' evaluators, full-precision experts) and keep
        the search's own evaluator: the memory goes back before a long search."""
        for k in [k for k in self._evaluators if k != ("validation", True, True)]:
            self._evaluators.pop(k).clear_caches()
        if "full_precision_store" in self.__dict__:
            self.__dict__.pop("full_precision_store").clear()

    def has_split(self, split: str) -> bool:
        return all(getattr(self.recipe.tasks[t], split) is not None for t in self.plan.tasks)


class MergeProblem:
    """evaluate(G) → P and C on the validation split; storage_cost(G) exact (Eq. 8). With racing,
    evaluate_subset(G) scores the fixed validation subset only; with bf16, evaluate_fp32(G) re-scores."""

    def __init__(self, session: Session, *, caches: bool = True):
        self._session, self._caches = session, caches  # caches=False: the naive evaluation (benchmarks)
        self.T, self.L = session.plan.T, session.plan.L
        self._racing: Optional[tuple[float, int]] = None
        self._precision = "fp32"

    @property
    def session(self) -> Session:
        return self._session

    def _evaluator(self) -> Evaluator:
        return self._session.evaluator("validation", caches=self._caches, precision=self._precision)

    def use_racing(self, fraction: float, seed: int) -> None:
        self._racing = (float(fraction), int(seed))
        self._evaluator().use_subset(fraction, seed)

    def use_precision(self, precision: str) -> None:
        self._precision = precision
        if self._racing:
            self._evaluator().use_subset(*self._racing)

    @property
    def codec_menu(self) -> tuple[str, ...]:
        """The recipe's codec labels: with more than one, the search's genome adds a codec per component."""
        return tuple(self._session.store.codec_names)

    def evaluate(self, X) -> EvalResult:
        return self._evaluator().evaluate(*CandidateSpace.of(self).split(X))

    def evaluate_subset(self, X) -> EvalResult:
        return self._evaluator().evaluate_subset(*CandidateSpace.of(self).split(X))

    def evaluate_fp32(self, X) -> EvalResult:
        return self._session.evaluator("validation").evaluate(*CandidateSpace.of(self).split(X))

    def storage_cost(self, X) -> float:
        return self._session.store.storage_cost(*CandidateSpace.of(self).split(X))

    def task_vectors(self, max_features: int = 65536) -> list[np.ndarray]:
        """Per component, T task vectors (θ_t − θ_pre) on a fixed strided subset of coordinates."""
        s = self._session
        out = []
        for comp in s.plan.components:
            rows = []
            for src in s.tasks:
                v = np.concatenate([(src.get(n).float() - s.base.get(n).float()).flatten().numpy()
                                    for n in comp.tensors])
                rows.append(v[:: max(1, v.size // max_features)][:max_features])
            out.append(np.stack(rows))
        return out

    def __getstate__(self) -> dict:
        r = self._session.recipe
        return {"text": r.text, "path": str(r.path) if r.path else None, "device": self._session.device,
                "racing": self._racing, "precision": self._precision, "caches": self._caches}

    def __setstate__(self, state: dict) -> None:
        recipe = parse_recipe(state["text"], Path(state["path"]) if state["path"] else None)
        self.__init__(Session(recipe, device=state["device"]), caches=state.get("caches", True))
        self.use_precision(state.get("precision", "fp32"))
        if state.get("racing"):
            self.use_racing(*state["racing"])


def settings_for(recipe: Recipe) -> SearchSettings:
    s = recipe.search
    racing = None if s.racing is None else RacingSettings(s.racing.fraction, s.racing.confidence, s.racing.margin)
    return SearchSettings(population=s.population, evaluations=s.evaluations, surrogate=s.surrogate,
                          init=s.init, seed=s.seed, crossover=s.crossover, racing=racing, precision=s.precision)


def references(session: Session, search_dir: Path, progress: Optional[Callable[[str], None]] = None) -> dict:
    """Full-precision references on every split: the static merge (all-shared, C = 1) and the
    individual models (all-singletons, C = T). Cached in reference.json."""
    path = search_dir / "reference.json"
    cached = read_references(path)
    if cached is not None:
        return cached
    p = session.plan
    out: dict = {}
    for name, G in (("static_merge", all_shared(p.T, p.L)), ("individual", all_singletons(p.T, p.L))):
        entry = {"grouping": canonical(G).tolist(), "storage_cost": session.full_precision_store.storage_cost(G)}
        for split in ("validation", "test"):
            if split == "validation" or session.has_split(split):
                if progress:
                    progress(f"{name} on {split}")
                r = session.evaluator(split, quantized=False).evaluate(G)
                entry[split] = {"performance": r.performance, "per_task": r.per_task}
        out[name] = entry
    write_json_atomic(path, out)
    return out


def solution_key(entry) -> str:
    """The key of a front entry (or a bare grouping): grouping.key(G), with its codec labels appended when
    the search had a codec menu (test_scores.json is keyed by it)."""
    if not isinstance(entry, dict):
        return key(entry)
    codecs = entry.get("codecs")
    return key(entry["grouping"]) + (f"|{','.join(codecs)}" if codecs else "")


def configuration(session: Session, entry) -> tuple[np.ndarray, Optional[list[int]]]:
    """(G, the menu index of each component's codec or None) of a front entry or a bare grouping: the
    search's own reading of a record (CandidateSpace.of_record, which refuses codecs off the menu)."""
    if not isinstance(entry, dict):
        return np.asarray(entry), None
    space = CandidateSpace(session.plan.T, session.plan.L, tuple(session.store.codec_names))
    return space.split(space.of_record(entry))


def test_scores(session: Session, search_dir: Path, solutions: list) -> dict:
    """Test-split scores of chosen solutions (front entries or bare groupings; by solution_key), cached
    in test_scores.json."""
    path = search_dir / "test_scores.json"
    cache = read_json_record(path) or {}
    if not session.has_split("test"):
        return cache
    for entry in solutions:
        k = solution_key(entry)
        if k not in cache:
            r = session.evaluator("test").evaluate(*configuration(session, entry))
            cache[k] = {"performance": r.performance, "per_task": r.per_task}
            write_json_atomic(path, cache)  # after each: a killed run keeps what it scored
    return cache


def picked(front: list[dict], reference: dict, baselines: Optional[dict]) -> list[dict]:
    """The front entries of G1, G2 and G3 (those the summary reports on test), without repeats."""
    out: dict[str, dict] = {}
    for f in select(front, reference, baselines).values():
        if isinstance(f, dict):
            out.setdefault(solution_key(f), f)
    return list(out.values())


def best_merging_baseline(baselines: Optional[dict], kinds: tuple[str, ...] = ("static", "dynamic")) -> Optional[dict]:
    """The merging baseline of `kinds` with the best validation P: by default (static or dynamic) what G2 must
    beat."""
    merging = [b for b in (baselines or {}).get("methods", []) if b.get("kind") in kinds
               and b.get("validation") is not None]
    return max(merging, key=lambda b: b["validation"]["performance"]) if merging else None


def select(front: list[dict], reference: dict, baselines: Optional[dict]) -> dict:
    """G1, G2, G3 as in the paper's Table I (selected on validation)."""
    def cheapest_above(p: float) -> Optional[dict]:
        above = [f for f in front if f["performance"] is not None and f["performance"] > p]
        return min(above, key=lambda f: (f["storage_cost"], -f["performance"])) if above else None

    out = {"G1": cheapest_above(reference["static_merge"]["validation"]["performance"]), "G2": None,
           "G3": max(front, key=lambda f: f["performance"]) if front else None}
    best = best_merging_baseline(baselines)
    if best is not None:
        out["G2"] = cheapest_above(best["validation"]["performance"])
        out["G2_baseline"] = best["name"]
    return out


def write_summary(run_dir: Path, front: list[dict], reference: dict, stats: dict,
                  baselines: Optional[dict] = None, tests: Optional[dict] = None) -> Path:
    """summary.md: G1, G2, G3 (selected on validation, reported on test), references, search stats."""
    chosen = select(front, reference, baselines)
    tests = tests or {}
    lines = ["# Search summary", "",
             "Solutions are selected on the validation split; test figures (when the recipe has a test "
             "split) are the same solutions scored on unseen data.", "",
             "| | C | P (validation) | P (test) | per task (validation) |", "|---|---|---|---|---|"]

    def row(label: str, c, p_val, p_test, per_task) -> None:
        fmt = lambda v: "–" if v is None else f"{v:.4f}"  # noqa: E731
        tasks = ", ".join(f"{k} {v:.3f}" for k, v in (per_task or {}).items())
        lines.append(f"| {label} | {fmt(c)} | {fmt(p_val)} | {fmt(p_test)} | {tasks} |")

    for name in ("individual", "static_merge"):
        ref = reference[name]
        row({"individual": "individual models (fp32)", "static_merge": "static merge (fp32, all shared)"}[name],
            ref["storage_cost"], ref["validation"]["performance"], (ref.get("test") or {}).get("performance"),
            ref["validation"]["per_task"])
    for g in ("G1", "G2", "G3"):
        f = chosen.get(g)
        note = {"G1": "cheapest beating the static merge", "G2": "cheapest beating the best merging baseline",
                "G3": "best performance"}[g]
        if f is None:
            why = "run `mergetool baselines` first" if g == "G2" and not baselines else "no front solution qualifies"
            lines.append(f"| {g} ({note}) | – | – | – | {why} |")
            continue
        t = tests.get(solution_key(f)) or {}
        label = f"{g} ({note}" + (f": {chosen['G2_baseline']})" if g == "G2" else ")") + f", id {f['id']}"
        if f.get("codecs"):
            label += f"; codecs: {codec_summary(f['codecs'])}"
        row(label, f["storage_cost"], f["performance"], t.get("performance"), f["per_task"])
    lines += ["", "## Search", ""]
    lines += [f"- {k}: {v}" for k, v in stats.items()]
    path = run_dir / "search" / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path
