"""Racing in the search: score a generation's candidates on the fixed validation subset, complete only
those whose upper confidence bound could beat the front at their exact C.

The decision for a candidate depends only on its own subset result and on the front that stood at the
start of the generation (its points' subset scores come with their full records), never on evaluation
order, the executor or a resume. Candidate and front point are compared on the same rows: for accuracy
the difference's error is paired row by row, which separates two related models with far fewer rows
than two independent intervals would. Subset results are journalled in partial.jsonl (keyed by plan index,
like evaluations.jsonl), so a resumed search replays them and takes the same decisions.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Optional, Sequence

import numpy as np

from mergetool.core.errors import MergetoolError
from mergetool.search.front import nondominated
from mergetool.search.types import RacingSettings

PARTIAL_NAME = "partial.jsonl"


def front_points(records: Sequence[dict]) -> list[dict]:
    """The front of the full records (cheapest first), each carrying its racing-subset scores."""
    front = nondominated(records)
    for r in front:
        if not r.get("subset"):
            raise MergetoolError(f"evaluation i={r['i']} has no racing-subset score",
                                 key="search.racing", fix="resume with the settings the search was started with")
    return front


def difference_se(a: dict, b: dict) -> float:
    """Standard error of P_a − P_b on the same subset. Paired, row by row, for the tasks whose rows
    both carry (accuracy: most rows score alike in two related models, so this is far tighter than
    two separate errors); sqrt(se_a² + se_b²) per task otherwise; from the overall errors when the
    subsets give no per-task ones."""
    if not (a.get("per_task_se") and b.get("per_task_se")):
        return math.hypot(float(a["se"]), float(b["se"]))
    var = 0.0
    for t, se_a in a["per_task_se"].items():
        x, y = (a.get("items") or {}).get(t), (b.get("items") or {}).get(t)
        if x is not None and y is not None and len(x) == len(y) and len(x) > 1:
            d = np.asarray(x, dtype=float) - np.asarray(y, dtype=float)
            var += float(np.var(d, ddof=1)) / len(d)
        else:
            var += float(se_a) ** 2 + float(b["per_task_se"][t]) ** 2
    return math.sqrt(var) / len(a["per_task_se"])


def could_beat(mine: dict, theirs: dict, racing: RacingSettings) -> bool:
    """On the same subset: is the upper bound of P_mine − P_theirs (z(confidence)·se of the difference,
    plus margin) above 0?"""
    gap = float(mine["performance"]) - float(theirs["performance"])
    return gap + NormalDist().inv_cdf(racing.confidence) * difference_se(mine, theirs) + racing.margin > 0


def continues(rec: dict, front: Sequence[dict], racing: RacingSettings) -> bool:
    """True unless a front point of C <= the candidate's beats it with confidence on the subset: the
    candidate continues only if it could beat every such point."""
    cheaper = [f for f in front if float(f["storage_cost"]) <= float(rec["storage_cost"])]
    return all(could_beat(rec["subset"], f["subset"], racing) for f in cheaper)


def race(run, Gs: Sequence[np.ndarray], preds: Optional[Sequence[float]], generation: int) -> list[dict]:
    """Race planned candidates i = planned, planned+1, ...: subset first, then complete the survivors
    (in plan order, up to the budget). Returns the new full records, sorted by i."""
    s, racing = run.s, run.s.racing
    front = front_points(run.records)
    base, run.planned = run.planned, run.planned + len(Gs)
    full, subs, todo = {}, {}, []
    for j, G in enumerate(Gs):
        i = base + j
        done = run.replay(run.journal, i, G)
        if done is not None:
            full[i] = done
        elif (raced := run.replay(run.partials, i, G)) is not None:
            subs[i] = raced
        else:
            todo.append((i, G))
    pred = (lambda i: None) if preds is None else (lambda i: float(preds[i - base]))
    for i, res in run.executor.map(run.problem, todo, part="subset"):
        rec = run.record(i, Gs[i - base], res, pred(i), generation)
        subs[i] = run.partials.append(dict(rec, continued=continues(rec, front, racing)))
    survivors = [i for i in range(base, base + len(Gs)) if i in full or continues(subs[i], front, racing)]
    chosen = survivors[: max(0, s.evaluations - run.n)]
    todo = [(i, Gs[i - base]) for i in chosen if i not in full]
    batch = [full[i] for i in chosen if i in full]
    run.replayed += len(batch)
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
    run.keys.update(run.space.key(G) for G in Gs)
    return batch
