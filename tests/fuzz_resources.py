"""Resource cases of the fuzz suite: `run_subprocess` runs one (`python -m mergetool ...`) under RLIMIT_AS
and a timeout; `resource_cases` builds the bombs and deep documents.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from fuzz_files import (
    nested,
    relist,
    to_yaml,
    write,
)
from fuzz_fixtures import (
    World,
    copy_lib,
    write_recipe,
)
from fuzz_strategies import (
    apply,
)
from fuzz_support import (
    COUNTS,
)

# ---------------------------------------------------------------------------------- subprocess cases

@dataclass
class Proc:
    rc: Optional[int]
    stdout: str
    stderr: str
    elapsed: float
    timed_out: bool
    signal: Optional[int]


def run_subprocess(args: Sequence, *, cwd: Path, timeout: float = 60.0, memory: int = 4 << 30,
                   stdin: Optional[bytes] = None) -> Proc:
    """`python -m mergetool ARGS` with RLIMIT_AS = memory and a wall-clock timeout (the group is killed)."""

    def limits():
        os.setsid()
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONFAULTHANDLER="")
    cmd = [sys.executable, "-m", "mergetool", *map(str, args)]
    COUNTS[next((str(a) for a in args if not str(a).startswith("-")), "?") + " (subprocess)"] += 1
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, cwd=cwd, env=env, preexec_fn=limits, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = p.communicate(stdin, timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        timed_out = True
    rc = p.returncode
    return Proc(None if timed_out else rc, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"),
                time.monotonic() - t0, timed_out, -rc if rc is not None and rc < 0 else None)


# ------------------------------------------------------------------------------------------ 14. resource cases

def _laughs(levels: int = 9, width: int = 10) -> str:
    lines = ['a0: &a0 "lol"']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def _resource_cases(world: World, ex: Path) -> dict:
    """id -> (args, stdin bytes or None). Built lazily in `ex` (a folder of the test)."""
    recipe_text = to_yaml(world.recipe)

    def lib_copy(name):
        return copy_lib(world, ex, name)

    cases = {}
    cases["billion-laughs"] = (["validate", write(ex / "laughs.yaml", _laughs() + recipe_text)], None)
    params = recipe_text.replace("  parameters:\n    lambda: 0.5\n",
                                 "  parameters:\n    lambda: 0.5\n    x: *a9\n")
    cases["billion-laughs-in-merge-parameters"] = (["validate", write(ex / "laughs2.yaml", _laughs() + params)], None)
    for depth in (20_000, 100_000):
        cases[f"yaml-flow-nested-{depth}"] = (["validate", write(ex / f"deep{depth}.yaml", recipe_text + "deep: " +
                                                                 nested(depth) + "\n")], None)
    cases["yaml-block-nested-20000"] = (["validate", write(ex / "block.yaml", recipe_text + "deep:\n" + "".join(
        " " * i + "- \n" for i in range(1, 20_000)))], None)
    big = "".join(f"k{i}: {i}\n" for i in range(600_000))
    cases["recipe-10MB-600k-unknown-keys"] = (["validate", write(ex / "big.yaml", recipe_text + big)], None)
    cases["predict-jsonl-nested-100000"] = (["predict", lib_copy("lib-p"), "--input", write(
        ex / "deep.jsonl", '{"text": "w1", "x": ' + nested(100_000) + "}\n"), "-q", "--device", "cpu"], None)
    lm = lib_copy("lib-m")
    write(lm / "manifest.json", '{"format_version": 1, "x": ' + nested(100_000) + "}")
    cases["manifest-nested-100000"] = (["inspect", lm, "--verify"], None)
    lh = lib_copy("lib-h")
    shard = sorted(lh.glob("heads-*.safetensors"))[0]
    raw = shard.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header)[:-1] + ', "deep": ' + nested(100_000) + "}"
    text_b = text.encode() + b" " * (-len(text) % 8)
    shard.write_bytes(len(text_b).to_bytes(8, "little") + text_b + raw[8 + n:])
    relist(lh)
    cases["safetensors-header-nested-100000"] = (["predict", lh, "--input", write(ex / "in.jsonl", '{"text": "w1"}\n'),
                                                  "-q", "--device", "cpu"], None)
    lc = lib_copy("lib-c")
    write(lc / "config.json", '{"model_type": "bert", "x": ' + nested(100_000) + "}")
    relist(lc)
    cases["config-json-nested-100000"] = (["predict", lc, "--input", ex / "in.jsonl", "-q", "--device", "cpu"], None)
    data = write(ex / "deepdata.jsonl", '{"text": "w1", "label": 0, "x": ' + nested(100_000) + "}\n")
    r = apply(world.recipe, [])
    r["tasks"]["t0"]["validation"]["path"] = str(data)
    cases["data-jsonl-nested-100000"] = (["validate", write_recipe(ex, r, "deepdata.yaml")], None)
    r = apply(world.recipe, [])
    r["tasks"]["t0"]["validation"]["path"] = "/dev/zero"
    cases["data-is-dev-zero"] = (["validate", write_recipe(ex, r, "zero.yaml")], None)
    cases["grouping-nested-100000"] = (["export", write_recipe(ex, world.recipe, "g.yaml"), "--grouping",
                                        write(ex / "deepg.json", nested(100_000)), "--out", ex / "gout"], None)
    cases["stdin-pipe-not-utf8"] = (["predict", lib_copy("lib-s"), "--input", "-", "-q", "--device", "cpu"],
                                    b'{"text": "w1"}\n' * 50 + b'{"text": "caf\xe9"}\n')
    return cases


RESOURCE_IDS = ["billion-laughs", "billion-laughs-in-merge-parameters", "yaml-flow-nested-20000",
                "yaml-flow-nested-100000", "yaml-block-nested-20000", "recipe-10MB-600k-unknown-keys",
                "predict-jsonl-nested-100000", "manifest-nested-100000", "safetensors-header-nested-100000",
                "config-json-nested-100000", "data-jsonl-nested-100000", "data-is-dev-zero", "grouping-nested-100000",
                "stdin-pipe-not-utf8"]
RESOURCE_TIMEOUT = 60.0
RESOURCE_MEMORY = 4 << 30
