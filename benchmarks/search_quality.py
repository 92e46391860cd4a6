"""Search quality: hypervolume against real evaluations, surrogate vs none and K-means vs random init.

    python benchmarks/search_quality.py                       # trained toy zoo, T=4, 3 seeds, 120 evaluations
    python benchmarks/search_quality.py --recipe merge_recipes/demo-minilm-text4.yaml --seeds 0 --evaluations 60

Every configuration runs the real search (run_search) on the same problem. Evaluations are
deterministic, so one memo of P and C per grouping is shared by all runs: it saves wall time and
changes no number. Reports, per configuration, the mean HV at fixed budgets and the evaluations
the surrogate run needs to reach the no-surrogate run's final HV (goal ≤ 50 % of the budget).
HV reference point: (P = 0, C = T + 1), the search's own default.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import command_line, write_block  # noqa: E402

from mergetool.core import grouping  # noqa: E402
from mergetool.pipeline.session import MergeProblem, Session  # noqa: E402
from mergetool.recipe import load_recipe, parse_recipe  # noqa: E402
from mergetool.search import SearchSettings, run_search  # noqa: E402

CONFIGS = {  # name: (surrogate, init)
    "surrogate + K-means (MERGE)": ("random_forest", "kmeans"),
    "no surrogate + K-means": ("none", "kmeans"),
    "surrogate + random init": ("random_forest", "random"),
    "no surrogate + random init": ("none", "random"),
}


class SharedMemo:
    """The problem with P and C memoised by canonical grouping, shared across search runs."""

    def __init__(self, problem: MergeProblem):
        self.problem, self.T, self.L = problem, problem.T, problem.L
        self.results: dict[str, object] = {}
        self.costs: dict[str, float] = {}
        self.real = 0

    def evaluate(self, G):
        k = grouping.key(G)
        if k not in self.results:
            self.real += 1
            self.results[k] = self.problem.evaluate(G)
        return self.results[k]

    def storage_cost(self, G) -> float:
        k = grouping.key(G)
        if k not in self.costs:
            self.costs[k] = self.problem.storage_cost(G)
        return self.costs[k]

    def task_vectors(self, *args, **kwargs):
        return self.problem.task_vectors(*args, **kwargs)


def evals_to_reach(curve: list, target: float) -> int | None:
    for n, hv in curve:
        if hv >= target - 1e-12:
            return int(n)
    return None


def toy_recipe(workdir: Path):
    from mergetool.testing.toy import make_trained_zoo, trained_recipe

    zoo = make_trained_zoo(workdir / "zoo", n_tasks=4, classes=(2, 3, 4, 2), layers=4)
    text = trained_recipe(zoo) + f"output: {workdir / 'run'}\n"
    return parse_recipe(text, workdir / "recipe.yaml")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", type=Path, default=None, help="default: a trained toy zoo (T=4, 4 layers)")
    ap.add_argument("--evaluations", type=int, default=120)
    ap.add_argument("--population", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="mergetool-quality-"))
    recipe = load_recipe(args.recipe) if args.recipe else toy_recipe(workdir)
    memo = SharedMemo(MergeProblem(Session(recipe, device=args.device)))
    print(f"T={memo.T} L={memo.L}; {len(args.seeds)} seeds x {len(CONFIGS)} configurations x "
          f"{args.evaluations} evaluations", flush=True)
    curves: dict[str, list] = {name: [] for name in CONFIGS}
    for seed in args.seeds:
        for name, (surrogate, init) in CONFIGS.items():
            s = SearchSettings(population=args.population, evaluations=args.evaluations, surrogate=surrogate,
                               init=init, seed=seed, write_artifacts=False)
            res = run_search(memo, s, workdir / f"{seed}-{surrogate}-{init}" / "evaluations.jsonl")
            curves[name].append(res.hv_curve)
            print(f"seed {seed} {name}: HV {res.hv:.4f} after {res.evaluations} evaluations, "
                  f"{res.screened} screened", flush=True)

    budgets = sorted({max(args.population, args.evaluations // 4), args.evaluations // 2, args.evaluations})

    def hv_at(curve: list, n: int) -> float:
        return max((hv for m, hv in curve if m <= n), default=0.0)

    rows = ["| configuration | " + " | ".join(f"HV at {b}" for b in budgets) + " |",
            "|---|" + "---|" * len(budgets)]
    for name, cs in curves.items():
        cells = [f"{np.mean([hv_at(c, b) for c in cs]):.4f} ± {np.std([hv_at(c, b) for c in cs]):.4f}"
                 for b in budgets]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")

    def reach(fast: str, slow: str) -> tuple[list, str]:
        needed = []
        for cf, cs in zip(curves[fast], curves[slow]):
            n = evals_to_reach(cf, cs[-1][1])
            needed.append(n)
        ok = [n for n in needed if n is not None]
        frac = f"{np.mean(ok) / args.evaluations:.0%}" if len(ok) == len(needed) else "not reached in every seed"
        return needed, frac

    sur, sur_frac = reach("surrogate + K-means (MERGE)", "no surrogate + K-means")
    km, km_frac = reach("surrogate + K-means (MERGE)", "surrogate + random init")
    body = "\n".join(rows + [
        "",
        f"- evaluations the surrogate run needs to reach the no-surrogate run's final HV, per seed: {sur} "
        f"of {args.evaluations} → mean **{sur_frac}** of the budget (goal ≤ 50%)",
        f"- evaluations K-means init needs to reach random init's final HV (both with surrogate), per seed: "
        f"{km} → mean {km_frac}",
        f"- problem: T = {memo.T}, L = {memo.L}; {memo.real} distinct groupings evaluated for real in all "
        f"(one memo shared by every run; evaluations are deterministic)",
        "- HV reference point (P = 0, C = T + 1); HV at n = the best HV after n real evaluations",
    ])
    print(body)
    if not args.no_write:
        write_block("search-quality", "Search quality: hypervolume vs evaluations", body, command_line(),
                    args.seeds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
