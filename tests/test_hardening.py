"""Regression tests for the hostile-user report (issue 17) on commands that write: one line, exit 2, nothing left.

Recipe-only cases (bombs, non-finite numbers, ranges, custom evaluators, patterns) are in test_bad_recipes.py;
tampered libraries in test_library_sanity.py; the property-based sweep in test_fuzz_*.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from routed import invoke, write_recipe

from mergetool.testing.toy import write_jsonl


def files_under(root: Path) -> set:
    return {(str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*")}


def one_line(result, text: str, needle: str) -> None:
    assert result.exit_code == 2, text
    assert "Traceback" not in text
    errors = [x for x in text.strip().splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and needle in errors[0], text


# --- outputs never land inside a library ----------------------------------------------------------------

def test_outputs_inside_a_library_are_refused(routed, tmp_path):
    lib = Path(routed["lib"])
    before = files_under(lib)
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "w1 w2"}\n')
    result, text = invoke("predict", lib, "--input", src, "--output", lib / "preds.jsonl", "-q")
    one_line(result, text, "inside the library")
    result, text = invoke("export-model", lib, "--task", "task0", "--out", lib / "model")
    one_line(result, text, "inside the library")
    result, text = invoke("export-model", lib, "--task", "task0", "--out", lib, "--force")
    one_line(result, text, "inside the library")
    result, text = invoke("export", routed["recipe"], "--grouping", routed["grouping"], "--out", lib / "nested")
    one_line(result, text, "inside the library")
    assert files_under(lib) == before
    result, text = invoke("inspect", lib, "--verify")
    assert result.exit_code == 0, text


# --- export runs the recipe's checks before writing anything ------------------------------------------------

def _export_refused(tmp_path: Path, zoo, routed, extra: str, needle: str, edit=None) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", zoo, extra=extra)
    if edit is not None:
        recipe.write_text(edit(recipe.read_text()))
    before = files_under(tmp_path)
    result, text = invoke("export", recipe, "--grouping", routed["grouping"], "--out", tmp_path / "lib")
    assert result.exit_code == 2 and needle in text and "Traceback" not in text, text
    assert files_under(tmp_path) == before  # no library, no run folder, no router cache


def test_export_refuses_what_validate_refuses(routed, tmp_path):
    zoo = routed["zoo"]
    val = str(zoo["data"]["task0"]["validation"])
    bad_labels = write_jsonl(tmp_path / "labels.jsonl", [{"text": "w1", "label": 7}])
    broken_csv = tmp_path / "broken.csv"
    broken_csv.write_text('text,label\n"w1,0\n')
    empty_router = tmp_path / "router.jsonl"
    empty_router.write_text("\n")
    (tmp_path / "folder.jsonl").mkdir()
    cases = [
        (str(bad_labels), "label"), (str(tmp_path / "missing.jsonl"), "not found"),
        (str(tmp_path / "folder.jsonl"), "not found"), (str(broken_csv), "broken.csv"),
    ]
    for i, (path, needle) in enumerate(cases):
        sub = tmp_path / f"case{i}"
        sub.mkdir()
        _export_refused(sub, zoo, routed, "", needle, edit=lambda t, p=path: t.replace(val, p, 1))
    sub = tmp_path / "router"
    sub.mkdir()
    router_split = str(zoo["data"]["task0"]["router"])
    _export_refused(sub, zoo, routed, "", "empty", edit=lambda t: t.replace(router_split, str(empty_router), 1))


def test_a_diverging_router_is_neither_cached_nor_shipped(routed, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", routed["zoo"], extra="router: {lr: 1.0e+30}\n")
    result, text = invoke("export", recipe, "--grouping", routed["grouping"], "--out", tmp_path / "lib")
    assert result.exit_code == 2 and "router training diverged" in text and "router.lr" in text, text
    assert not (tmp_path / "lib").exists()
    assert not list((tmp_path / "run").rglob("*.safetensors")) if (tmp_path / "run").exists() else True


# --- search: an unreachable executor is refused before the run folder is written --------------------------

def test_search_with_an_unreachable_ray_writes_nothing(routed, tmp_path, monkeypatch):
    from mergetool.core.errors import MergetoolError
    from mergetool.search import executors

    def unreachable(self):
        raise MergetoolError("cannot start or reach Ray at ray://nowhere:1", key="search.ray.address")

    monkeypatch.setattr(executors.RayExecutor, "connect", unreachable)
    recipe = write_recipe(tmp_path / "r.yaml", routed["zoo"])
    text = recipe.read_text()
    assert "search: {population: 6," in text
    recipe.write_text(text.replace("search: {population: 6,",
                                   "search: {executor: ray, ray: {address: 'ray://nowhere:1'}, population: 6,"))
    before = files_under(tmp_path)
    result, text = invoke("search", recipe, "-q")
    one_line(result, text, "cannot start or reach Ray")
    assert files_under(tmp_path) == before


# --- the CLI's own option parsing: one line, exit 2 ------------------------------------------------------

@pytest.mark.parametrize("args, needle", [
    (["predict", "LIB", "--batch-size", "many", "--input", "x"], "Invalid value for '--batch-size'"),
    (["predict", "LIB"], "Missing option '--input'"),
    (["export", "--shard-size"], "requires an argument"),
    (["no-such-command"], "No such command"),
    (["search", "r.yaml", "--no-such-option"], "No such option"),
    (["evaluate", "LIB"], "Missing option '--recipe'"),
])
def test_option_errors_are_one_line(args, needle):
    result, text = invoke(*args)
    one_line(result, text, needle)
    assert "Usage:" not in text and "╭" not in text


# --- models and data ---------------------------------------------------------------------------------

def test_task_specific_patterns_match_checkpoint_names(zoo_factory, data_files, tmp_path):
    """`^bert\\.pooler\\.` is the pooler's name in the checkpoint; it must make the pooler task-specific
    (before, names were normalised first and the pattern silently matched nothing)."""
    from mergetool.models.plan import build_plan
    from mergetool.recipe import load_recipe

    base, tasks = zoo_factory("bert")
    models = "\n".join(f"  - {{name: t{i}, model: {p}}}" for i, p in enumerate(tasks))
    task_lines = "\n".join(f"  t{i}: {{validation: {{path: {d}}}}}" for i, d in enumerate(data_files))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: ts\nbase_model: {base}\nmodels:\n{models}\ntasks:\n{task_lines}\n"
                      "components: {task_specific: ['^classifier\\.', '^bert\\.pooler\\.']}\n")
    plan = build_plan(load_recipe(recipe), check_values=False)
    assert any(n.startswith("pooler.") for n in plan.task_specific["t0"])
    assert not any(c.name.startswith("pooler") for c in plan.components)


def test_texts_longer_than_the_position_table_are_truncated(zoo_factory, tmp_path):
    """max_length above the model's position table is clamped to it, not an index error in the forward."""
    from mergetool.evaluation.tasks import load_task_data
    from mergetool.models.source import ModelSource, resolve_model_ref
    from mergetool.recipe import parse_recipe

    base, tasks = zoo_factory("bert")
    long_rows = [{"text": " ".join(["word"] * 5000), "label": i % 2} for i in range(4)]
    data = write_jsonl(tmp_path / "long.jsonl", long_rows)
    r = parse_recipe(f"name: x\nbase_model: {base}\nmodels: [{{name: a, model: {tasks[0]}}}, "
                     f"{{name: b, model: {tasks[1]}}}]\ntasks:\n  a: {{max_length: 100000, validation: {{path: {data}}}}}"
                     f"\n  b: {{validation: {{path: {data}}}}}\n", tmp_path / "r.yaml")
    src = ModelSource(resolve_model_ref(str(tasks[0])))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tasks[0]))
    td = load_task_data(r, "a", src.config, tok)
    positions = src.config["max_position_embeddings"]
    assert max(b["input_ids"].shape[1] for b in td.batches) == positions


