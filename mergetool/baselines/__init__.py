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

from mergetool.core.errors import MergetoolError
from mergetool.core.grouping import all_shared, all_singletons

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
    from mergetool.baselines.dynamic import router_ready

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
    from mergetool.baselines.static import STATIC, grid_points

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
                  progress: Optional[Callable[[str], None]] = None) -> dict:
    """Score every baseline; tune on validation, and also score the tuned ones on test if split=test."""
    from mergetool.baselines import static
    from mergetool.baselines.dynamic import (EMRModel, Features, PerInputEvaluator, TwinModel, oracle_route,
                                             train_router)
    from mergetool.pipeline.rundir import recipe_hash

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
    s, p = session, session.plan
    test = split == "test"
    if test and not s.has_split("test"):
        raise MergetoolError("--split test needs a test split for every task", key="--split",
                             fix="add `test:` to each task of the recipe, or use --split validation")
    routing = resolve_routing(s, routing)
    say = progress or (lambda _: None)
    singles, shared = all_singletons(p.T, p.L), all_shared(p.T, p.L)
    splits = SPLITS if test else ("validation",)
    out: list[dict] = []

    def evaluate(fn, what: str):
        say(f"{what} (validation)")
        val = fn("validation")
        if test:
            say(f"{what} (test)")
        return val, fn("test") if test else None

    def session_eval(quantized: bool):
        def fn(sp):
            r = s.evaluator(sp, quantized=quantized).evaluate(singles)
            return r.performance, r.per_task
        return fn

    val, tst = evaluate(session_eval(False), "individual fp32")
    out.append(_entry("Individual (fp32)", "individual", "individual",
                      s.full_precision_store.storage_cost(singles), val, tst))
    q = s.recipe.quantization
    if q.enabled:
        val, tst = evaluate(session_eval(True), f"individual {q.bits}-bit")
        out.append(_entry(f"Individual ({q.bits}-bit)", f"individual_{q.bits}bit", "individual",
                          s.store.storage_cost(singles), val, tst,
                          {"bits": q.bits, "granularity": q.granularity, "mode": q.mode}))

    pre = static.pretrained_store(s)
    val, tst = evaluate(lambda sp: static.score(s, pre, shared, sp)[:2], "pre-trained")
    out.append(_entry("Pre-trained", "pretrained", "pretrained", pre.storage_cost(shared), val, tst))
    pre.clear()

    tuned: dict = {}
    for key in [m for m in static.STATIC if m in methods or (m == "ties" and "twin" in methods)]:
        best, rows = static.tune(s, key, device, lambda what: say(f"tuning {what}"))
        tuned[key] = best
        if key not in methods:
            continue
        if test:
            say(f"{key} (test)")
        tst = static.score(s, best.store, shared, "test")[:2] if test else None
        name, method, _, grid = static.STATIC[key]
        out.append(_entry(name, key, "static", best.storage_cost, (best.performance, best.per_task), tst,
                          {"method": method, **best.params}, grid=rows))

    evaluators = {sp: PerInputEvaluator(s, sp) for sp in splits}

    def router_for(state: dict, what: str) -> tuple:
        if routing == "oracle":
            return oracle_route(p.T), {"kind": "oracle", "params": 0}
        say(f"{what}: training the router")
        return train_router(s, Features(s, state, evaluators["validation"].ev.device))

    def routed(info: dict, accuracy: dict) -> dict:
        return {**info, "note": ROUTING_NOTE[routing], "accuracy": accuracy}

    router_cost = lambda info: info["params"] * 32 / (p.base_bits * p.d)  # noqa: E731  (fp32 MLP)
    if "twin" in methods:
        ties = tuned["ties"]
        say("twin: SVD of the task deltas")
        shared_state = {}
        for l in range(p.L):
            shared_state.update(ties.store.expert(l, tuple(range(p.T))).dense())
        twin = TwinModel(p, shared_state, s.tasks, twin_ranks)
        route, info = router_for(shared_state, "twin")
        best, rows, acc = None, [], {}
        for r in sorted(set(twin_ranks)):
            say(f"tuning twin rank {r}")
            perf, per_task = evaluators["validation"].evaluate(lambda w, r=r: twin.state(w, r), route)
            bd = twin.breakdown(r)
            rows.append({"rank": r, "performance": perf, "storage_cost": bd["shared"] + bd["per_task"]})
            if best is None or perf > best[1]:
                best = (r, perf, per_task)
        acc["validation"] = evaluators["validation"].routing_accuracy
        r = best[0]
        if test:
            say("twin (test)")
            tst = evaluators["test"].evaluate(lambda w: twin.state(w, r), route)
            acc["test"] = evaluators["test"].routing_accuracy
        bd = {**twin.breakdown(r), "router": router_cost(info)}
        out.append(_entry("Twin-Merging", "twin", "dynamic", bd["shared"] + bd["per_task"] + bd["router"],
                          best[1:], tst if test else None, {"rank": r, "shared": {"method": "ties", **ties.params}},
                          grid=rows, storage_breakdown=bd, routing=routed(info, acc)))
        del twin, shared_state
    if "emr" in methods:
        say("emr: unified vector, masks, rescalers")
        emr = EMRModel(p, s.base, s.tasks)
        route, info = router_for(emr.pre, "emr")
        acc = {}

        def run(sp):
            r = evaluators[sp].evaluate(emr.state, route, key=emr.key)
            acc[sp] = evaluators[sp].routing_accuracy
            return r

        val, tst = evaluate(run, "emr")
        bd = {**emr.breakdown(), "router": router_cost(info)}
        cost = bd["pretrained"] + bd["unified"] + bd["masks"] + bd["rescalers"] + bd["router"]
        bd["paper_convention"] += bd["router"]
        out.append(_entry("EMR-Merging", "emr", "dynamic", cost, val, tst,
                          {"rescalers": dict(zip(p.tasks, emr.rescalers))}, storage_breakdown=bd,
                          routing=routed(info, acc)))
    return {"split": split, "recipe_sha256": recipe_hash(s.recipe), "d": p.d, "b_plus": p.base_bits,
            "tasks": list(p.tasks), "routing": ROUTING_NOTE[routing] if {"twin", "emr"} & set(methods) else None,
            "grids": {k: v[3] for k, v in static.STATIC.items()} | {"twin_rank": sorted(set(twin_ranks))},
            "methods": out}


def refresh_summary(session, run_dir: Path, baselines: dict) -> Optional[Path]:
    """Rewrite search/summary.md with G2 when the run has a search (front.json); else None."""
    from mergetool.pipeline.session import references, test_scores, write_summary

    search_dir = run_dir / "search"
    front_path = search_dir / "front.json"
    if not front_path.is_file():
        return None
    front = json.loads(front_path.read_text())
    refs = references(session, search_dir)
    tests = test_scores(session, search_dir, [f["grouping"] for f in front])
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
    from mergetool.search.journal import read_journal

    journal = search_dir / "evaluations.jsonl"
    return {"evaluations": len(read_journal(journal)) if journal.is_file() else 0}
