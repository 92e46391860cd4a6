"""The quick offline example, end to end on tiny trained models (about a minute on 2 CPU cores).

    python examples/tiny_demo.py     # writes runs/tiny-demo/ (or $MERGETOOL_TINY_DIR)

It trains a tiny BERT zoo on three conflicting synthetic tasks, then runs on
merge_recipes/tiny-bert.yaml: validate → search (40 evaluations) → export --budget 1.0 → inspect.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mergetool.testing.toy import make_trained_zoo

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "merge_recipes" / "tiny-bert.yaml"


def main() -> int:
    out = Path(os.environ.get("MERGETOOL_TINY_DIR", ROOT / "runs" / "tiny-demo")).resolve()
    os.environ["MERGETOOL_TINY_DIR"] = str(out)
    if not (out / "zoo" / "task2" / "model.safetensors").is_file():
        print(f"training the tiny zoo in {out / 'zoo'} ...", flush=True)
        make_trained_zoo(out / "zoo")
    library = out / "run" / "libraries" / f"budget-{1.0:g}"  # export names it like this
    steps = [["validate", str(RECIPE)],
             ["search", str(RECIPE), "--resume"],
             ["export", str(RECIPE), "--budget", "1.0", "--force"],
             ["inspect", str(library)]]
    for command in steps:
        print(f"\n$ mergetool {' '.join(command)}", flush=True)
        rc = subprocess.call([sys.executable, "-m", "mergetool", *command])
        if rc:
            return rc
    print(f"\nsummary: {out / 'run' / 'search' / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
