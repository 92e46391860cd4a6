"""bf16 screening against fp32: rank agreement (Kendall τ), front changes and speed, on one set of groupings.

    python benchmarks/bf16_screening.py merge_recipes/demo-minilm-text4.yaml --configs 100

Draws --configs groupings spread over C (per component, a random partition whose number of groups is drawn
uniformly from 1..T, so every storage level is covered, not only the region near a front), scores each at
fp32 and under bf16 autocast with the same experts and caches, and reports Kendall τ of P, the largest |ΔP|,
the share of the fp32 front (over these groupings) that bf16 would change, and the wall time of each pass
with the CPU named (bf16 is fast only where the hardware has it: CUDA, or CPUs with avx512_bf16 / AMX).

With --subset, both passes score the racing subset only (the recipe's search.racing fraction and the seed), which
is what screening under racing ranks on: a quarter of the inputs, so 100 groupings fit on a CPU without bf16.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import command_line, write_block  # noqa: E402

from mergetool.core import grouping  # noqa: E402
from mergetool.pipeline.session import Session  # noqa: E402
from mergetool.recipe import load_recipe  # noqa: E402
from mergetool.search.front import nondominated  # noqa: E402
from mergetool.search.surrogate import kendall_tau  # noqa: E402

MIN_FOR_TAU = 100  # the rank agreement is reported on at least this many groupings, spread over C


def spread(T: int, L: int, n: int, seed: int) -> list[np.ndarray]:
    """n distinct canonical groupings; per component the number of groups is uniform in 1..T."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    while len(out) < n:
        G = np.zeros((T, L), dtype=np.int64)
        for l in range(L):
            k = int(rng.integers(1, T + 1))
            labels = np.concatenate([np.arange(k), rng.integers(0, k, T - k)])  # every group non-empty
            G[:, l] = rng.permutation(labels)
        G = grouping.canonical(G)
        out.setdefault(grouping.key(G), G)
    return list(out.values())


def cpu_flags() -> str:
    try:
        flags = next(x for x in open("/proc/cpuinfo") if x.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    have = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return ", ".join(have) or "none of avx2/avx512"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe", type=Path)
    ap.add_argument("--configs", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--subset", action="store_true", help="score the racing subset only (see the docstring)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    session = Session(load_recipe(args.recipe), device=args.device)
    p = session.plan
    Gs = spread(p.T, p.L, args.configs, args.seed)
    for G in Gs:  # build the experts once, outside both timings
        session.store.storage_cost(G)
    scored, seconds = {}, {}
    for precision in ("fp32", "bf16"):
        ev = session.evaluator("validation", precision=precision)
        if args.subset:
            ev.use_subset(session.recipe.search.racing.fraction, args.seed)
        score = ev.evaluate_subset if args.subset else ev.evaluate
        start = time.perf_counter()
        scored[precision] = [score(G) for G in Gs]
        seconds[precision] = time.perf_counter() - start
        ev.clear_caches()
        print(f"{precision}: {seconds[precision]:.0f} s for {len(Gs)} groupings", flush=True)
    recs = {k: [{"i": i, "grouping": G.tolist(), "performance": r.performance, "storage_cost": r.storage_cost,
                 "predicted_performance": o.performance}
                for i, (G, r, o) in enumerate(zip(Gs, scored[k], scored["bf16" if k == "fp32" else "fp32"]))]
            for k in scored}
    tau = kendall_tau(recs["bf16"])  # bf16 P as the "prediction" of fp32 P
    gap = max(abs(a.performance - b.performance) for a, b in zip(scored["fp32"], scored["bf16"]))
    front32 = {r["i"] for r in nondominated(recs["fp32"])}
    front16 = {r["i"] for r in nondominated(recs["bf16"])}
    changed = len(front32 ^ front16) / max(1, len(front32))
    costs = [r.storage_cost for r in scored["fp32"]]
    import torch

    enough = len(Gs) >= MIN_FOR_TAU
    rows = (f"the racing subset ({session.recipe.search.racing.fraction:.0%} of each task's validation inputs, "
            f"seed {args.seed})" if args.subset else "all validation inputs")
    body = "\n".join([
        f"- scored on {rows}",
        f"- {len(Gs)} groupings, C from {min(costs):.3f} to {max(costs):.3f} (T = {p.T}, L = {p.L})",
        (f"- Kendall τ (bf16 P vs fp32 P): **{tau:.3f}**; largest |ΔP| {gap:.4f}" if enough else
         f"- Kendall τ: not reported (needs ≥ {MIN_FOR_TAU} groupings; this run had {len(Gs)}: speed only); "
         f"largest |ΔP| {gap:.4f}"),
        (f"- fp32 front over these groupings: {len(front32)} points; bf16 front: {len(front16)}; changed "
         f"(symmetric difference / fp32 front): **{changed:.0%}**" if enough else "- front change: not reported"),
        f"- wall time: fp32 {seconds['fp32']:.0f} s, bf16 {seconds['bf16']:.0f} s → bf16 speed-up "
        f"**{seconds['fp32'] / seconds['bf16']:.2f}×** on this CPU (flags: {cpu_flags()}; device "
        f"{'cuda' if torch.cuda.is_available() and args.device != 'cpu' else 'cpu'})",
    ])
    print(body)
    if not args.no_write:
        write_block("bf16-screening", "bf16 screening vs fp32 (rank agreement, front, speed)", body,
                    command_line(), args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
