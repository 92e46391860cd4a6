"""Issue #13's goals on the demo zoo searched with a codec menu: MERGE under three protocols against the baselines.

    python benchmarks/codec_goals.py runs/table1-codecs/seed-0 [more seed runs] \
        --recipe merge_recipes/demo-minilm-text4-codecs.yaml --baselines RUN/baselines/baselines.json

For each run (one search seed): the solution `export --budget B` picks (selected on validation) is exported
and scored on test by `mergetool evaluate` under the three protocols: oracle (task given), backbone-routed
(the router picks the chain, the input's own head runs on it) and end-to-end (the router picks chain and
head; a misroute is wrong). Budgets: the goals' 0.40 and 0.30, and every baseline's C. Ratios are to the
individual fp32 models on test (reference.json). Against each baseline point, MERGE's solution at that
baseline's C is compared under the same protocol (weak dominance on test). Writes its block to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import command_line, write_block  # noqa: E402
from table1 import PROTOCOLS, baseline_variants, exported_test, fmt  # noqa: E402

from mergetool.core.errors import MergetoolError  # noqa: E402
from mergetool.core.storage import storage_cost  # noqa: E402
from mergetool.search.front import pick  # noqa: E402
from mergetool.search.genome import codec_summary  # noqa: E402


def merge_at(run: Path, recipe: Path, budget: float, device: str) -> dict:
    """The front solution `export --budget` picks, exported and evaluated on test (both cached in the run)."""
    front = json.loads((run / "search" / "front.json").read_text())
    try:
        f = pick(front, budget)
    except MergetoolError:  # nothing on the front fits the budget
        return {}
    ev = exported_test(run, f["id"], recipe, device)
    return {"id": f["id"], "C": f["storage_cost"], "C_routed": routed_cost(run / "libraries" / f"solution-{f['id']}"),
            "codecs": codec_summary(f.get("codecs")), "routing": ev.get("routing_accuracy"),
            **{p: ev["mean"].get(p) for p in PROTOCOLS}}


def routed_cost(lib: Path) -> float:
    """The library's C plus what routing needs (the baselines' convention): the router MLP's tensors and the
    router's feature weights when it does not route on the chains' shared prefix, in units of b⁺·d."""
    from safetensors import safe_open

    m = json.loads((lib / "manifest.json").read_text())
    bits = 0
    with safe_open(str(lib / m["router"]["weights"]), framework="pt") as fh:
        for k in fh.keys():
            t = fh.get_tensor(k)
            bits += t.numel() * t.element_size() * 8
    bits += 8 * m["router"]["feature_storage"]["bytes"]
    return m["storage_cost"] + storage_cost(bits, d=m["storage"]["d"], base_bits=m["storage"]["base_bits"])


def baseline_points(baselines: dict) -> list[dict]:
    """Every baseline point with C: {name, C, protocol -> test P}; static methods are task-given only."""
    out = []
    for m in baselines.get("methods", []):
        for storage, v, P in baseline_variants(m):
            test = {p: x for p, x in P["test"].items() if x is not None}
            if test and v.get("storage_cost") is not None and m.get("kind") not in ("individual", "mtl"):
                out.append({"name": m["name"] + (f" [{storage}]" if storage else ""), "C": float(v["storage_cost"]),
                            "test": test})
    return out


def main() -> int:  # noqa: C901
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--recipe", type=Path, required=True)
    ap.add_argument("--baselines", type=Path, default=None, help="baselines.json (default: the first run's)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    bpath = args.baselines or args.runs[0] / "baselines" / "baselines.json"
    baselines = json.loads(bpath.read_text()) if bpath.is_file() else {"methods": []}
    points = baseline_points(baselines)
    rows = ["| budget | seed run | solution | C | C with router | codecs | oracle / indiv. | backbone-routed / indiv. | "
            "end-to-end / indiv. | routing accuracy |", "|---|---|---|---|---|---|---|---|---|---|"]
    goal: dict[str, list] = {"oracle": [], "backbone_routed": [], "stretch": [], "routing": [], "gap": []}
    dominance = []
    for run in args.runs:
        refs = json.loads((run / "search" / "reference.json").read_text())
        indiv = refs["individual"]["test"]["performance"]
        n = len((run / "search" / "evaluations.jsonl").read_text().splitlines())
        for budget in (0.40, 0.30):
            r = merge_at(run, args.recipe, budget, args.device)
            if not r:
                rows.append(f"| {budget:.2f} | {run.name} ({n} evals) | – | – | – | nothing on the front fits | | | | |")
                continue
            ratio = {p: (r[p] / indiv if r.get(p) is not None else None) for p in PROTOCOLS}
            rows.append(f"| {budget:.2f} | {run.name} ({n} evals) | {r['id']} | {r['C']:.4f} | {r['C_routed']:.4f} | "
                        f"{r['codecs']} | "
                        + " | ".join("–" if ratio[p] is None else f"{ratio[p]:.2%}" for p in PROTOCOLS)
                        + f" | {fmt([r['routing']])} |")
            if budget == 0.40:
                goal["oracle"].append(ratio["oracle"])
                goal["backbone_routed"].append(ratio["backbone_routed"])
                goal["routing"].append(r["routing"])
                if r.get("end_to_end") is not None:
                    goal["gap"].append(100 * (r["oracle"] - r["end_to_end"]))
            else:
                goal["stretch"].append(ratio["oracle"])
        for b in points:
            r = merge_at(run, args.recipe, b["C"], args.device)
            for p, theirs in b["test"].items():
                mine = r.get(p) if r else None
                dominance.append((b["name"], b["C"], p, theirs, r.get("C") if r else None, mine,
                                  mine is not None and mine >= theirs))
    lines = rows + ["", "Goals (test split, ratios to the individual fp32 models given their task; judged on the "
                        "mean over seeds, the worst seed beside it):"]

    def judge(what: str, key: str, goal_text: str, ok, worst=min) -> None:
        v = [x for x in goal[key] if x is not None]
        verdict = ("**met**" if ok(np.mean(v)) else "**missed**") if v else "**not measured**"
        lines.append(f"- {what}: {fmt(v)}{f' (worst seed {worst(v):.4f})' if len(v) > 1 else ''} "
                     f"(goal {goal_text}): {verdict}")

    judge("task given at C ≤ 0.40", "oracle", "≥ 99.5 %", lambda m: m >= 0.995)
    judge("stretch, task given at C ≤ 0.30", "stretch", "≥ 99.5 %", lambda m: m >= 0.995)
    judge("backbone-routed at C ≤ 0.40", "backbone_routed", "≥ 99 %", lambda m: m >= 0.99)
    judge("routing accuracy on test", "routing", "≥ 0.99", lambda m: m >= 0.99)
    judge("end-to-end below oracle, same library, points", "gap", "≤ 0.8", lambda m: m <= 0.8, worst=max)
    met = lambda ok: "**met**" if ok else "**missed**"  # noqa: E731
    if dominance:
        lines += ["", "| baseline | its C | protocol | its test P | MERGE C (budget = its C) | MERGE test P | "
                      "MERGE ≥ baseline |", "|---|---|---|---|---|---|---|"]
        for name, c, p, theirs, mc, mine, ok in dominance:
            lines.append(f"| {name} | {c:.4f} | {p} | {theirs:.4f} | {fmt([mc])} | {fmt([mine])} | "
                         f"{'yes' if ok else 'no'} |")
        lost = sorted({(d[0], d[2]) for d in dominance if not d[6]})
        lines.append(f"- weak dominance on test over every baseline point: {met(not lost)}"
                     + (f"; not dominated: {', '.join(f'{n} ({p})' for n, p in lost)}" if lost else ""))
    lines.append(f"- runs: {', '.join(str(r) for r in args.runs)}; baselines: "
                 f"{bpath if bpath.is_file() else 'none (not run: no dominance check)'}; individual fp32 test P "
                 f"{np.mean([json.loads((r / 'search' / 'reference.json').read_text())['individual']['test']['performance'] for r in args.runs]):.4f}")
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_block("codec-goals", "Issue #13's goals: a codec menu on the demo zoo, three protocols", body,
                    command_line(), [r.name for r in args.runs])
    return 0


if __name__ == "__main__":
    sys.exit(main())
