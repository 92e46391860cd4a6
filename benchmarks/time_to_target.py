"""Search speed as users wait for it: wall time until the front reaches 95 % of a reference front's HV.

    # once: the reference front, from long runs (committed as benchmarks/reference_front_<recipe>.json);
    # seeds may be run in separate sittings (each is added to the file; a killed one resumes from --workdir)
    python benchmarks/time_to_target.py merge_recipes/demo-minilm-text4.yaml --make-reference \
        --evaluations 300 --seeds 0 1 --workdir runs/ttt-reference
    # the comparison, one configuration after another (never concurrently), 2 seeds, every configuration with
    # (i)'s cap of 150 full evaluations; the HV point is the best static merge of the Table I baselines (RegMean)
    python benchmarks/time_to_target.py merge_recipes/demo-minilm-text4.yaml --seeds 0 1 --evaluations 150 \
        --workdir runs/ttt --baselines runs/table1-codecs/baselines-pass5.json
    # or a configuration and seed at a time, in separate sittings: each finished run is kept as
    # WORKDIR/<seed>-<config>/result.json and read back, so a last call with every configuration writes the block
    python benchmarks/time_to_target.py merge_recipes/demo-minilm-text4.yaml --seeds 0 --evaluations 150 \
        --workdir runs/ttt --configs '(i)' --no-write
    # a configuration too slow here to run whole (bf16 emulated on a CPU without avx512_bf16): stopped at the
    # goal's limit, 0.2 × (i)'s wall for that seed, and kept as a stopped run
    python benchmarks/time_to_target.py merge_recipes/demo-minilm-text4.yaml --seeds 0 --evaluations 150 \
        --workdir runs/ttt --configs '(iv)' --deadline 465 --no-write
    # the block from what is kept so far, running nothing (a configuration and seed not yet run is marked so)
    python benchmarks/time_to_target.py merge_recipes/demo-minilm-text4.yaml --seeds 0 1 --evaluations 150 \
        --workdir runs/ttt --baselines runs/table1-codecs/baselines-pass5.json --kept-only

Configurations: (i) plain NSGA-II (no surrogate, no caches, no racing, capped at --plain-cap full
evaluations); (ii) the default before racing (surrogate + caches); (iii) with racing; (iv) racing + bf16.
HV is computed against the point (P = the best static merge's validation P, C = T), so only the region that
beats a static merge counts; the target is --share × the reference front's HV under that point. Each run
records the wall time of every full evaluation (a fresh session per run: nothing is shared between runs),
and the time to target is the first moment its front's HV reaches the target. A bf16 run's curve uses its
screening scores; its final HV ratio is after the fp32 re-scoring of its front. A second table times each
configuration to the HV that (i)'s whole run ended with, a yardstick that holds when the target is out of reach.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import command_line, write_block  # noqa: E402

from mergetool.core.errors import MergetoolError  # noqa: E402
from mergetool.pipeline.rundir import read_json_record, write_json_atomic  # noqa: E402
from mergetool.pipeline.session import MergeProblem, Session, best_merging_baseline, references  # noqa: E402
from mergetool.recipe import load_recipe  # noqa: E402
from mergetool.search import SearchSettings, run_search  # noqa: E402
from mergetool.search.front import hypervolume, nondominated  # noqa: E402
from mergetool.search.journal import read_journal  # noqa: E402
from mergetool.search.racing import PARTIAL_NAME  # noqa: E402
from mergetool.search.types import RacingSettings  # noqa: E402

PLAIN = "(i) plain NSGA-II"
CONFIGS = {  # name: (surrogate, caches, racing, precision)
    PLAIN: ("none", False, False, "fp32"),
    "(ii) surrogate + caches (default before racing)": ("random_forest", True, False, "fp32"),
    "(iii) + racing": ("random_forest", True, True, "fp32"),
    "(iv) + racing + bf16": ("random_forest", True, True, "bf16"),
}

class DeadlineReached(Exception):
    """The run's wall clock passed --deadline: the search stops before its next evaluation."""