def test_custom_evaluator_must_return_a_finite_number(tmp_path, monkeypatch):
    from mergetool.core.errors import DataError
    from mergetool.evaluation.metrics import custom_score

    (tmp_path / "my_evals_for_test.py").write_text(
        "def good(outputs, labels, records):\n    return 0.5\n"
        "def nan(outputs, labels, records):\n    return float('nan')\n"
        "def text(outputs, labels, records):\n    return 'high'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert custom_score("my_evals_for_test:good", "k", None, None, None) == 0.5
    for fn in ("nan", "text"):
        with pytest.raises(DataError, match="not a finite number"):
            custom_score(f"my_evals_for_test:{fn}", "k", None, None, None)
    with pytest.raises(DataError, match="cannot be called with 3 arguments"):
        custom_score("json:dumps", "k", None, None, None)


def test_a_refused_export_leaves_the_inputs_alone(routed, tmp_path):
    """A refused command leaves the user's own files byte for byte (the recipe, the data, the grouping)."""
    recipe = tmp_path / "r.yaml"
    shutil.copy(routed["recipe"], recipe)
    text_before = recipe.read_bytes()
    result, text = invoke("export", recipe, "--grouping", routed["grouping"], "--out", routed["lib"] / "x")
    assert result.exit_code == 2 and recipe.read_bytes() == text_before
    assert json.loads(Path(routed["grouping"]).read_text())["grouping"] == routed["G"].tolist()


# --- outputs that cannot be written are refused before any work --------------------------------------------

@pytest.mark.parametrize("where, needle", [("dir", "is a directory"), ("missing", "does not exist"),
                                           ("unwritable", "cannot write in")])
def test_unwritable_outputs_are_one_line_before_any_work(routed, tmp_path, where, needle):
    import os

    if where == "unwritable" and os.geteuid() == 0:
        target = Path("/proc/mergetool-test-out")  # root may write anywhere but /proc
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = locked / "o"
    target = {"dir": tmp_path, "missing": tmp_path / "no" / "o"}.get(where, target)
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "w1"}\n')
    runs = [("evaluate", routed["lib"], "--recipe", routed["recipe"], "--out", target),
            ("predict", routed["lib"], "--input", src, "--output", target, "-q")]
    if where == "unwritable":  # export and export-model create missing parent folders; a file is no folder
        runs += [("export-model", routed["lib"], "--task", "task0", "--out", target),
                 ("export", routed["recipe"], "--grouping", routed["grouping"], "--out", target)]
    for args in runs:
        result, text = invoke(*args)
        one_line(result, text, needle)


