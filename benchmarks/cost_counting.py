"""Screening cost: exact C counted from Q's decision vs C from built experts, on the same groupings.

    python benchmarks/cost_counting.py merge_recipes/demo-minilm-text4.yaml --groupings 80

A surrogate generation screens 4 × population candidates and needs each one's exact C. Two fresh stores
price the same --groupings random groupings (per component, the number of groups is uniform in 1..T):
one counts (merge/cost.counted_bits: a singleton is read, a shared group merged once, nothing quantised or
held), the other builds every expert (merge, quantise, hold: the --build-for-cost ablation). Reports both
wall times and peak experts held, and checks that every C is equal.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import command_line, write_block  # noqa: E402
from bf16_screening import spread  # noqa: E402

from mergetool.merge.experts import ExpertStore  # noqa: E402
from mergetool.pipeline.session import Session  # noqa: E402
from mergetool.recipe import load_recipe  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe", type=Path)
    ap.add_argument("--groupings", type=int, default=80)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    s = Session(load_recipe(args.recipe), device="cpu")
    Gs = spread(s.plan.T, s.plan.L, args.groupings, args.seed)
    out = {}
    for mode in ("counted", "built"):
        store = ExpertStore(s.recipe, s.plan, s.base, s.tasks)
        store.count_cost = mode == "counted"
        start = time.perf_counter()
        costs = [store.storage_cost(G) for G in Gs]
        out[mode] = (time.perf_counter() - start, costs, store.stats())
        print(f"{mode}: {out[mode][0]:.1f} s, {out[mode][2]}", flush=True)
    equal = out["counted"][1] == out["built"][1]
    body = "\n".join([
        f"- {len(Gs)} groupings (T = {s.plan.T}, L = {s.plan.L}), C from {min(out['built'][1]):.3f} to "
        f"{max(out['built'][1]):.3f}; every C equal: **{equal}**",
        f"- counted: **{out['counted'][0]:.1f} s** ({out['counted'][2]['experts_counted']} groups priced, "
        f"{out['counted'][2]['experts_cached']} experts held)",
        f"- built: **{out['built'][0]:.1f} s** ({out['built'][2]['expert_misses']} experts built, "
        f"{out['built'][2]['experts_cached']} held at the end in the LRU)",
        f"- speed-up {out['built'][0] / out['counted'][0]:.1f}×",
    ])
    print(body)
    if not args.no_write:
        write_block("cost-counting", "Screening cost: exact C counted vs built", body, command_line(), args.seed)
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
