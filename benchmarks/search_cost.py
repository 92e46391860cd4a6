"""Evaluation cost: amortised time per configuration in a search vs the naive evaluation.

    python benchmarks/search_cost.py merge_recipes/demo-minilm-text4.yaml --evaluations 60 --naive 30

1. Runs a search (all caches on) in a scratch run directory and takes its wall time per evaluation.
2. Replays the journal's configurations, in order, on fresh evaluators with caches switched on one at a
   time (experts; + score memo; + prefix activations), to attribute the savings to each cache.
3. Times the naive evaluation (every expert merged, a full forward for every task, no cache) on
   `--naive` configurations drawn evenly from the same journal, on the same pre-tokenised data.
Prints the ratios and writes its block into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import command_line, write_block  # noqa: E402

from mergetool.pipeline.session import MergeProblem, Session, settings_for  # noqa: E402
from mergetool.recipe import parse_recipe  # noqa: E402
from mergetool.search import run_search  # noqa: E402


def timed_replay(session: Session, groupings: list, **flags) -> float:
    """Seconds to evaluate `groupings` in order on a fresh evaluator (data prepared beforehand)."""
    from mergetool.evaluation.engine import Evaluator
    from mergetool.merge.experts import ExpertStore

    store = ExpertStore(session.recipe, session.plan, session.base, session.tasks)
    ev = Evaluator(store, device=session.device, **flags)
    start = time.perf_counter()
    for G in groupings:
        ev.evaluate(np.asarray(G))
    return time.perf_counter() - start


def prefix_bound(groupings: list, stages: list) -> float:
    """Mean share of the cacheable stages (all but the head) that a task's chain shares with the
    longest matching prefix of any earlier configuration: what an unbounded prefix cache could skip."""
    from mergetool.core.grouping import members

    Gs = [np.asarray(G) for G in groupings]
    cacheable = stages[:-1]
    shares = []
    for i, G in enumerate(Gs):
        for t in range(G.shape[0]):
            best = 0
            for H in Gs[:i]:
                n = 0
                for comps in cacheable:
                    if any(members(G, t, l) != members(H, t, l) for l in comps):
                        break
                    n += 1
                best = max(best, n)
            shares.append(best / len(cacheable))
    return float(np.mean(shares)) if shares else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe", type=Path)
    ap.add_argument("--evaluations", type=int, default=60)
    ap.add_argument("--naive", type=int, default=30, help="configurations timed without any cache")
    ap.add_argument("--limit", type=int, default=200, help="validation examples per task (≤ 200 on CPU)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args()

    data = yaml.safe_load(args.recipe.read_text())
    scratch = Path(tempfile.mkdtemp(prefix="mergetool-bench-"))
    data["output"] = str(scratch / "run")
    data.setdefault("search", {}).update({"evaluations": args.evaluations, "seed": args.seed})
    for task in data["tasks"].values():
        task["validation"]["limit"] = min(args.limit, task["validation"].get("limit") or args.limit)
    recipe = parse_recipe(yaml.safe_dump(data, sort_keys=False), args.recipe.resolve())
    session = Session(recipe, device=args.device)
    p = session.plan
    print(f"T={p.T} L={p.L} d={p.d:,}; validation examples: "
          f"{[len(d.labels) for d in session.evaluator().data]}", flush=True)

    journal = scratch / "run" / "search" / "evaluations.jsonl"
    journal.parent.mkdir(parents=True)
    start = time.perf_counter()
    result = run_search(MergeProblem(session), settings_for(recipe), journal)
    search_s = time.perf_counter() - start
    groupings = [r["grouping"] for r in sorted(result.records, key=lambda r: r["i"])]
    amortised = search_s / len(groupings)
    print(f"search: {len(groupings)} evaluations in {search_s:.1f} s → {amortised:.2f} s per configuration",
          flush=True)

    session.evaluator().clear_caches()  # the replays below build their own; give the memory back
    picks = [groupings[i] for i in np.linspace(0, len(groupings) - 1, min(args.naive, len(groupings))).astype(int)]
    naive_s = timed_replay(session, picks, caches=False) / len(picks)
    print(f"naive: {naive_s:.2f} s per configuration (over {len(picks)})", flush=True)
    replay = {
        "experts": timed_replay(session, groupings, caches=False, experts=True),
        "experts+memo": timed_replay(session, groupings, caches=False, experts=True, memo=True),
        "all": timed_replay(session, groupings),
    }
    ev = session.evaluator()
    stages = ev._model(0).stages
    bound = prefix_bound(groupings, stages) if stages else None
    naive_total = naive_s * len(groupings)
    saved = max(naive_total - replay["all"], 1e-9)
    shares = {
        "expert cache": (naive_total - replay["experts"]) / saved,
        "score memo": (replay["experts"] - replay["experts+memo"]) / saved,
        "prefix activations": (replay["experts+memo"] - replay["all"]) / saved,
    }
    ratio = amortised / naive_s
    rows = [
        "| measure | value |", "|---|---|",
        f"| task models / components | T = {p.T}, L = {p.L}, d = {p.d:,} |",
        f"| validation examples per task | {[len(d.labels) for d in session.evaluator().data]} |",
        f"| search: evaluations, wall time | {len(groupings)}, {search_s:.1f} s |",
        f"| amortised time per configuration (whole search, surrogate included) | {amortised:.2f} s |",
        f"| naive time per configuration ({len(picks)} from the journal, no cache) | {naive_s:.2f} s |",
        f"| **ratio amortised / naive** | **{ratio:.3f}×** (goal ≤ 0.25×, stretch ≤ 0.1×) |",
        f"| replay with expert cache only | {replay['experts'] / len(groupings):.2f} s per configuration |",
        f"| replay with expert cache + score memo | {replay['experts+memo'] / len(groupings):.2f} s |",
        f"| replay with all three caches | {replay['all'] / len(groupings):.2f} s |",
        f"| ratio replay with all caches / naive (the same evaluations, back to back: load-fair) | "
        f"{replay['all'] / len(groupings) / naive_s:.3f}× |",
    ] + [f"| share of the savings: {k} | {v:.1%} |" for k, v in shares.items()] + ([
        f"| stages a task's chain shares with any earlier configuration (unbounded-cache bound) | {bound:.1%} |"]
        if bound is not None else [])
    body = "\n".join(rows)
    print(body)
    print(json.dumps({"ratio": ratio, "shares": shares}))
    if not args.no_write:
        write_block("search-cost", "Evaluation cost per configuration (search vs naive)", body, command_line(),
                    [args.seed])
    return 0


if __name__ == "__main__":
    sys.exit(main())
