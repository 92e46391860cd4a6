"""The paper's Table I on the demo zoo: baselines, MERGE G1/G2/G3 over seeds, routed test accuracy.

    python benchmarks/table1.py merge_recipes/demo-minilm-text4.yaml --seeds 0 1 2 --evaluations 300
    python benchmarks/table1.py merge_recipes/demo-minilm-text4.yaml --run runs/demo-minilm-text4 --seeds 0 1 2
        (finished runs are tabulated as they are; the other seeds are searched; baselines from the first run)
    python benchmarks/table1.py merge_recipes/demo-minilm-text4.yaml --methods wa,ta,ties,bc --seeds 0 1 \
        --evaluations 150 --workdir runs/table1-variants --baselines-from runs/table1-codecs/seed-0/baselines/baselines.json
        (MERGE-WA/TA/TM/BC: one search per intra-group method at its paper's settings, in WORKDIR/<variant>/seed-N;
        each variant's G1 is judged against its own all-shared merge, G2 against the best merging baseline)

For every seed: `mergetool search` (own run directory), then the baselines (run once, on the first
seed's run directory, copied to the others: they do not depend on the search seed; routed ones at an fp32
base and at the recipe's `base_storage`, MERGE's own, or fp16 without one), G1/G2/G3 selected
on validation and scored on test, and libraries exported at G2 and G3 (`export --solution`) whose
routed test accuracy comes from `mergetool evaluate`. Writes its block into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import command_line, write_block  # noqa: E402

from mergetool.core.errors import MergetoolError  # noqa: E402
from mergetool.merge.methods import variant_key, variant_settings  # noqa: E402
from mergetool.pipeline.session import best_merging_baseline, select, solution_key  # noqa: E402
from mergetool.search.genome import codec_summary  # noqa: E402


def mergetool(*args: str) -> None:
    print("$ mergetool " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "mergetool", *args, "--quiet"] if args[0] in ("search", "baselines")
                   else [sys.executable, "-m", "mergetool", *args], check=True)


def exported_test(run: Path, solution: int, recipe: Path, device: str) -> dict:
    """`mergetool evaluate --split test` of the run's solution exported as a library (both cached in the run)."""
    lib = run / "libraries" / f"solution-{solution}"
    if not (lib / "manifest.json").is_file():
        mergetool("export", str(run), "--solution", str(solution), "--out", str(lib), "--force", "--device", device)
    report = lib.parent / f"{lib.name}-test.json"
    if not report.is_file():
        mergetool("evaluate", str(lib), "--recipe", str(recipe), "--split", "test", "--out", str(report),
                  "--device", device)
    return json.loads(report.read_text())


def fmt(values: list) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "–"
    return f"{np.mean(vals):.4f}" + (f" ± {np.std(vals):.4f}" if len(vals) > 1 else "")


PROTOCOLS = ("oracle", "backbone_routed", "end_to_end")


def baseline_variants(m: dict):
    """A baseline entry as `mergetool baselines` writes it, then its variants at other base storages (a dict by
    storage): (storage or None, the entry, {protocol: P} on `split`); static methods and references have no
    `protocols`, so their P is task-given only."""
    first = (m.get("storage_breakdown") or {}).get("storage")
    for storage, v in [(first, m), *(m.get("variants") or {}).items()]:
        prot = v.get("protocols")
        if prot:
            scores = {k: (prot.get(k) or {}) for k in PROTOCOLS}
        else:
            scores = {"oracle": {"validation": v.get("validation"), "test": v.get("test")}}
        yield storage, v, {split: {k: (x.get(split) or {}).get("performance") for k, x in scores.items()}
                           for split in ("validation", "test")}


def baseline_rows(m: dict) -> list[str]:
    """A baseline's table rows: the entry, then its variants, each under the three protocols."""
    out = []
    for storage, v, P in baseline_variants(m):
        name = m["name"] + (f" [{storage}]" if storage and storage != "fp32" else "")
        test = P["test"]
        out.append(f"| {name} | {v['storage_cost']:.4f} | {fmt([P['validation']['oracle']])} | "
                   f"{fmt([test['oracle']])} | {fmt([test.get('backbone_routed')])} | "
                   f"{fmt([test.get('end_to_end')])} |")
    return out


