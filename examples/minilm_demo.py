"""The README's main command: MERGE end to end on a real model and real data, offline.

    python examples/minilm_demo.py            # ≈ 34 min on 2 CPU cores the first time, ≈ 23 min with the zoo cached
    python examples/minilm_demo.py --evaluations 80

0. mergetool doctor  (a few seconds: the environment, the staged forward per architecture, the assets);
1. builds the demo zoo (all-MiniLM-L6-v2 fine-tuned on 4 text tasks from wheels; cached);
2. mergetool search merge_recipes/demo-minilm-text4.yaml  (resumable; 40 evaluations by default);
3. mergetool baselines --split test --methods wa,ta,ties,bc  (static baselines, tuned on validation);
4. mergetool export --budget 1.0  (library + router);
5. mergetool predict on a mixed stream of test inputs;
6. mergetool evaluate on the test split, then one table: individual models, best static baseline and
   the exported library, per task.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "merge_recipes" / "demo-minilm-text4.yaml"


STEPS: list[tuple[str, float]] = []  # (step, seconds), printed at the end


def run_step(step: str, shown: str, cmd: list[str]) -> None:
    print(f"\n$ {shown}", flush=True)
    t0 = time.time()
    rc = subprocess.call(cmd)
    STEPS.append((step, time.time() - t0))
    if rc:
        sys.exit(rc)


def mergetool(*args: str) -> None:
    run_step(args[0], f"mergetool {' '.join(args)}", [sys.executable, "-m", "mergetool", *args])


def mixed_stream(data_dir: Path, tasks: list[str], out: Path, n: int, seed: int = 0) -> int:
    """Up to n test texts drawn uniformly over the tasks and shuffled, as jsonl (text, true task)."""
    rng = random.Random(seed)
    rows = []
    for task in tasks:
        lines = (data_dir / task / "test.jsonl").read_text().splitlines()
        picked = rng.sample(lines, min(len(lines), n // len(tasks)))
        rows += [{"text": json.loads(line)["text"], "task": task} for line in picked]
    rng.shuffle(rows)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def final_table(run_dir: Path, evaluation: dict) -> str:
    base = json.loads((run_dir / "baselines" / "baselines.json").read_text())
    tasks = list(base["tasks"])
    rows = [("method", "C", *tasks, "mean")]

    def add(name: str, cost: float, per_task: dict) -> None:
        vals = [per_task[t] for t in tasks]
        rows.append((name, f"{cost:.3f}", *(f"{v:.3f}" for v in vals), f"{sum(vals) / len(vals):.3f}"))

    for m in base["methods"]:
        if m["kind"] == "individual" and m.get("test"):
            add(m["name"], m["storage_cost"], m["test"]["per_task"])
    static = [m for m in base["methods"] if m["kind"] == "static" and m.get("test")]
    if static:
        best = max(static, key=lambda m: m["validation"]["performance"])  # chosen on validation
        add(f"best static: {best['name']}", best["storage_cost"], best["test"]["per_task"])
    lib = evaluation["tasks"]
    add("MERGE library, end-to-end routed", evaluation["storage_cost"], {t: lib[t]["end_to_end"] for t in tasks})
    add("MERGE library, backbone-routed", evaluation["storage_cost"], {t: lib[t]["backbone_routed"] for t in tasks})
    add("MERGE library, task given", evaluation["storage_cost"], {t: lib[t]["oracle"] for t in tasks})
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.append(f"routing accuracy (test): {evaluation['routing_accuracy']:.3f}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--evaluations", type=int, default=None, help="search budget (default: the recipe's 40)")
    ap.add_argument("--stream", type=int, default=2000, help="mixed test inputs for predict")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    start = time.time()
    # a few seconds that catch a broken environment (versions, staged forward, offline assets) before
    # the zoo build spends minutes
    mergetool("doctor", "--device", args.device)

    from mergetool.demo import zoo

    zoo_dir = Path(os.environ.get("MERGETOOL_DEMO_DIR", zoo.default_zoo_dir())).expanduser()
    os.environ["MERGETOOL_DEMO_DIR"] = str(zoo_dir)
    run_step("zoo", f"python examples/build_demo_zoo.py   (cached in {zoo_dir})",
             [sys.executable, str(ROOT / "examples" / "build_demo_zoo.py"), "--device", args.device])

    from mergetool.recipe import load_recipe

    recipe = load_recipe(RECIPE)
    run_dir = Path(recipe.output)
    library = run_dir / "libraries" / "budget-1"
    budget = ["--evaluations", str(args.evaluations)] if args.evaluations else []
    mergetool("search", str(RECIPE), "--resume", "--device", args.device, *budget)
    mergetool("baselines", str(RECIPE), "--split", "test", "--methods", "wa,ta,ties,bc", "--device", args.device)
    mergetool("export", str(RECIPE), "--budget", "1.0", "--force", "--device", args.device)

    stream = run_dir / "mixed_test_stream.jsonl"
    n = mixed_stream(zoo_dir / "data", list(recipe.tasks), stream, args.stream)
    print(f"\nmixed test stream: {n} inputs over {len(recipe.tasks)} tasks → {stream}")
    mergetool("predict", str(library), "--input", str(stream), "--output", str(run_dir / "predictions.jsonl"),
              "--device", args.device)
    preds = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    truth = [json.loads(line)["task"] for line in stream.read_text().splitlines()]
    routed = sum(p["task"] == t for p, t in zip(preds, truth)) / max(1, len(preds))
    print(f"predict: {len(preds)} predictions in input order; routed to the right task: {routed:.3f}")

    report = run_dir / "evaluate-test.json"
    mergetool("evaluate", str(library), "--split", "test", "--recipe", str(RECIPE), "--out", str(report),
              "--device", args.device)
    evaluation = json.loads(report.read_text())
    manifest = json.loads((library / "manifest.json").read_text())
    evaluation["storage_cost"] = manifest.get("storage", manifest)["storage_cost"]
    print("\nTest accuracy per task (C by Eq. 8, in units of one fp32 MiniLM):")
    print(final_table(run_dir, evaluation))
    print("\nwall time: " + ", ".join(f"{name} {sec:.0f} s" for name, sec in STEPS)
          + f"; {time.time() - start:.0f} s in all")
    print(f"summary: {run_dir / 'search' / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
