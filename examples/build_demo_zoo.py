"""Build the offline demo zoo: data splits + one fine-tuned MiniLM expert per task.

    python examples/build_demo_zoo.py                      # all tasks, ~15 min on 2 CPU cores
    python examples/build_demo_zoo.py --tasks rt_polarity --epochs 1
    MERGETOOL_DEMO_DIR=/tmp/zoo python examples/build_demo_zoo.py
    python examples/build_demo_zoo.py --mtl                # also the traditional MTL model (ZOO/mtl/)

Finished tasks are cached (zoo.json); re-running with the same settings is instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download anything

from mergetool.core.errors import MergetoolError  # noqa: E402
from mergetool.demo import datasets, mtl, zoo  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help=f"zoo dir (default {zoo.default_zoo_dir()})")
    parser.add_argument("--tasks", nargs="+", choices=datasets.TASKS, default=None, help="subset of tasks")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--epochs", type=int, default=None, help="same epochs for every task (default: tuned)")
    parser.add_argument("--lr", type=float, default=None, help="same learning rate for every task (default: tuned)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-train", type=int, default=2000, help="cap on training examples per task")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: free cores)")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--mtl", action="store_true", help="also train one MiniLM on every task at once, a head per "
                        "task (Table I's traditional MTL row; `mergetool baselines --mtl ZOO/mtl`)")
    args = parser.parse_args(argv)

    start = time.time()
    try:
        folder = zoo.build_zoo(
            args.out, tasks=args.tasks, device=args.device, epochs=args.epochs, lr=args.lr,
            seed=args.seed, force=args.force, progress=not args.quiet, max_train=args.max_train,
            threads=args.threads,
        )
        if args.mtl:
            built = mtl.build_mtl(folder, device=args.device, seed=args.seed, force=args.force,
                                  progress=not args.quiet)
            info = json.loads((built / "mtl.json").read_text())
            print(f"mtl: {built}  ({info['seconds']:.0f} s to train, {info['steps']} steps)")
            for task, acc in info["tasks"].items():
                print(f"  {task:22} test_acc {acc.get('test_accuracy', float('nan')):.3f}  "
                      f"val_acc {acc.get('validation_accuracy', float('nan')):.3f}")
    except MergetoolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    manifest = zoo.read_manifest(folder)
    print(f"zoo: {folder}  ({time.time() - start:.0f} s)")
    print(f"{'task':22} {'classes':>7} {'train':>6} {'router':>6} {'val':>5} {'test':>5} "
          f"{'test_acc':>8} {'val_acc':>7} {'epochs':>6} {'lr':>8} {'seconds':>7}")
    for task in [t for t in datasets.TASKS if t in manifest.get("tasks", {})]:
        info = manifest["tasks"][task]
        s = info["split_sizes"]
        print(f"{task:22} {len(info['classes']):>7} {s['train']:>6} {s['router']:>6} {s['validation']:>5} "
              f"{s['test']:>5} {info['test_accuracy']:>8.3f} {info['validation_accuracy']:>7.3f} "
              f"{info['epochs']:>6} {info['lr']:>8.1e} {info['seconds']:>7.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
