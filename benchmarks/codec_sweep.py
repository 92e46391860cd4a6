"""Delta codecs on the demo zoo: every task's own fine-tune (the individual models, G = all singletons) stored
under one codec, against the fp32 individual models, on the test split.

    python benchmarks/codec_sweep.py                   # the codecs and base storages below
    python benchmarks/codec_sweep.py --split validation

This is the ceiling of each codec for "every task at its individual model's accuracy": merging (sharing experts
between tasks) can only lower P and C from here. C is Eq. 8's normalisation, the stored base included
(C = stored bits / (b⁺·d)); the individual fp32 models are C = T = 4, one fp32 model is C = 1.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import ROOT, write_block  # noqa: E402

SETTINGS = [  # (codec menu entry, base storage)
    ("full", "fp32"),
    ("{delta_quant: {bits: 1}}", "fp16"),
    ("{delta_quant: {bits: 2}}", "int8"),
    ("{delta_quant: {bits: 4}}", "int8"),
    ("{delta_switch: {density: 0.05}}", "int8"),
    ("{delta_switch: {density: 0.1}}", "int8"),
    ("{delta_switch: {density: 0.2, scale: row}}", "int8"),
    ("{delta_switch: {density: 0.1}}", "fp16"),
    ("{low_rank: {rank: 16}}", "int8"),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", type=Path, default=ROOT / "merge_recipes" / "demo-minilm-text4.yaml")
    ap.add_argument("--split", default="test")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)

    from mergetool.core.grouping import all_singletons
    from mergetool.pipeline.session import Session
    from mergetool.recipe import load_recipe, parse_recipe

    base = load_recipe(args.recipe)
    rows = []
    fp32 = None
    for codec, storage in SETTINGS:
        text = base.text + f"\ncodecs: [{codec}]\nbase_storage: {storage}\n"
        recipe = parse_recipe(text, args.recipe)
        session = Session(recipe, device=args.device)
        G = all_singletons(session.plan.T, session.plan.L)
        t0 = time.perf_counter()
        if fp32 is None:  # the fp32 individual models, the denominator
            fp32 = session.evaluator(args.split, quantized=False).evaluate(G)
        r = session.evaluator(args.split).evaluate(G)
        cost = session.store.storage_cost(G)
        rel = {t: r.per_task[t] / fp32.per_task[t] for t in r.per_task}
        rows.append((codec, storage, cost, r.performance, r.performance / fp32.performance, min(rel.values()), rel))
        print(f"{codec} base {storage}: C = {cost:.3f}, P = {r.performance:.4f} ({r.performance / fp32.performance:.2%}"
              f" of fp32; worst task {min(rel.values()):.2%}) in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        session.release()
    lines = [f"The individual models (every task its own fine-tune, G = all singletons) stored under one codec, "
             f"on the {args.split} split; fp32 individual models: P = {fp32.performance:.4f} at C = {len(fp32.per_task)}.",
             "", "| codec | base storage | C | P | P / fp32 individual | worst task / its fp32 model |",
             "|---|---|---|---|---|---|"]
    for codec, storage, cost, p, rel, worst, _ in rows:
        lines.append(f"| `{codec}` | {storage} | {cost:.3f} | {p:.4f} | {rel:.2%} | {worst:.2%} |")
    lines += ["", "`full` is the paper's conditional 8-bit quantisation of whole experts (no stored base)."]
    block = "\n".join(lines)
    print(block)
    if not args.no_write:
        cmd = "python benchmarks/codec_sweep.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        write_block("codec-sweep", "Delta codecs: the individual models under each codec (demo zoo)", block,
                    cmd.strip(), "none (deterministic)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
