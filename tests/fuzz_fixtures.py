"""Shared pieces of the fuzz test files (tests/test_fuzz_*.py): settings and counted runs, the session
`world` and the `fuzz_report` counter (imported into conftest.py so each is built once per session),
and output checks.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from fuzz_files import (
    nested,
    to_yaml,
    write,
)
from fuzz_support import (
    ANY,
    BAD,
    CANARY,
    COUNTS,
    OK,
    Budget,
    Outcome,
    run_cli,
)
from hypothesis import HealthCheck, Phase, settings

from mergetool.testing.toy import make_text_zoo, save_bert_tokenizer, write_jsonl

MIXED = [[0, 0, 0, 0, 0, 0, 0, 0], [0, 1, 0, 1, 0, 1, 1, 1]]
LABELS = {"t0": 2, "t1": 3}  # make_text_zoo: t0 has 2 labels, t1 3


def fuzz(n: int):
    """Hypothesis settings of one fuzz test: fixed seed, no deadline, n examples (x10 with --fuzz-long).
    FUZZ_SHRINK=0 skips shrinking (a failing run then reports the first example found, not the smallest)."""
    phases = [p for p in Phase if p != Phase.shrink or os.environ.get("FUZZ_SHRINK", "1") != "0"]
    return settings(max_examples=Budget.examples(n), deadline=None, derandomize=True, database=None, phases=phases,
                    suppress_health_check=list(HealthCheck), print_blob=False, report_multiple_bugs=True)


def run_counted(inner, minimum: dict[str, int]) -> None:
    """Run a @given function and check it ran each command at least its stated number of times
    ("*": all commands together)."""
    start = dict(COUNTS)
    inner()
    for cmd, n in minimum.items():
        ran = (sum(COUNTS.values()) - sum(start.values())) if cmd == "*" else COUNTS[cmd] - start.get(cmd, 0)
        assert ran >= Budget.examples(n), f"{cmd}: {ran} runs, below the stated minimum {Budget.examples(n)}"


# ------------------------------------------------------------------------------------------ the world

@dataclass
class World:
    root: Path
    zoo: Path
    base: Path
    tasks: list
    data: Path
    splits: dict
    secret: Path
    lib: Path
    labels: dict
    run: Path
    recipe: dict

    @property
    def ex_root(self) -> Path:
        return self.root / "ex"

    def reads(self, ex: Path, *more) -> list:
        return [ex, self.zoo, self.data, *more]


def rows(task: str, n: int = 8, words: str = "w1 w2") -> list[dict]:
    return [{"text": f"{words} w{5 + j}", "label": j % LABELS[task]} for j in range(n)]


def base_recipe(w_base: Path, tasks: list, splits: dict, output: str = "run") -> dict:
    return {
        "name": "fz",
        "base_model": str(w_base),
        "models": [{"name": f"t{i}", "model": str(p)} for i, p in enumerate(tasks)],
        "merge": {"method": "ta", "parameters": {"lambda": 0.5}},
        "quantization": {"bits": 8, "granularity": "per_channel", "mode": "conditional"},
        "tasks": {t: {"validation": {"path": str(s["validation"])}, "test": {"path": str(s["test"])},
                      "router": {"path": str(s["router"])}, "batch_size": 8} for t, s in splits.items()},
        "search": {"population": 2, "evaluations": 2, "seed": 0, "racing": None},
        "router": {"epochs": 2, "hidden": [8, 8]},
        "output": output,
    }


@pytest.fixture(scope="session")
def fuzz_report(request, tmp_path_factory):
    """Sets the budget from --fuzz-long; prints and records the invocations per command at the end.
    Imported into conftest.py (one instance per session); each test_fuzz_*.py uses it via `pytestmark`."""
    try:
        Budget.long = Budget.long or bool(request.config.getoption("--fuzz-long"))
    except ValueError:  # the option is not registered (conftest without it)
        pass
    lines: list[str] = []

    class Reporter:
        def pytest_terminal_summary(self, terminalreporter):
            for line in lines:
                terminalreporter.write_line(line)

    request.config.pluginmanager.register(Reporter(), "fuzz-counts")
    yield
    if COUNTS:
        total = sum(COUNTS.values())
        lines.append(f"fuzz ({'long' if Budget.long else 'default'} budget): {total} command runs: " +
                     ", ".join(f"{k} {v}" for k, v in sorted(COUNTS.items())))
        (tmp_path_factory.getbasetemp() / "fuzz-counts.json").write_text(json.dumps(dict(COUNTS), indent=1))


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    """A tiny BERT zoo with tokenizers, labelled splits, a library exported by the CLI, a finished
    search run, and a secret folder outside every allow-list."""
    root = tmp_path_factory.mktemp("fuzz")
    base, tasks, _ = make_text_zoo(root / "zoo")
    for p in (base, *tasks):
        save_bert_tokenizer(p)
    data = root / "data"
    splits = {t: {s: write_jsonl(data / f"{t}-{s}.jsonl", rows(t)) for s in ("validation", "test", "router")}
              for t in ("t0", "t1")}
    secret = root / "secret"
    write(secret / "secret.json", json.dumps({"api_key": CANARY}))
    write_jsonl(secret / "secret.jsonl", [{"label": 0, "password": CANARY, CANARY: 1}] * 4)
    src = root / "libsrc"
    write(src / "recipe.yaml", to_yaml(base_recipe(base, tasks, splits)))
    write(src / "g.json", json.dumps({"tasks": ["t0", "t1"], "grouping": MIXED}))
    out = run_cli(["export", src / "recipe.yaml", "--grouping", src / "g.json", "--out", root / "lib",
                   "--shard-size", "8KB", "--device", "cpu"])
    assert out.exit_code == 0 and not out.exc_type, out.describe()
    manifest = json.loads((root / "lib" / "manifest.json").read_text())
    labels = {t["name"]: t["labels"] for t in manifest["tasks"]}
    run_src = root / "runsrc"
    write(run_src / "recipe.yaml", to_yaml(base_recipe(base, tasks, splits)))
    out = run_cli(["search", run_src / "recipe.yaml", "-q", "--device", "cpu"])
    assert out.exit_code == 0 and not out.exc_type, out.describe()
    w = World(root, root / "zoo", base, tasks, data, splits, secret, root / "lib", labels, run_src / "run",
              base_recipe(base, tasks, splits))
    COUNTS.clear()  # the fixture's own runs are not fuzz cases
    return w


def write_recipe(ex: Path, recipe, name: str = "recipe.yaml") -> Path:
    return write(ex / name, recipe if isinstance(recipe, (str, bytes)) else to_yaml(recipe))


def copy_lib(world: World, ex: Path, name: str = "lib") -> Path:
    shutil.copytree(world.lib, ex / name, symlinks=True)
    return ex / name


# ------------------------------------------------------------------------------------------ output checks

def validate_ok(out: Outcome):
    if not out.stdout.startswith("ok: ") or "T=" not in out.stdout:
        return f"validate printed {out.stdout[:200]!r}"


def plan_ok(names):
    def check(out: Outcome):
        try:
            plan = json.loads(out.stdout)
        except ValueError:
            return "plan --json did not print JSON"
        if plan.get("tasks") != names or not plan.get("components"):
            return f"plan --json tasks {plan.get('tasks')} != {names} or no components"
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (plan.get("search_space_log10"),)):
            return "search_space_log10 is not finite"
    return check


def predictions_ok(world: World, dest: Path | None, *, lines: list | None, task: str | None):
    """Each prediction names a task of the library (the --task one, if given), one of its labels, a score in
    [0, 1]; input line numbers in order; exactly the expected lines when they are known."""
    def check(out: Outcome):
        text = dest.read_text(encoding="utf-8") if dest is not None else out.stdout
        got = []
        for raw in text.splitlines():
            try:
                p = json.loads(raw)
            except ValueError:
                return f"prediction line is not JSON: {raw[:100]!r}"
            t, score = p.get("task"), p.get("score")
            if t not in world.labels or (task and t != task):
                return f"prediction task {t!r}"
            if p.get("label") not in world.labels[t]:
                return f"label {p.get('label')!r} not among {world.labels[t]}"
            if not isinstance(score, float) or not (0.0 <= score <= 1.0):
                return f"score {score!r} is not a probability"
            got.append(p.get("line"))
        if got != sorted(got) or len(set(got)) != len(got):
            return f"line numbers out of order: {got[:20]}"
        if lines is not None and got != lines:
            return f"predicted lines {got[:20]}, expected {lines[:20]}"
    return check


DATA_CASES = [
    # (label, verdict, suffix, content: bytes, or a list of records written as JSON lines)
    ("good", OK, ".jsonl", None),
    ("long texts (past the position table)", OK, ".jsonl", [{"text": "w1 " * 3000, "label": j % 2} for j in range(4)]),
    ("csv", OK, ".csv", b"text,label\nw1 w2,0\nw3 w4,1\n"),
    ("empty file", BAD, ".jsonl", b""),
    ("blank lines only", BAD, ".jsonl", b"\n\n  \n"),
    ("not UTF-8", BAD, ".jsonl", b'{"text": "caf\xe9", "label": 0}\n'),
    ("a line that is not JSON", BAD, ".jsonl", b'{"text": "w1", "label": 0}\n{oops\n'),
    ("a JSON array line", BAD, ".jsonl", b"[1, 2]\n"),
    ("no label column", BAD, ".jsonl", [{"text": "w1"}] * 3),
    ("no text column", BAD, ".jsonl", [{"label": 0}] * 3),
    ("label out of range", BAD, ".jsonl", [{"text": "w1", "label": 7}, {"text": "w2", "label": 0}]),
    ("negative label", BAD, ".jsonl", [{"text": "w1", "label": -1}, {"text": "w2", "label": 0}]),
    ("fractional label", BAD, ".jsonl", [{"text": "w1", "label": 0.5}, {"text": "w2", "label": 1}]),
    ("null label", BAD, ".jsonl", [{"text": "w1", "label": None}]),
    ("list label", BAD, ".jsonl", [{"text": "w1", "label": [0]}]),
    ("unknown string label", BAD, ".jsonl", [{"text": "w1", "label": "zzz"}, {"text": "w2", "label": 0}]),
    ("string labels of the model", ANY, ".jsonl", [{"text": "w1", "label": "c0"}, {"text": "w2", "label": "c1"}]),
    ("bool label", ANY, ".jsonl", [{"text": "w1", "label": True}, {"text": "w2", "label": False}]),
    ("integer text", BAD, ".jsonl", [{"text": 5, "label": 0}]),
    ("null text", BAD, ".jsonl", [{"text": None, "label": 0}]),
    ("list text", BAD, ".jsonl", [{"text": ["w1"], "label": 0}]),
    ("dict text", BAD, ".jsonl", [{"text": {"a": "w1"}, "label": 0}]),
    ("empty text", ANY, ".jsonl", [{"text": "", "label": 0}, {"text": "w1", "label": 1}]),
    ("one example", ANY, ".jsonl", [{"text": "w1", "label": 0}]),
    ("NaN literal", BAD, ".jsonl", b'{"text": "w1", "label": NaN}\n'),
    ("1e400", BAD, ".jsonl", b'{"text": "w1", "label": 0, "x": 1e400}\n'),
    ("nested 100 deep", ANY, ".jsonl", b'{"text": "w1", "label": 0, "x": ' + nested(100).encode() + b"}\n"),
    ("broken csv", BAD, ".csv", b'text,label\n"w1,0\n'),
    ("csv without label", BAD, ".csv", b"text\nw1\n"),
    ("txt suffix", BAD, ".txt", b"w1 w2\n"),
    ("a folder", BAD, "/", None),
    ("missing file", BAD, "missing", None),
    ("BOM", ANY, ".jsonl", b'\xef\xbb\xbf{"text": "w1", "label": 0}\n{"text": "w2", "label": 1}\n'),
]


def data_case(ex: Path, case, base_rows) -> str:
    label, _, suffix, content = case
    if suffix == "/":
        (ex / "datadir").mkdir()
        return str(ex / "datadir")
    if suffix == "missing":
        return str(ex / "missing.jsonl")
    path = ex / f"data{suffix}"
    if content is None:
        write_jsonl(path, base_rows)
    elif isinstance(content, bytes):
        write(path, content)
    else:
        write_jsonl(path, content)
    return str(path)


def library_ok(world: World, lib: Path, ex: Path):
    """An exported library: manifest present, every file with the mode of manifest.json, and
    `inspect --verify` accepts it."""
    def check(out: Outcome):
        if not (lib / "manifest.json").is_file():
            return "no manifest.json in the exported library"
        mode = (lib / "manifest.json").stat().st_mode & 0o777
        odd = {p.name: oct(p.stat().st_mode & 0o777) for p in lib.iterdir() if p.stat().st_mode & 0o777 != mode}
        if odd:
            return f"files with another mode than manifest.json ({oct(mode)}): {odd}"
        i = run_cli(["inspect", lib, "--verify"], reads=[lib], watch=[lib])
        if i.exit_code != 0:
            return f"inspect --verify refuses the exported library: {i.stderr[:300]}"
    return check


def model_ok(out: Path, task: str):
    """export-model wrote a checkpoint that transformers loads with nothing missing or unexpected."""
    def check(o: Outcome):
        import transformers as tf

        try:
            _, info = tf.AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
        except Exception as e:  # noqa: BLE001
            return f"transformers cannot load the exported model: {type(e).__name__}: {str(e)[:200]}"
        if info["missing_keys"] or info["unexpected_keys"]:
            return f"missing {info['missing_keys'][:4]}, unexpected {info['unexpected_keys'][:4]} (initialised at random)"
    return check
