"""`mergetool baselines`: the reference rows of the paper's Table I on the recipe's own data.

Every storage cost C is Eq. 8's accounting: stored parameters (× their bits) over b⁺·d, d being
the base's mergeable parameters; task heads are not counted (as for the search's C).

    individual (fp32)      all-singletons, full precision                    C = T·mergeable/d
    individual (b-bit)     all-singletons, the recipe's quantiser            C ≈ T·b/32 + metadata
    pre-trained            the base's backbone with each task's head         C = 1
    WA, TA, TIES, BC       static whole-model merges, tuned on validation    C = 1
    Twin-Merging           TIES shared expert + rank-r task deltas, per input  C = 1 + T·r(m+n)/d + router
    EMR-Merging            θ_pre + unified vector + 1-bit masks + rescalers    C = 2 + T/32 + T/d + router

Hyperparameters are tuned on the validation split only: λ ∈ {0.3, 0.5, 0.7, 1.0} (TA, BC), density ∈
{0.2, 0.5, 0.8} (TIES, BC; BC gamma 0.01), SVD rank ∈ TWIN_RANKS (Twin; its shared expert is the
tuned TIES merge). The best validation P wins (the first grid point, i.e. the smaller rank, on ties).

EMR needs θ_pre to rebuild each task where its mask is 0, so C counts it; the paper's Table I (1.25 for
8 tasks) leaves it out, reported as `paper_convention` in its storage breakdown.

Routing (`routing`): `router` trains the project's router (mergetool.routing: the 3-layer MLP with the
recipe's `router` settings) on each task's `router` split, over the mean-pooled last hidden state of the
method's own stored backbone (Twin: shared expert; EMR: θ_pre), so only the MLP adds storage. Twin
merges with the softmax weights per input, EMR takes the argmax task. `oracle` is one-hot on the true
task (nothing stored). `auto` = router when every task has a `router` split, else oracle. The routing
accuracy on each scored split is reported.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional, Sequence

from mergetool.baselines import static
from mergetool.baselines.dynamic import (
    EMRModel,
    Features,
    PerInputEvaluator,
    TwinModel,
    oracle_route,
    router_ready,
    train_router,
)
from mergetool.baselines.static import STATIC, grid_points
from mergetool.core.errors import MergetoolError
from mergetool.core.grouping import all_shared, all_singletons
from mergetool.core.storage import storage_cost
from mergetool.pipeline.rundir import recipe_hash
from mergetool.pipeline.session import picked, references, test_scores, write_summary
from mergetool.search.journal import read_journal
from mergetool.search.types import RacingSettings

METHODS = ("wa", "ta", "ties", "bc", "twin", "emr")
TWIN_RANKS = (4, 16, 64)
SPLITS = ("validation", "test")
ROUTINGS = ("auto", "router", "oracle")
ROUTING_NOTE = {"oracle": "oracle: one-hot on the true task (no router trained or stored)",
                "router": "router: the project's MLP router trained on the `router` split, over each method's "
                          "own backbone features (Twin: softmax-weighted merge per input; EMR: argmax task)"}


def _entry(name: str, key: str, kind: str, cost: float, val, test, params: Optional[dict] = None, **extra) -> dict:
    as_dict = lambda r: None if r is None else {"performance": r[0], "per_task": r[1]}  # noqa: E731
    return {"name": name, "id": key, "kind": kind, "storage_cost": cost, "validation": as_dict(val),
            "test": as_dict(test), "params": params or {}, **extra}


def resolve_routing(session, requested: str) -> str:
    """auto | router | oracle → router | oracle."""
    if requested not in ROUTINGS:
        raise MergetoolError(f"unknown routing {requested!r}", key="--routing", fix="use auto, router or oracle")
    if requested == "oracle" or (requested == "auto" and not router_ready(session)):
        return "oracle"
    if not router_ready(session):
        raise MergetoolError("--routing router needs a `router` split for every task", key="--routing",
                             fix="add `router: {path: ...}` to each task, or use --routing oracle")
    return "router"


def count_steps(recipe, *, split: str, methods: Sequence[str], twin_ranks: Sequence[int], routing: str) -> int:
    """The number of progress messages run_baselines sends (for a progress bar's total)."""
    t, r = int(split == "test"), int(routing == "router")
    n = (2 + recipe.quantization.enabled) * (1 + t)  # individual fp32 (and b-bit), pre-trained
    for key, (_, _, _, grid) in STATIC.items():
        if key in methods or (key == "ties" and "twin" in methods):
            n += len(grid_points(grid)) + (t if key in methods else 0)
    n += (1 + r + len(set(twin_ranks)) + t) if "twin" in methods else 0
    n += (2 + r + t) if "emr" in methods else 0
    return n


def run_baselines(session, *, split: str = "validation", methods: Sequence[str] = METHODS,
                  twin_ranks: Sequence[int] = TWIN_RANKS, routing: str = "auto", device: str = "auto",
                  progress: Optional[Callable[[str], None]] = None, racing: Optional[RacingSettings] = None,
                  reference: Optional[dict] = None) -> dict:
    """Score every baseline; tune on validation, and also score the tuned ones on test if split=test.

    `racing` races the static grids (static.tune); `reference` is the search's reference.json, whose
    individual fp32 scores (the same evaluator, so the same numbers) are taken instead of recomputed."""
    _check_request(session, split, methods)
    run = _BaselineRun(session, split == "test", resolve_routing(session, routing), progress or (lambda _: None))
    run.racing, run.reference = racing, reference or {}
    _individual_and_pretrained(run)
    tuned = _static(run, methods, device)
    if "twin" in methods:
        _twin(run, tuned["ties"], twin_ranks)
    if "emr" in methods:
        _emr(run)
    p = session.plan
    return {"split": split, "recipe_sha256": recipe_hash(session.recipe), "d": p.d, "b_plus": p.base_bits,
            "tasks": list(p.tasks), "routing": ROUTING_NOTE[run.routing] if {"twin", "emr"} & set(methods) else None,
            "grids": {k: v[3] for k, v in static.STATIC.items()} | {"twin_rank": sorted(set(twin_ranks))},
            "methods": run.out}


def _check_request(session, split: str, methods: Sequence[str]) -> None:
    if split not in SPLITS:
        raise MergetoolError(f"unknown split {split!r}", key="--split", fix="use validation or test")
    if session.plan.adapter:
        raise MergetoolError("`mergetool baselines` compares full fine-tunes; this recipe's task models are PEFT "
                             "adapters", key="models", fix="run the baselines on merged (full) task models, "
                             "or compare adapter libraries with `mergetool evaluate`")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise MergetoolError(f"unknown baseline {unknown[0]!r}", key="--methods",
                             fix=f"choose from {', '.join(METHODS)}")
    if split == "test" and not session.has_split("test"):
        raise MergetoolError("--split test needs a test split for every task", key="--split",
                             fix="add `test:` to each task of the recipe, or use --split validation")


class _BaselineRun:
    """What every baseline of one `run_baselines` call shares: the session, the splits, the output rows."""
    def __init__(self, session, test: bool, routing: str, say: Callable[[str], None]):
        self.s, self.p, self.test, self.routing, self.say = session, session.plan, test, routing, say
        self.singles, self.shared = all_singletons(self.p.T, self.p.L), all_shared(self.p.T, self.p.L)
        self.splits = SPLITS if test else ("validation",)
        self.out: list[dict] = []
        self._evaluators: Optional[dict] = None
        self.racing: Optional[RacingSettings] = None
        self.reference: dict = {}

    def evaluate(self, fn, what: str):
        """fn(split) on validation and, when asked for, on test."""
        self.say(f"{what} (validation)")
        val = fn("validation")
        if self.test:
            self.say(f"{what} (test)")
        return val, fn("test") if self.test else None

    @property
    def evaluators(self) -> dict:
        if self._evaluators is None:

            self._evaluators = {sp: PerInputEvaluator(self.s, sp) for sp in self.splits}
        return self._evaluators

    def router_for(self, state: dict, what: str) -> tuple:
        if self.routing == "oracle":
            return oracle_route(self.p.T), {"kind": "oracle", "params": 0}
        self.say(f"{what}: training the router")
        return train_router(self.s, Features(self.s, state, self.evaluators["validation"].ev.device))

    def routed(self, info: dict, accuracy: dict) -> dict:
        return {**info, "note": ROUTING_NOTE[self.routing], "accuracy": accuracy}

    def router_cost(self, info: dict) -> float:
        return storage_cost(info["params"] * 32, d=self.p.d, base_bits=self.p.base_bits)  # an fp32 MLP


def _individual_and_pretrained(run: _BaselineRun) -> None:
    s = run.s

    def session_eval(quantized: bool):
        def fn(sp):
            r = s.evaluator(sp, quantized=quantized).evaluate(run.singles)
            return r.performance, r.per_task
        return fn

    known = run.reference.get("individual") or {}
    if all(sp in known for sp in run.splits):  # the search scored them already (same evaluator, same numbers)
        for sp in run.splits:
            run.say(f"individual fp32 ({sp}, from the search's reference.json)")
        val, tst = [(known[sp]["performance"], known[sp]["per_task"]) if sp in run.splits else None for sp in SPLITS]
    else:
        val, tst = run.evaluate(session_eval(False), "individual fp32")
    run.out.append(_entry("Individual (fp32)", "individual", "individual",
                          s.full_precision_store.storage_cost(run.singles), val, tst))
    q = s.recipe.quantization
    if q.enabled:
        val, tst = run.evaluate(session_eval(True), f"individual {q.bits}-bit")
        run.out.append(_entry(f"Individual ({q.bits}-bit)", f"individual_{q.bits}bit", "individual",
                              s.store.storage_cost(run.singles), val, tst,
                              {"bits": q.bits, "granularity": q.granularity, "mode": q.mode}))
    pre = static.pretrained_store(s)
    val, tst = run.evaluate(lambda sp: static.score(s, pre, run.shared, sp)[:2], "pre-trained")
    run.out.append(_entry("Pre-trained", "pretrained", "pretrained", pre.storage_cost(run.shared), val, tst))
    pre.clear()


def _static(run: _BaselineRun, methods: Sequence[str], device: str) -> dict:
    """The tuned static merges asked for (TIES also when Twin needs it as its shared expert)."""
    tuned = {}
    for key in [m for m in static.STATIC if m in methods or (m == "ties" and "twin" in methods)]:
        best, rows = static.tune(run.s, key, device, lambda what: run.say(f"tuning {what}"), racing=run.racing)
        tuned[key] = best
        if key not in methods:
            continue
        if run.test:
            run.say(f"{key} (test)")
        tst = static.score(run.s, best.store, run.shared, "test")[:2] if run.test else None
        name, method, _, grid = static.STATIC[key]
        run.out.append(_entry(name, key, "static", best.storage_cost, (best.performance, best.per_task), tst,
                              {"method": method, **best.params}, grid=rows))
    return tuned


def _twin(run: _BaselineRun, ties, twin_ranks: Sequence[int]) -> None:
    p, ev = run.p, run.evaluators
    run.say("twin: SVD of the task deltas")
    shared_state = {}
    for l in range(p.L):
        shared_state.update(ties.store.expert(l, tuple(range(p.T))).dense())
    twin = TwinModel(p, shared_state, run.s.tasks, twin_ranks)
    route, info = run.router_for(shared_state, "twin")
    best, rows, acc = None, [], {}
    for r in sorted(set(twin_ranks)):
        run.say(f"tuning twin rank {r}")
        perf, per_task = ev["validation"].evaluate(lambda w, r=r: twin.state(w, r), route)
        bd = twin.breakdown(r)
        rows.append({"rank": r, "performance": perf, "storage_cost": bd["shared"] + bd["per_task"]})
        if best is None or perf > best[1]:
            best = (r, perf, per_task)
    acc["validation"] = ev["validation"].routing_accuracy
    r, tst = best[0], None
    if run.test:
        run.say("twin (test)")
        tst = ev["test"].evaluate(lambda w: twin.state(w, r), route)
        acc["test"] = ev["test"].routing_accuracy
    bd = {**twin.breakdown(r), "router": run.router_cost(info)}
    run.out.append(_entry("Twin-Merging", "twin", "dynamic", bd["shared"] + bd["per_task"] + bd["router"],
                          best[1:], tst, {"rank": r, "shared": {"method": "ties", **ties.params}},
                          grid=rows, storage_breakdown=bd, routing=run.routed(info, acc)))


def _emr(run: _BaselineRun) -> None:
    run.say("emr: unified vector, masks, rescalers")
    emr = EMRModel(run.p, run.s.base, run.s.tasks)
    route, info = run.router_for(emr.pre, "emr")
    acc = {}

    def score(sp):
        r = run.evaluators[sp].evaluate(emr.state, route, key=emr.key)
        acc[sp] = run.evaluators[sp].routing_accuracy
        return r

    val, tst = run.evaluate(score, "emr")
    bd = {**emr.breakdown(), "router": run.router_cost(info)}
    cost = bd["pretrained"] + bd["unified"] + bd["masks"] + bd["rescalers"] + bd["router"]
    bd["paper_convention"] += bd["router"]
    run.out.append(_entry("EMR-Merging", "emr", "dynamic", cost, val, tst,
                          {"rescalers": dict(zip(run.p.tasks, emr.rescalers))}, storage_breakdown=bd,
                          routing=run.routed(info, acc)))


def refresh_summary(session, run_dir: Path, baselines: dict) -> Optional[Path]:
    """Rewrite search/summary.md with G2 when the run has a search (front.json); else None."""
    search_dir = run_dir / "search"
    front_path = search_dir / "front.json"
    if not front_path.is_file():
        return None
    front = json.loads(front_path.read_text())
    refs = references(session, search_dir)
    tests = test_scores(session, search_dir, picked(front, refs, baselines))  # G1, G2, G3
    return write_summary(run_dir, front, refs, _search_stats(search_dir), baselines, tests)


def _search_stats(search_dir: Path) -> dict:
    """The search's stats as the last summary.md listed them; else rebuilt from the journal."""
    path = search_dir / "summary.md"
    lines = path.read_text().splitlines() if path.is_file() else []
    if "## Search" in lines:
        stats = {}
        for line in lines[lines.index("## Search") + 1:]:
            if line.startswith("- ") and ": " in line:
                k, v = line[2:].split(": ", 1)
                stats[k] = v
        if stats:
            return stats

    journal = search_dir / "evaluations.jsonl"
    return {"evaluations": len(read_journal(journal)) if journal.is_file() else 0}
