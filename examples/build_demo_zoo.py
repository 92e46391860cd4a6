"""Build the offline demo zoo: data splits + one fine-tuned MiniLM expert per task.

    python examples/build_demo_zoo.py                      # all tasks, ~15 min on 2 CPU cores
    python examples/build_demo_zoo.py --tasks rt_polarity --epochs 1
    MERGETOOL_DEMO_DIR=/tmp/zoo python examples/build_demo_zoo.py

Finished tasks are cached (zoo.json); re-running with the same settings is instant.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download anything

from mergetool.core.errors import MergetoolError  # noqa: E402
from mergetool.demo import datasets, zoo  # noqa: E402


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
    args = parser.parse_args(argv)

    start = time.time()
    try:
        folder = zoo.build_zoo(
            args.out, tasks=args.tasks, device=args.device, epochs=args.epochs, lr=args.lr,
            seed=args.seed, force=args.force, progress=not args.quiet, max_train=args.max_train,
            threads=args.threads,
        )
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