class Clocked:
    """The problem, with the wall time (from the run's start) at which each full evaluation finished; past
    `deadline` seconds it refuses the next evaluation, full or on the racing subset."""

    def __init__(self, problem: MergeProblem, deadline: Optional[float] = None):
        self.problem, self.T, self.L, self.deadline = problem, problem.T, problem.L, deadline
        self.t0 = time.perf_counter()
        self.finished: list[float] = []

    def _check_deadline(self) -> None:
        if self.deadline is not None and time.perf_counter() - self.t0 > self.deadline:
            raise DeadlineReached

    def evaluate(self, G):
        self._check_deadline()
        res = self.problem.evaluate(G)
        self.finished.append(time.perf_counter() - self.t0)
        return res

    def __getattr__(self, name):  # storage_cost, task_vectors, racing and precision hooks
        attr = getattr(self.problem, name)
        if name != "evaluate_subset":
            return attr

        def evaluate_subset(G):
            self._check_deadline()
            return attr(G)
        return evaluate_subset


def static_p(best: Optional[dict], baselines_path: Path, run_dir: Path, session: Session) -> tuple[float, str]:
    """(validation P, what it is) of the best static merge: `best`, the tuned best of a `mergetool baselines`
    result (same zoo and validation inputs), when there is one, else the recipe's own merge (all shared, fp32)
    from the search's reference.json."""
    if best is not None:
        return best["validation"]["performance"], f"{best['name']}, the best static merge in {baselines_path}"
    p = references(session, run_dir / "search")["static_merge"]["validation"]["performance"]
    return p, f"the recipe's own merge: no baselines at {baselines_path}"


def best_static(path: Path) -> Optional[dict]:
    """The tuned static merge with the best validation P in a `mergetool baselines` result, None if none."""
    return best_merging_baseline(read_json_record(path), kinds=("static",))


def explicit_baselines(ap: argparse.ArgumentParser, path: Path) -> dict:
    """best_static of the file named by --baselines; exit 2 with one line when it has none or cannot be read."""
    try:
        best = best_static(path)
    except MergetoolError as e:
        ap.error(f"--baselines: {e} ({e.fix})")
    if best is None:
        ap.error(f"--baselines: {path} holds no static merge with a validation P (fix: pass the baselines.json "
                 "that `mergetool baselines` wrote for this zoo)")
    return best


def run_dir(workdir: Path, name: str, seed: int) -> Path:
    """WORKDIR/<seed>-<numeral>, e.g. runs/ttt/0-iv for "(iv) + racing + bf16", seed 0."""
    return workdir / f"{seed}-{name.split()[0].strip('()')}"


def run_one(recipe, name: str, seed: int, evaluations: int, workdir: Path, device: str,
            deadline: Optional[float] = None) -> dict:
    surrogate, caches, racing, precision = CONFIGS[name]
    clocked = Clocked(MergeProblem(Session(recipe, device=device), caches=caches), deadline)
    s = SearchSettings(population=recipe.search.population, evaluations=evaluations, surrogate=surrogate,
                       init=recipe.search.init, seed=seed, write_artifacts=False, precision=precision,
                       racing=RacingSettings() if racing else None)
    journal = run_dir(workdir, name, seed) / "evaluations.jsonl"
    try:
        res = run_search(clocked, s, journal)
    except DeadlineReached:
        return stopped_run(journal, clocked)
    return {"records": res.records, "times": clocked.finished, "front": res.front,
            "wall": time.perf_counter() - clocked.t0, "full": res.evaluations, "partial": res.partial,
            "examples": res.examples}


