"""Racing in the search: score a generation's candidates on the fixed validation subset, complete only
those whose upper confidence bound could beat the front at their exact C.

The decision for a candidate depends only on its own subset result and on the front that stood at the
start of the generation (its points' subset scores come with their full records), never on evaluation
order, the executor or a resume. Subset results are journalled in partial.jsonl (keyed by plan index,
like evaluations.jsonl), so a resumed search replays them and takes the same decisions.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from statistics import NormalDist
from typing import Callable, Optional, Sequence

import numpy as np

from mergetool.core import grouping
from mergetool.core.errors import MergetoolError
from mergetool.search.front import nondominated
from mergetool.search.types import RacingSettings

PARTIAL_NAME = "partial.jsonl"


def front_bar(records: Sequence[dict]) -> Callable[[float], float]:
    """bar(C): the best subset P among the front's points of cost <= C (-inf when none is that cheap)."""
    front = nondominated(records)
    for r in front:
        if not r.get("subset"):
            raise MergetoolError(f"evaluation i={r['i']} has no racing-subset score",
                                 key="search.racing", fix="resume with the settings the search was started with")
    costs = [float(r["storage_cost"]) for r in front]  # nondominated() sorts by C
    best = np.maximum.accumulate([float(r["subset"]["performance"]) for r in front]) if front else []

    def bar(c: float) -> float:
        k = bisect_right(costs, float(c))
        return float(best[k - 1]) if k else -math.inf

    return bar


def upper_bound(subset: dict, racing: RacingSettings) -> float:
    """Subset P + z(confidence)·se + margin: how good the candidate could plausibly be."""
    z = NormalDist().inv_cdf(racing.confidence)
    return float(subset["performance"]) + z * float(subset["se"]) + racing.margin


def continues(rec: dict, bar: Callable[[float], float], racing: RacingSettings) -> bool:
    return upper_bound(rec["subset"], racing) > bar(rec["storage_cost"])


def race(run, Gs: Sequence[np.ndarray], preds: Optional[Sequence[float]], generation: int) -> list[dict]:
    """Race planned candidates i = planned, planned+1, ...: subset first, then complete the survivors
    (in plan order, up to the budget). Returns the new full records, sorted by i."""
    s, racing = run.s, run.s.racing
    bar = front_bar(run.records)
    base, run.planned = run.planned, run.planned + len(Gs)
    full, subs, todo = {}, {}, []
    for j, G in enumerate(Gs):
        i = base + j
        rec = run.replay(run.journal, i, G) or run.replay(run.partials, i, G)
        if rec is None:
            todo.append((i, G))
        elif run.journal.get(i) is not None:
            full[i] = rec
        else:
            subs[i] = rec
    pred = (lambda i: None) if preds is None else (lambda i: float(preds[i - base]))
    for i, res in run.executor.map(run.problem, todo, part="subset"):
        rec = run.record(i, Gs[i - base], res, pred(i), generation)
        subs[i] = run.partials.append(dict(rec, continued=continues(rec, bar, racing)))
    survivors = [i for i in range(base, base + len(Gs)) if i in full or continues(subs[i], bar, racing)]
    chosen = survivors[: max(0, s.evaluations - run.n)]
    todo = [(i, Gs[i - base]) for i in chosen if i not in full]
    batch = [full[i] for i in chosen if i in full]
    for rec in batch:
        run.seen(rec)
    for i, res in run.executor.map(run.problem, todo, part="full"):
        rec = run.journal.append(run.record(i, Gs[i - base], res, pred(i), generation))
        run.evaluated_now += 1
        batch.append(rec)
        run.seen(rec)
        run.report(run.n + len(batch))
    run.partial += len(Gs) - len(chosen)
    run.examples += sum(int((r.get("cache") or {}).get("examples", 0)) for r in subs.values())
    batch.sort(key=lambda r: r["i"])
    run.records.extend(batch)
    run.keys.update(grouping.key(G) for G in Gs)
    return batch