def cheapest(recipe_path: Path, device: str) -> str:
    """The least C any grouping reaches (exhaustive per component) under the recipe's conditional
    quantisation, with its validation P, and under unconditional quantisation: where G1's C goal lies."""
    from mergetool.core.grouping import experts
    from mergetool.merge.experts import ExpertStore
    from mergetool.merge.quantize import QuantSpec
    from mergetool.pipeline.session import Session
    from mergetool.recipe import load_recipe

    session = Session(load_recipe(recipe_path), device=device)
    G = session.store.cheapest_grouping()
    result = session.evaluator().evaluate(G)
    q = session.recipe.quantization
    always = ExpertStore(session.recipe, session.plan, session.base, session.tasks,
                         quantization=QuantSpec(bits=q.bits, granularity=q.granularity, mode="always"))
    kept = total = 0  # values the conditional rule leaves in full precision, over that grouping's experts
    for l, m in experts(G):
        for qt in session.store.expert(l, m).tensors.values():
            kept += qt.full.numel() if qt.full is not None else 0
            total += math.prod(qt.shape)
    return (f"- least C of any grouping (exhaustive per component): {result.storage_cost:.4f} with the recipe's "
            f"conditional {q.bits}-bit rule (that grouping: P = {result.performance:.4f} on validation; "
            f"{int((G.max(axis=0) == 0).sum())}/{session.plan.L} components shared by all tasks; "
            f"{kept / total:.1%} of its expert values fail the range test and stay full precision); "
            f"{always.storage_cost(always.cheapest_grouping()):.4f} if every unit were quantised")


def search_runs(data: dict, here: Path, work: Path, seeds, evaluations: int, device: str,
                merge: Optional[tuple[str, dict]] = None) -> dict[int, Path]:
    """`mergetool search --resume` per seed into work/seed-N, the recipe's merge replaced by `merge` if given."""
    runs = {}
    for seed in seeds:
        d = dict(data, output=str(work / f"seed-{seed}"))
        if merge:
            d["merge"] = {"method": merge[0], "parameters": merge[1]}
        d["search"] = dict(data.get("search") or {}, seed=seed, evaluations=evaluations)
        # next to the original, so its relative paths hold; a name of its own, so that two table1.py runs
        # (say, one tabulating finished variants while another searches) never remove each other's recipe
        fd, name = tempfile.mkstemp(prefix=f".table1-{work.name}-seed{seed}-", suffix=".yaml", dir=here)
        recipe = Path(name)
        with os.fdopen(fd, "w") as f:
            f.write(yaml.safe_dump(d, sort_keys=False))
        try:
            mergetool("search", str(recipe), "--resume", "--device", device)
        finally:
            recipe.unlink(missing_ok=True)
        runs[seed] = work / f"seed-{seed}"
    return runs


def finished_runs(paths) -> dict[int, Path]:
    """Finished run directories by their search seed (run.json)."""
    runs = {}
    for run in paths or []:
        info = json.loads((run / "run.json").read_text())
        search = (info.get("recipe") or {}).get("search") or {}
        runs[int(info.get("seed", search.get("seed", 0)))] = run.resolve()
    return runs


def ensure_baselines(first: Path, data: dict, args) -> dict:
    """The first run's baselines.json: copied from --baselines-from, else `mergetool baselines` on that run."""
    target = first / "baselines" / "baselines.json"
    if args.baselines_from and not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(args.baselines_from, target)
    if not target.is_file():
        stored = data.get("base_storage") or "fp32"  # the papers' fp32 base, and MERGE's own base precision
        mergetool("baselines", str(first), "--split", "test", "--methods", args.baselines, "--device", args.device,
                  "--base-storage", "fp32,fp16" if stored == "fp32" else f"fp32,{stored}")
    return json.loads(target.read_text())