def stopped_run(journal: Path, clocked: Clocked) -> dict:
    """A run stopped at its deadline, from its journals: the full evaluations so far (with a bf16 run, their
    screening scores: there is no fp32 re-scoring), the candidates scored on the racing subset only, and the
    validation inputs both ran."""
    full, subset = read_journal(journal), read_journal(journal.with_name(PARTIAL_NAME))
    done = {r["i"] for r in full}
    return {"records": full, "times": clocked.finished, "front": nondominated(full),
            "wall": time.perf_counter() - clocked.t0, "full": len(full),
            "partial": sum(1 for r in subset if r["i"] not in done),
            "examples": sum(int((r.get("cache") or {}).get("examples", 0)) for r in full + subset),
            "deadline": clocked.deadline}


def timed_run(recipe, name: str, seed: int, evaluations: int, workdir: Path, device: str,
              deadline: Optional[float] = None) -> dict:
    """run_one, kept as result.json in its folder so the comparison can be run one configuration at a time over
    several sittings. A run killed before its result was written starts again from nothing: its clock would
    not cover the evaluations its journal already holds. A run stopped at a deadline is kept as such."""
    folder = run_dir(workdir, name, seed)
    done = folder / "result.json"
    run = kept_run(workdir, name, seed, evaluations, deadline)
    if run:
        print(f"{name}, seed {seed}: measured earlier ({done})", flush=True)
        return run
    shutil.rmtree(folder, ignore_errors=True)
    run = run_one(recipe, name, seed, evaluations, workdir, device, deadline)
    run.update(evaluations=evaluations, records=[point(r, "i") for r in run["records"]],
               front=[point(f, "grouping") for f in run["front"]])  # what time_to reads, in plain JSON
    write_json_atomic(done, run)
    return run


ANY_DEADLINE = "any"


def kept_run(workdir: Path, name: str, seed: int, evaluations: int, deadline=None) -> Optional[dict]:
    """The run kept for this configuration, seed and budget, None when there is none: a finished one, or one
    stopped at `deadline` seconds (ANY_DEADLINE: at whatever deadline it was given)."""
    run = read_json_record(run_dir(workdir, name, seed) / "result.json")
    if not run or run.get("evaluations") != evaluations:
        return None
    stopped = run.get("deadline")
    return run if stopped is None or deadline in (ANY_DEADLINE, stopped) else None


def point(record: dict, key: str) -> dict:
    return {k: record[k] for k in (key, "performance", "storage_cost")}


def time_to(run: dict, hv_point: tuple[float, float], target: float):
    """(seconds until the front's HV first reaches target or None, final HV)."""
    done: list[dict] = []
    order = sorted(run["records"], key=lambda r: r["i"])  # completion order = plan order locally
    hit = None
    for rec, t in zip(order, run["times"]):
        done.append(rec)
        if hit is None and hypervolume(done, hv_point) >= target:
            hit = t
    final = hypervolume([{"performance": f["performance"], "storage_cost": f["storage_cost"]}
                         for f in run["front"]], hv_point)
    return hit, final


