"""The quick offline example: build a tiny zoo, then validate and plan merge_recipes/tiny-bert.yaml.

    python examples/tiny_demo.py            # writes runs/tiny-demo/ (or $MERGETOOL_TINY_DIR)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mergetool.toy import make_zoo, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "merge_recipes" / "tiny-bert.yaml"


def main() -> int:
    out = Path(os.environ.get("MERGETOOL_TINY_DIR", ROOT / "runs" / "tiny-demo")).resolve()
    os.environ["MERGETOOL_TINY_DIR"] = str(out)
    if not (out / "zoo" / "bert-task1").is_dir():
        make_zoo(out / "zoo", "bert", n_tasks=2)
        for name, n in (("sentiment", 2), ("topic", 3)):
            write_jsonl(out / "data" / f"{name}.jsonl",
                        [{"text": f"{name} example {i}", "label": f"c{i % n}"} for i in range(60)])
    for command in (["validate", str(RECIPE)], ["plan", str(RECIPE)]):
        print(f"$ mergetool {' '.join(command)}", flush=True)
        rc = subprocess.call([sys.executable, "-m", "mergetool", *command])
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