def pick_scores(runs: dict[int, Path], first: Path, baselines: dict, recipe: Path, device: str) -> dict:
    """Per G: its C, validation P, test P (task given), routed test figures and codecs, one entry per seed;
    "static" holds each run's own all-shared merge (C, validation, test)."""
    picks: dict = {g: {k: [] for k in ("C", "val", "test", "backbone", "routed", "routing", "codecs")}
                   for g in ("G1", "G2", "G3", "static")}
    for run in runs.values():
        if run != first:
            (run / "baselines").mkdir(exist_ok=True)
            shutil.copy(first / "baselines" / "baselines.json", run / "baselines" / "baselines.json")
        front = json.loads((run / "search" / "front.json").read_text())
        refs = json.loads((run / "search" / "reference.json").read_text())
        chosen = select(front, refs, baselines)
        tests_path = run / "search" / "test_scores.json"
        tests = json.loads(tests_path.read_text()) if tests_path.is_file() else {}
        static = refs["static_merge"]
        picks["static"]["C"].append(static["storage_cost"])
        picks["static"]["val"].append(static["validation"]["performance"])
        picks["static"]["test"].append((static.get("test") or {}).get("performance"))
        for g in ("G1", "G2", "G3"):
            f = chosen.get(g)
            if f is None:
                continue
            p = picks[g]
            p["C"].append(f["storage_cost"])
            p["val"].append(f["performance"])
            p["codecs"].append(codec_summary(f.get("codecs")))
            p["test"].append((tests.get(solution_key(f)) or {}).get("performance"))
            if g in ("G2", "G3"):
                ev = exported_test(run, f["id"], recipe, device)
                p["backbone"].append(ev["mean"].get("backbone_routed"))
                p["routed"].append(ev["mean"].get("end_to_end", ev["mean"].get("routed")))
                p["routing"].append(ev.get("routing_accuracy"))
                if p["test"][-1] is None:
                    p["test"][-1] = ev["mean"].get("oracle")
    return picks


def pick_row(label: str, p: dict) -> str:
    codecs = "; ".join(sorted({c for c in p["codecs"] if c})) if any(p["codecs"]) else ""
    return (f"| {label}{f' [{codecs}]' if codecs else ''} | {fmt(p['C'])} | {fmt(p['val'])} | "
            f"{fmt(p['test'])} | {fmt(p['backbone'])} | {fmt(p['routed'])} |")


def budgets(runs) -> str:
    """The runs' numbers of real evaluations, e.g. "150" or "148/150"."""
    return "/".join(map(str, sorted({len((r / "search" / "evaluations.jsonl").read_text().splitlines())
                                     for r in runs})))


def mean_of(values: list) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def bar(name: str, ours: Optional[float], theirs: Optional[float], what: str) -> str:
    """One of the paper's bars, judged on test means: met (by how much) or missed (by how much)."""
    if ours is None or theirs is None:
        return f"{name}: not measured ({what})"
    verdict = "met" if ours > theirs else ("tied" if ours == theirs else "missed")
    return f"{name}: {verdict} ({ours:.4f} vs {theirs:.4f}, {ours - theirs:+.4f}; {what})"


def baseline_table(baselines: dict) -> list[str]:
    rows = ["| method | C | P (validation) | P (test, task given) | backbone-routed (test) | end-to-end (test) |",
            "|---|---|---|---|---|---|"]
    for m in baselines["methods"]:
        rows += baseline_rows(m)
    return rows


PROTOCOL_NOTE = (
    "- three protocols (issue #13): task given (oracle chain or weights, the input's own head); "
    "backbone-routed (the router picks the chain or merge weights, the input's own head runs on it: the "
    "Twin/EMR papers' protocol); end-to-end (the router also picks the head; a misroute is wrong: what "
    "`predict` does). MERGE's routed figures come from `mergetool evaluate` on the exported G2/G3 "
    "libraries; routed baselines use the project's router on their own features; `[fp16]`/`[int8]` rows are the "
    "same method with its base stored at that precision (C counts the base at its stored precision)")


def single_table(args, data: dict, work: Path) -> str:
    """Table I for the recipe's own intra-group method (G1/G2/G3 over seeds)."""
    runs = finished_runs(args.run)
    runs.update(search_runs(data, args.recipe.resolve().parent, work, [s for s in args.seeds if s not in runs],
                            args.evaluations, args.device))
    args.seeds = sorted(runs)
    first = runs[args.seeds[0]]
    baselines = ensure_baselines(first, data, args)
    picks = pick_scores(runs, first, baselines, args.recipe, args.device)
    best = best_merging_baseline(baselines)
    labels = {"G1": "MERGE G1 (cheapest beating its static merge)",
              "G2": f"MERGE G2 (cheapest beating {best['name'] if best else '–'})", "G3": "MERGE G3 (best performance)"}
    rows = baseline_table(baselines) + [pick_row(labels[g], picks[g]) for g in ("G1", "G2", "G3")]
    routing = [a for g in ("G2", "G3") for a in picks[g]["routing"] if a is not None]
    indiv = next((m for m in baselines["methods"] if m["id"] == "individual"), None)
    g3 = mean_of(picks["G3"]["test"])
    return "\n".join(rows + [
        "",
        f"- seeds {args.seeds}, {budgets(runs.values())} real evaluations each; MERGE rows are mean ± std over seeds "
        f"(selected on validation, reported on test); baselines tuned on validation",
        PROTOCOL_NOTE,
        f"- routing accuracy of the exported G2/G3 libraries on test: {fmt(routing)}",
        "- G3 test / individual models' test: "
        + (f"{g3 / indiv['test']['performance']:.4f}" if indiv and indiv.get("test") and g3 else "–"),
        f"- run directories: {', '.join(str(r) for r in runs.values())}",
        cheapest(args.recipe, args.device),
    ])