# --- found by the fuzz suite (test_fuzz_*.py): each a named regression test ----------------------------------

def test_file_names_longer_than_the_os_allows_are_one_line(routed, tmp_path):
    long = tmp_path / ("y" * 300)
    for args in (("validate", long), ("plan", long), ("inspect", long), ("front", long),
                 ("predict", routed["lib"], "--input", long, "-q")):
        result, text = invoke(*args)
        one_line(result, text, "File name too long")


def test_search_output_inside_a_library_is_refused(routed, tmp_path):
    lib = Path(routed["lib"])
    before = files_under(lib)
    recipe = write_recipe(tmp_path / "r.yaml", routed["zoo"])
    recipe.write_text(recipe.read_text().replace(f"output: {tmp_path / 'run'}", f"output: {lib / 'run'}"))
    result, text = invoke("search", recipe, "-q")
    one_line(result, text, "inside the library")
    assert files_under(lib) == before


def test_unknown_device_is_refused_before_anything_is_written_or_built(routed, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", routed["zoo"])
    before = files_under(tmp_path)
    result, text = invoke("search", recipe, "-q", "--device", "tpu")
    one_line(result, text, "tpu")
    result, text = invoke("export", recipe, "--grouping", routed["grouping"], "--out", tmp_path / "lib",
                          "--device", "tpu")
    one_line(result, text, "tpu")
    assert len(text.strip().splitlines()) == 1, text  # refused before the experts are built (no progress lines)
    assert files_under(tmp_path) == before


def test_a_deeply_nested_grouping_file_is_one_line(routed, tmp_path):
    g = tmp_path / "g.json"
    g.write_text('{"grouping": ' + "[" * 100_000 + "]" * 100_000 + "}")
    result, text = invoke("export", routed["recipe"], "--grouping", g, "--out", tmp_path / "lib")
    one_line(result, text, "nested deeper than")


def test_non_utf8_on_a_real_stdin_pipe_is_one_line(routed):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "mergetool", "predict", str(routed["lib"]), "--input", "-", "-q"],
                          input=b'{"text": "w1"}\n{"text": "caf\xe9"}\n', capture_output=True, timeout=300)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and "not UTF-8" in err and "Traceback" not in err, err


def test_front_refuses_edited_run_records(routed, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", routed["zoo"])
    recipe.write_text(recipe.read_text().replace("search: {population: 6, evaluations: 24,",
                                                 "search: {population: 4, evaluations: 4, racing: null,"))
    result, out = invoke("search", recipe, "-q")
    assert result.exit_code == 0, out
    run = tmp_path / "run"
    journal = run / "search" / "evaluations.jsonl"
    lines = journal.read_text().splitlines()
    journal.write_text("\n".join([json.dumps(dict(json.loads(lines[0]), i=None))] + lines[1:]) + "\n")
    result, text = invoke("front", run)
    one_line(result, text, "journal line 1")
    journal.write_text("\n".join(lines) + "\n")
    ref = run / "search" / "reference.json"
    ref.write_text(json.dumps(dict(json.loads(ref.read_text()), static_merge=None)))
    result, text = invoke("front", run)
    one_line(result, text, "reference.json")


def test_search_output_in_proc_is_one_line(routed, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", routed["zoo"])
    recipe.write_text(recipe.read_text().replace(f"output: {tmp_path / 'run'}", "output: /proc/mergetool-run"))
    before = files_under(tmp_path)
    result, text = invoke("search", recipe, "-q")
    one_line(result, text, "output")
    assert files_under(tmp_path) == before