def make_reference(args, recipe, workdir: Path) -> int:
    """The reference front: the union of the fronts of long runs (racing, the recipe's settings), one seed
    after another. The file is rewritten after every seed, and seeds already in it are kept, so the seeds can
    be run in separate sittings (a killed seed resumes from its journal under --workdir)."""
    old = json.loads(args.reference.read_text()) if args.reference.is_file() else {}
    if old and (old.get("recipe") != recipe.name or old.get("evaluations") != args.evaluations):
        sys.exit(f"error: {args.reference} is for another recipe or budget (fix: --reference NEW.json)")
    points, seeds, commands = list(old.get("points", [])), list(old.get("seeds", [])), list(old.get("commands", []))
    for seed in [s for s in args.seeds if s not in seeds]:
        run = run_one(recipe, "(iii) + racing", seed, args.evaluations, workdir, args.device)
        points += [dict(seed=seed, **point(f, "grouping")) for f in run["front"]]
        seeds.append(seed)
        commands.append(command_line())
        front = nondominated([dict(p, i=k) for k, p in enumerate(points)])
        write_json_atomic(args.reference, {"recipe": recipe.name, "commands": commands, "seeds": seeds,
                                           "evaluations": args.evaluations, "points": points,
                                           "front": [point(f, "grouping") for f in front]})
        print(f"seed {seed}: {run['full']} full + {run['partial']} partial evaluations, {run['wall']:.0f} s; "
              f"wrote {args.reference}: {len(front)} points from seeds {seeds}", flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe", type=Path)
    ap.add_argument("--reference", type=Path, default=None, help="default: benchmarks/reference_front_<name>.json")
    ap.add_argument("--make-reference", action="store_true")
    ap.add_argument("--evaluations", type=int, default=None, help="full evaluations (default: the recipe's)")
    ap.add_argument("--plain-cap", type=int, default=150, help="full evaluations of configuration (i)")
    ap.add_argument("--share", type=float, default=0.95)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names (a prefix is enough)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="journals, and finished runs' results that a later call reads back (default: a fresh temp "
                    "folder); with --make-reference a killed seed resumes from it")
    ap.add_argument("--baselines", type=Path, default=None,
                    help="a `mergetool baselines` result on the same zoo and validation inputs, whose best static "
                    "merge sets the HV point (default: the recipe output's baselines/baselines.json)")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--deadline", type=float, default=None,
                    help="stop each run it starts once its wall clock passes this many seconds (a configuration "
                    "too slow on this machine to run whole is still timed against the goal's 0.2 × (i))")
    ap.add_argument("--kept-only", action="store_true",
                    help="tabulate the runs kept under --workdir and run nothing; a missing one is marked not run")
    args = ap.parse_args()
    if args.deadline is not None and not args.deadline > 0:
        ap.error(f"--deadline must be a positive number of seconds, got {args.deadline:g} (fix: e.g. --deadline 465)")
    if args.kept_only and args.workdir is None:
        ap.error("--kept-only reads the runs kept under --workdir (fix: add --workdir runs/ttt)")
    best = explicit_baselines(ap, args.baselines) if args.baselines else None  # refused before anything is written
    recipe = load_recipe(args.recipe)
    args.reference = args.reference or Path(__file__).parent / f"reference_front_{recipe.name}.json"
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mergetool-ttt-"))
    evaluations = args.evaluations or recipe.search.evaluations
    if args.make_reference:
        args.evaluations = evaluations
        return make_reference(args, recipe, workdir)
    ref = json.loads(args.reference.read_text())
    baselines = args.baselines or Path(recipe.output) / "baselines" / "baselines.json"
    best = best or best_static(baselines)
    session = Session(recipe, device=args.device)
    static, static_name = static_p(best, baselines, Path(recipe.output), session)
    hv_point = (static, float(session.plan.T))
    del session
    target = args.share * hypervolume(ref["front"], hv_point)
    names = [n for n in CONFIGS if any(n.startswith(c.strip()) for c in args.configs.split(","))]
    rows, hits, runs = tabulate(args, recipe, names, evaluations, workdir, hv_point, target)
    rows += plain_parity(runs, hv_point, target / args.share)
    body = "\n".join(rows + ["", _goal(hits), f"- HV point: P = {hv_point[0]:.4f} (validation; {static_name}), "
                             f"C = T = {hv_point[1]:g}; target = {args.share:g} × the reference front's HV "
                             f"({args.reference.name}: {'; '.join(ref['commands'])})"])
    print(body)
    if not args.no_write:
        write_block("time-to-target", "Search speed: wall time to 95 % of the reference front's HV", body,
                    command_line(), args.seeds)
    return 0