def variants_table(args, data: dict, work: Path) -> str:
    """Table I's MERGE-WA/TA/TM/BC: one search per intra-group method at its paper's settings, per seed."""
    keys = [k.strip() for k in args.methods.split(",") if k.strip()]
    settings = {k: variant_settings(k) for k in keys}
    runs = {k: search_runs(data, args.recipe.resolve().parent, work / k, args.seeds, args.evaluations,
                           args.device, merge=settings[k]) for k in keys}
    first = runs[keys[0]][args.seeds[0]]
    baselines = ensure_baselines(first, data, args)
    best = best_merging_baseline(baselines)
    best_test = (best.get("test") or {}).get("performance") if best else None
    rows, bars = baseline_table(baselines), []
    for k in keys:
        picks = pick_scores(runs[k], first, baselines, args.recipe, args.device)
        name = "MERGE-" + variant_key(k).upper()  # the paper's names
        method, params = settings[k]
        rows.append(pick_row(f"{name}: its own merge, all shared ({method} {params})", picks["static"]))
        rows += [pick_row(f"{name} {g}", picks[g]) for g in ("G1", "G2", "G3")]
        bars.append("- " + bar(f"{name} G1 beats its own merge (task given)", mean_of(picks["G1"]["test"]),
                               mean_of(picks["static"]["test"]), "test means over seeds"))
        bars.append("- " + bar(f"{name} G2 beats {best['name'] if best else '–'} (backbone-routed)",
                               mean_of(picks["G2"]["backbone"]), best_test, "the baseline's test P under its protocol"))
    return "\n".join(rows + ["", *bars, "",
        f"- variants {', '.join(keys)} at their papers' settings (mergetool.merge.methods.VARIANT_SETTINGS); seeds "
        f"{args.seeds}, {budgets(r for rs in runs.values() for r in rs.values())} real evaluations each, racing as the recipe sets it; MERGE rows "
        "are mean ± std over seeds (selected on validation, reported on test)",
        PROTOCOL_NOTE,
        f"- run directories: {work}/<variant>/seed-<seed>",
    ])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe", type=Path)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--evaluations", type=int, default=300)
    ap.add_argument("--methods", default=None,
                    help="MERGE variants, one search each at its paper's settings: wa,ta,ties,bc (default: the "
                         "recipe's own merge)")
    ap.add_argument("--baselines", default="wa,ta,ties,bc,pcb,fisher,regmean,adamerging,twin,emr,tall,tswitch,bitdelta")
    ap.add_argument("--baselines-from", type=Path, default=None,
                    help="a finished baselines.json (same zoo, data and base storages) to use instead of running them")
    ap.add_argument("--workdir", type=Path, default=None, help="reuse a previous run (searches resume)")
    ap.add_argument("--run", type=Path, nargs="+", default=None,
                    help="finished run directories to tabulate instead of searching (seed and budget from run.json)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if args.methods and args.run:
        ap.error("--run tabulates the recipe's own merge; with --methods, give --workdir (the searches resume)")
    for key in (args.methods or "").split(","):
        try:
            key.strip() and variant_key(key)
        except MergetoolError as e:
            ap.error(f"--methods: {e} ({e.fix})")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="mergetool-table1-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = yaml.safe_load(args.recipe.read_text())
    body = variants_table(args, data, work) if args.methods else single_table(args, data, work)
    print(body)
    if not args.no_write:
        if args.methods:
            write_block("table1-variants", "Table I's MERGE variants (issue #18): demo zoo, one search per "
                        "intra-group method", body, command_line(), args.seeds)
        elif data.get("codecs"):  # the paper's Table I (whole experts) keeps its own block
            write_block("table1-codecs", "Table I with a codec menu (issue #13): demo zoo, three protocols", body,
                        command_line(), args.seeds)
        else:
            write_block("table1", "Table I on the demo zoo (MiniLM, 4 text tasks)", body, command_line(), args.seeds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
