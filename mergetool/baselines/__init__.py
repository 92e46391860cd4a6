"""`mergetool baselines`: the reference rows of the paper's Table I on the recipe's own data.

Every storage cost C is Eq. 8's accounting: stored parameters (× their bits) over b⁺·d, d being
the base's mergeable parameters; task heads are not counted (as for the search's C).

    individual (fp32)      all-singletons, full precision                    C = T·mergeable/d
    individual (b-bit)     all-singletons, the recipe's quantiser            C ≈ T·b/32 + metadata
    pre-trained            the base's backbone with each task's head         C = 1
    WA, TA, TIES, BC, PCB  static whole-model merges, tuned on validation    C = 1
    Fisher, RegMean        static merges weighted by router-split statistics  C = 1 (data_merges.py)
    AdaMerging             TA with λ learned on unlabelled inputs (task-/layer-wise)  C = 1 (adamerging.py)
    Twin-Merging           TIES shared expert + rank-r task deltas, per input  C = 1 + T·r(m+n)/d + router
    EMR-Merging            θ_pre + unified vector + 1-bit masks + rescalers    C = 2 + T/32 + T/d + router
    TALL masks             θ_pre + τ_MTL + T bit-packed masks                  C = 2 + T/32 + router
    T-Switch-like          θ_pre + per task top-ρ mask, signs, a scale/tensor  C ≈ 1 + T(1+ρ)/32 + router
    BitDelta               θ_pre + per task 1-bit signs + per-row scales       C ≈ 1 + T/32 + router
(fp32 base; with an fp16 base θ_pre and the dense vectors cost half: see routed.py and `--base-storage`.)

Hyperparameters are tuned on the validation split only: λ ∈ {0.3, 0.5, 0.7, 1.0} (TA, BC), density ∈
{0.2, 0.5, 0.8} (TIES, BC; BC gamma 0.01), PCB ratio ∈ {0.05, 0.1, 0.2} × λ ∈ {0.7, 1.0, 1.3}, SVD rank
∈ TWIN_RANKS (Twin; its shared expert is the tuned TIES merge). The best validation P wins (the first grid point, i.e. the smaller rank, on ties).

EMR needs θ_pre to rebuild each task where its mask is 0, so C counts it; the paper's Table I (1.25 for
8 tasks) leaves it out, reported as `paper_convention` in its storage breakdown.

The routed methods (Twin, EMR, TALL, T-Switch-like, BitDelta; routed.py, delta.py) are scored under three
protocols (common.py): oracle (task given), backbone_routed and end_to_end, each with its C under one
convention (everything needed at inference but the heads), at every base storage asked for (`storages`).

Routing (`routing`): `router` trains the project's router (mergetool.routing: the 3-layer MLP with the
recipe's `router` settings) on each task's `router` split, over the mean-pooled last hidden state of the
method's own stored backbone (Twin: shared expert; EMR, TALL, T-Switch, BitDelta: θ_pre as stored), so
only the MLP adds storage. Twin merges with the softmax weights per input, the others take the argmax task.
`oracle` is one-hot on the true task (nothing stored). `auto` = router when every task has a `router` split,
else oracle. The routing accuracy on each scored split is reported (overall and per task).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional, Sequence

from mergetool.baselines import static
from mergetool.baselines.adamerging import GRANULARITIES as ADAMERGING_KEYS
from mergetool.baselines.adamerging import AdaMergingSettings, count_adamerging_steps, run_adamerging
from mergetool.baselines.common import ROUTING_NOTE, SPLITS, BaselineRun, entry
from mergetool.baselines.data_merges import (
    check_router_splits,
    count_data_merge_steps,
    run_fisher,
    run_regmean,
)
from mergetool.baselines.delta import MODELS
from mergetool.baselines.dynamic import router_ready
from mergetool.baselines.mtl import run_mtl
from mergetool.baselines.parts import BaselineParts
from mergetool.baselines.routed import ROUTED, count_routed_steps, run_emr, run_payload, run_twin
from mergetool.baselines.static import grid_points
from mergetool.baselines.storage import STORAGES
from mergetool.core.errors import MergetoolError
from mergetool.core.version import __version__
from mergetool.pipeline.rundir import recipe_hash
from mergetool.pipeline.session import picked, references, test_scores, write_summary
from mergetool.search.journal import read_journal
from mergetool.search.types import RacingSettings

METHODS = ("wa", "ta", "ties", "bc", "pcb", "fisher", "regmean", "adamerging", "twin", "emr", "tall", "tswitch",
           "bitdelta")
TWIN_RANKS = (4, 16, 64)
ROUTINGS = ("auto", "router", "oracle")
BASE_STORAGES = ("fp32", "fp16")  # the default `storages`: the papers' fp32 base, then an fp16 one


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


def count_steps(recipe, *, split: str, methods: Sequence[str], twin_ranks: Sequence[int], routing: str,
                storages: Sequence[str] = BASE_STORAGES, grids: Optional[dict] = None, mtl: bool = False) -> int:
    """The number of progress messages run_baselines sends (for a progress bar's total)."""
    t, r = int(split == "test"), int(routing == "router")
    n = (2 + recipe.quantization.enabled) * (1 + t)  # individual fp32 (and b-bit), pre-trained
    n += (2 + t) if mtl else 0
    for key, (_, _, _, grid) in static.STATIC.items():
        if key in methods or (key == "ties" and "twin" in methods):
            n += len(grid_points(grid)) + (t if key in methods else 0)
    n += count_data_merge_steps(methods, len(recipe.tasks), bool(t))
    n += count_adamerging_steps(bool(t)) if "adamerging" in methods else 0
    grids = {k: MODELS[k][1].grid for k in MODELS} | (grids or {})
    return n + count_routed_steps(methods, storages, grids, twin_ranks, test=bool(t), router=bool(r))


def run_baselines(session, *, split: str = "validation", methods: Sequence[str] = METHODS,
                  twin_ranks: Sequence[int] = TWIN_RANKS, routing: str = "auto",
                  progress: Optional[Callable[[str], None]] = None, racing: Optional[RacingSettings] = None,
                  reference: Optional[dict] = None, storages: Sequence[str] = BASE_STORAGES,
                  grids: Optional[dict] = None, parts: Optional[Path] = None,
                  adamerging: AdaMergingSettings = AdaMergingSettings(), mtl: Optional[Path] = None,
                  detail: Optional[Callable[[str], None]] = None) -> dict:
    """Score every baseline; tune on validation, and also score the tuned ones on test if split=test.

    `racing` races the static grids (static.tune); `reference` is the search's reference.json, whose
    individual fp32 scores (the same evaluator, so the same numbers) are taken instead of recomputed.
    `storages` are the base precisions the routed methods are reported at (the first is the entry itself);
    `grids` overrides the tuned grid of tall / tswitch / bitdelta (delta.py's defaults); `adamerging` are
    AdaMerging's optimiser settings (the paper's by default); `mtl` a folder of per-task checkpoints of a
    multi-task model (baselines/mtl.py), scored as the "Traditional MTL" row. `parts` is a folder
    where each finished baseline is kept (parts.py), so that a stopped run resumes; the result says which
    parts were read back (`resumed`). `progress(what)` is called once per counted step (count_steps);
    `detail(what)` describes progress within a long step (AdaMerging's optimiser steps) without counting."""
    _check_request(session, split, methods, storages)
    adamerging.checked()
    run = BaselineRun(session, split == "test", resolve_routing(session, routing), progress or (lambda _: None))
    run.racing, run.reference, run.storages = racing, reference or {}, tuple(storages)
    run.detail = detail or run.detail
    grids = {k: tuple(MODELS[k][1].grid) for k in MODELS} | dict(grids or {})
    kept = BaselineParts(parts, {"recipe": recipe_hash(session.recipe), "split": split, "routing": run.routing,
                                 "storages": run.storages, "racing": racing, "individual": run.reference.get("individual"),
                                 "version": __version__})
    kept.run(run, "individual", lambda: _individual_and_pretrained(run))
    if mtl is not None:
        kept.run(run, "mtl", lambda: run_mtl(run, mtl), own=str(mtl))
    tuned = _static(run, methods, kept)
    for key, fn in (("fisher", run_fisher), ("regmean", run_regmean)):
        if key in methods:
            kept.run(run, f"static-{key}", lambda f=fn: f(run))
    if "adamerging" in methods:  # a part per granularity: each is a long fit, kept as soon as it is scored
        for key in ADAMERGING_KEYS:
            kept.run(run, f"static-{key}", lambda k=key: run_adamerging(run, adamerging, [k]), own=repr(adamerging))
    if "twin" in methods:
        kept.run(run, "twin", lambda: run_twin(run, tuned["ties"], twin_ranks),
                 own={"ranks": sorted(set(twin_ranks)), "shared": static.STATIC["ties"]})
    if "emr" in methods:
        kept.run(run, "emr", lambda: run_emr(run))
    for key in (m for m in MODELS if m in methods):
        kept.run(run, key, lambda k=key: run_payload(run, k, grids[k]), own=list(grids[key]))
    p = session.plan
    return {"split": split, "recipe_sha256": recipe_hash(session.recipe), "d": p.d, "b_plus": p.base_bits,
            "tasks": list(p.tasks), "routing": ROUTING_NOTE[run.routing] if set(ROUTED) & set(methods) else None,
            "base_storages": list(run.storages),
            "grids": {k: v[3] for k, v in static.STATIC.items()} | {"twin_rank": sorted(set(twin_ranks))}
            | {f"{k}_{MODELS[k][1].param}": list(v) for k, v in grids.items()},
            "methods": run.out, "resumed": kept.resumed}


def _check_request(session, split: str, methods: Sequence[str], storages: Sequence[str] = BASE_STORAGES) -> None:
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
    check_storages(storages)
    check_router_splits(session, methods)
    if split == "test" and not session.has_split("test"):
        raise MergetoolError("--split test needs a test split for every task", key="--split",
                             fix="add `test:` to each task of the recipe, or use --split validation")


def check_storages(storages: Sequence[str]) -> None:
    bad = [s for s in storages if s not in STORAGES]
    if bad or not storages or len(set(storages)) != len(storages):
        raise MergetoolError(f"bad --base-storage {','.join(storages)!r}", key="--base-storage",
                             fix=f"give distinct base precisions from {', '.join(STORAGES)}, e.g. fp32,fp16")


def _individual_and_pretrained(run: BaselineRun) -> None:
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
    run.out.append(entry("Individual (fp32)", "individual", "individual",
                          s.full_precision_store.storage_cost(run.singles), val, tst))
    q = s.recipe.quantization
    if q.enabled:
        val, tst = run.evaluate(session_eval(True), f"individual {q.bits}-bit")
        run.out.append(entry(f"Individual ({q.bits}-bit)", f"individual_{q.bits}bit", "individual",
                              s.store.storage_cost(run.singles), val, tst,
                              {"bits": q.bits, "granularity": q.granularity, "mode": q.mode}))
    pre = static.fixed_store(s)
    val, tst = run.evaluate(lambda sp: static.score(s, pre, run.shared, sp)[:2], "pre-trained")
    run.out.append(entry("Pre-trained", "pretrained", "pretrained", pre.storage_cost(run.shared), val, tst))
    pre.clear()


def _static(run: BaselineRun, methods: Sequence[str], kept: BaselineParts) -> dict:
    """The tuned static merges asked for (TIES also when Twin needs it as its shared expert), each a part."""
    tuned: dict = {}
    for key in [m for m in static.STATIC if m in methods or (m == "ties" and "twin" in methods)]:
        best = kept.run(run, f"static-{key}", lambda k=key: _tune_static(run, k, k in methods, tuned),
                        own={"grid": static.STATIC[key], "reported": key in methods})
        if key not in tuned:  # read back from its part: the merge is rebuilt from the tuned parameters
            tuned[key] = static.Scored(best["params"], best["performance"], best["per_task"], best["storage_cost"],
                                       static.merged_store(run.s, static.STATIC[key][1], best["params"]))
    return tuned


def _tune_static(run: BaselineRun, key: str, reported: bool, tuned: dict) -> dict:
    best, rows = static.tune(run.s, key, lambda what: run.say(f"tuning {what}"), racing=run.racing)
    tuned[key] = best
    if reported:
        if run.test:
            run.say(f"{key} (test)")
        tst = static.score(run.s, best.store, run.shared, "test")[:2] if run.test else None
        name, method, _, grid = static.STATIC[key]
        run.out.append(entry(name, key, "static", best.storage_cost, (best.performance, best.per_task), tst,
                              {"method": method, **best.params}, grid=rows))
    return {"params": best.params, "performance": best.performance, "per_task": best.per_task,
            "storage_cost": best.storage_cost}


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