def tabulate(args, recipe, names: list[str], evaluations: int, workdir: Path, hv_point, target: float):
    """(table rows, {configuration: {seed: (time to target or None, wall)}}), running each configuration and
    seed not yet kept under workdir; with --kept-only nothing is run and a missing one is a "not run" row."""
    rows = ["| configuration | seed | time to target (s) | final HV / reference | full | partial | inputs run | "
            "wall (s) |", "|---|---|---|---|---|---|---|---|"]
    hits: dict[str, dict[int, tuple]] = {}
    runs: dict[tuple[str, int], dict] = {}
    for name in names:
        for seed in args.seeds:
            budget = min(args.plain_cap, evaluations) if name == PLAIN else evaluations
            kept = kept_run(workdir, name, seed, budget, ANY_DEADLINE) if args.kept_only else None
            if args.kept_only and kept is None:
                rows.append(f"| {name} | {seed} | not run | | | | | |")
                continue
            run = runs[name, seed] = kept or timed_run(recipe, name, seed, budget, workdir, args.device,
                                                       args.deadline)
            hit, final = time_to(run, hv_point, target)
            hits.setdefault(name, {})[seed] = (hit, run["wall"])
            missed = "not reached" + (f" (stopped at its {run['deadline']:g} s deadline)" if run.get("deadline")
                                      else "")
            rows.append(f"| {name} | {seed} | {missed if hit is None else f'{hit:.0f}'} | "
                        f"{final / (target / args.share):.3f} | {run['full']} | {run['partial']} | "
                        f"{run['examples']} | {run['wall']:.0f} |")
            print(rows[-1], flush=True)
    return rows, hits, runs


def plain_parity(runs: dict, hv_point, reference_hv: float) -> list[str]:
    """A second yardstick, for when the target is out of reach: per seed, each configuration's wall time until
    its front's HV first equals the HV that (i)'s whole run ended with (and its ratio to (i)'s own time)."""
    names = list(dict.fromkeys(name for name, _ in runs))
    seeds = sorted(seed for name, seed in runs if name == PLAIN)
    if not seeds:
        return []
    lines = ["", "Time to the HV that (i) ended with (s; in brackets, over (i)'s own time):", "",
             "| seed | (i)'s final HV / reference | " + " | ".join(n.split()[0] for n in names) + " |",
             "|---|---|" + "---|" * len(names)]
    for seed in seeds:
        ended = time_to(runs[PLAIN, seed], hv_point, float("inf"))[1]
        level = ended * (1 - 1e-9)  # the same HV summed in another order may differ in its last bits
        own = time_to(runs[PLAIN, seed], hv_point, level)[0]
        cells = []
        for name in names:
            hit = time_to(runs[name, seed], hv_point, level)[0] if (name, seed) in runs else None
            cells.append("not run" if (name, seed) not in runs else "not reached" if hit is None
                         else f"{hit:.0f} ({hit / own:.2f})")
        lines.append(f"| {seed} | {ended / reference_hv:.3f} | " + " | ".join(cells) + " |")
    return lines


def _goal(hits: dict) -> str:
    """(iv) / (i) per seed that both ran: time to target, or (iv)'s time over (i)'s whole run when (i) never
    reaches it."""
    plain, best = hits.get(PLAIN, {}), hits.get("(iv) + racing + bf16", {})
    seeds = sorted(set(plain) & set(best))
    if not seeds:
        return "- goal (iv) / (i) ≤ 0.2: not measured (both configurations are needed, on the same seed)"
    if any(best[s][0] is None for s in seeds):
        return "- goal (iv) / (i) ≤ 0.2: **missed**: (iv) did not reach the target in every seed"
    ratios = [best[s][0] / (plain[s][0] if plain[s][0] is not None else plain[s][1]) for s in seeds]
    mean = sum(ratios) / len(ratios)
    return (f"- goal (iv) / (i) ≤ 0.2: ratio for seeds {seeds}: {[round(r, 3) for r in ratios]}, mean {mean:.3f} "
            f"→ **{'met' if mean <= 0.2 else 'missed'}** (where (i) never reached the target, its whole run time "
            "is used)")


if __name__ == "__main__":
    sys.exit(main())
