"""`mergetool search` end to end on trained toy models: outputs, resume after kill -9, Ray, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mergetool.cli.app import app
from mergetool.testing.toy import trained_recipe, write_jsonl

runner = CliRunner()
BUDGET, POP = 16, 6


def write_recipe(tmp: Path, zoo: dict, **kw) -> Path:
    path = tmp / "toy.yaml"
    path.write_text(trained_recipe(zoo, evaluations=kw.pop("evaluations", BUDGET), population=POP, **kw))
    return path


def journal(run: Path) -> list[dict]:
    lines = (run / "search" / "evaluations.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if x.strip()]


def decisions(run: Path) -> list[tuple]:
    """Racing's decisions: (plan index, grouping, completed?) of every candidate scored on the subset."""
    lines = (run / "search" / "partial.jsonl").read_text().splitlines()
    return sorted((r["i"], json.dumps(r["grouping"]), r["continued"]) for r in map(json.loads, lines))


def front(run: Path) -> list[tuple]:
    data = json.loads((run / "search" / "front.json").read_text())
    return sorted((json.dumps(f["grouping"]), round(f["performance"], 12), round(f["storage_cost"], 12)) for f in data)


@pytest.fixture(scope="module")
def finished(trained_zoo, tmp_path_factory):
    """One uninterrupted search, shared by the tests below."""
    tmp = tmp_path_factory.mktemp("search")
    recipe = write_recipe(tmp, trained_zoo)
    result = runner.invoke(app, ["search", str(recipe), "--quiet"])
    assert result.exit_code == 0, result.output
    return tmp / "runs" / "toy"


def test_outputs(finished):
    s = finished / "search"
    for name in ("evaluations.jsonl", "front.json", "hv.csv", "pareto.png", "hv.png", "summary.md",
                 "reference.json", "test_scores.json"):
        assert (s / name).is_file(), name
    recs = journal(finished)
    assert len(recs) == BUDGET and len({json.dumps(r["grouping"]) for r in recs}) == BUDGET
    fr = json.loads((s / "front.json").read_text())
    assert len({round(f["storage_cost"], 9) for f in fr}) >= 3
    assert {"id", "grouping", "performance", "storage_cost", "per_task"} <= set(fr[0])
    summary = (s / "summary.md").read_text()
    assert "G1" in summary and "G3" in summary and "Kendall" in summary
    screened = int(summary.split("candidates screened by the surrogate: ")[1].split()[0])
    assert screened > BUDGET  # the surrogate predicted more candidates than were evaluated for real
    assert any(r.get("predicted_performance") is not None for r in recs)
    ref = json.loads((s / "reference.json").read_text())
    assert ref["individual"]["validation"]["performance"] > ref["static_merge"]["validation"]["performance"]
    assert json.loads((finished / "run.json").read_text())["recipe_sha256"]


def test_racing_report_and_no_racing_ablation(trained_zoo, finished, tmp_path):
    """The summary counts full and partial evaluations and inputs run; --no-racing scores every candidate
    on all inputs (no partial journal, contiguous plan numbering)."""
    summary = (finished / "search" / "summary.md").read_text()
    line = summary.split("- racing: ")[1].splitlines()[0]
    full, partial = int(line.split()[0]), int(line.split(" and ")[1].split()[0])
    assert full == BUDGET and partial > 0 and "validation inputs run" in line
    recipe = write_recipe(tmp_path, trained_zoo)
    result = runner.invoke(app, ["search", str(recipe), "--quiet", "--no-racing"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "toy"
    assert not (run / "search" / "partial.jsonl").exists()
    assert [r["i"] for r in journal(run)] == list(range(BUDGET))
    assert "- racing: off" in (run / "search" / "summary.md").read_text()


def test_front_command(finished):
    result = runner.invoke(app, ["front", str(finished)])
    assert result.exit_code == 0, result.output
    assert "Pareto front" in result.stdout


def test_resume_after_kill(trained_zoo, finished, tmp_path):
    """kill -9 mid-search, then --resume: nothing repeated, budget kept, same front as uninterrupted."""
    recipe = write_recipe(tmp_path, trained_zoo)
    run = tmp_path / "runs" / "toy"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "mergetool", "search", str(recipe), "--quiet"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        j = run / "search" / "evaluations.jsonl"
        if j.is_file() and len(j.read_text().splitlines()) >= 5:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "search finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(journal(run))
    assert 5 <= done < BUDGET
    again = runner.invoke(app, ["search", str(recipe), "--quiet"])
    assert again.exit_code == 2 and "--resume" in again.stderr  # no silent restart
    result = runner.invoke(app, ["search", str(recipe), "--resume", "--quiet"])
    assert result.exit_code == 0, result.output
    recs = journal(run)
    assert len(recs) == BUDGET
    # racing (on by default): full and partial evaluations share the plan numbering, without gaps or repeats
    partial = [json.loads(line)["i"] for line in (run / "search" / "partial.jsonl").read_text().splitlines()]
    planned = sorted([r["i"] for r in recs] + [i for i in partial if i not in {r["i"] for r in recs}])
    assert planned == list(range(len(planned)))
    summary = (run / "search" / "summary.md").read_text()
    assert f"evaluated in this process: {BUDGET - done}" in summary
    assert front(run) == front(finished)
    assert decisions(run) == decisions(finished) and any(not c for _, _, c in decisions(run))


def test_moved_run_dir_resumes_with_a_larger_budget(trained_zoo, finished, tmp_path):
    """A run directory copied elsewhere (new `output`) still resumes; the budget may grow."""
    import shutil

    moved = tmp_path / "elsewhere" / "toy-run"
    shutil.copytree(finished, moved)
    recipe = write_recipe(tmp_path, trained_zoo, evaluations=BUDGET + 2, extra=f"output: {moved}\n")
    result = runner.invoke(app, ["search", str(recipe), "--resume", "--quiet"])
    assert result.exit_code == 0, result.output
    recs = journal(moved)
    assert len(recs) == BUDGET + 2 and recs[:BUDGET] == journal(finished)


def test_ray_executor_same_front(trained_zoo, finished, tmp_path):
    pytest.importorskip("ray") if os.environ.get("CI", "").lower() not in ("1", "true") else None
    recipe = write_recipe(tmp_path, trained_zoo, extra="")
    text = recipe.read_text().replace("search: {", "search: {executor: ray, ray: {address: local, num_workers: 2}, ")
    recipe.write_text(text)
    result = runner.invoke(app, ["search", str(recipe), "--quiet"])
    assert result.exit_code == 0, result.output
    assert front(tmp_path / "runs" / "toy") == front(finished)
    assert decisions(tmp_path / "runs" / "toy") == decisions(finished)  # racing decides the same on Ray


def test_other_recipe_in_run_dir_refused(trained_zoo, finished, tmp_path):
    recipe = write_recipe(tmp_path, trained_zoo)
    assert runner.invoke(app, ["search", str(recipe), "--quiet", "--evaluations", "6"]).exit_code == 0
    changed = tmp_path / "toy.yaml"
    changed.write_text(changed.read_text().replace("lambda: 0.5", "lambda: 0.4"))
    result = runner.invoke(app, ["search", str(changed), "--resume", "--quiet"])
    assert result.exit_code == 2 and "different recipe" in result.stderr and "--force" in result.stderr
    before = sorted(p.name for p in (tmp_path / "runs" / "toy" / "search").iterdir())
    assert "evaluations.jsonl" in before


@pytest.mark.parametrize("case", ["empty_validation", "label_not_a_class", "budget_below_population"])
def test_bad_input(case, trained_zoo, tmp_path):
    recipe = write_recipe(tmp_path, trained_zoo)
    text = recipe.read_text()
    task0_val = str(trained_zoo["data"]["task0"]["validation"])
    if case == "empty_validation":
        (tmp_path / "empty.jsonl").write_text("")
        text = text.replace(task0_val, str(tmp_path / "empty.jsonl"))
    elif case == "label_not_a_class":
        write_jsonl(tmp_path / "odd.jsonl", [{"text": "w1 w2", "label": "class9"}])
        text = text.replace(task0_val, str(tmp_path / "odd.jsonl"))
    else:
        text = text.replace(f"evaluations: {BUDGET}", "evaluations: 3")
    recipe.write_text(text)
    result = runner.invoke(app, ["search", str(recipe), "--quiet"])
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    expected = {"empty_validation": "empty", "label_not_a_class": "class9",
                "budget_below_population": "smaller than population"}[case]
    assert expected in result.stderr
    assert not (tmp_path / "runs").exists()  # nothing written


def test_shipped_tiny_recipe_validates(trained_zoo, tmp_path, monkeypatch):
    """merge_recipes/tiny-bert.yaml validates offline against the trained toy zoo it is written for."""
    (tmp_path / "zoo").symlink_to(trained_zoo["base"].parent, target_is_directory=True)
    monkeypatch.setenv("MERGETOOL_TINY_DIR", str(tmp_path))
    recipe = Path(__file__).resolve().parent.parent / "merge_recipes" / "tiny-bert.yaml"
    result = runner.invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "T=3 tasks, L=8 components" in result.stdout


def test_bf16_screening_rescores_the_front_at_fp32(trained_zoo, tmp_path):
    """--precision bf16: the journal holds bf16 scores; the front (and G1/G2/G3) are re-scored at fp32."""
    from mergetool.core.grouping import key
    from mergetool.pipeline.session import Session
    from mergetool.recipe import load_recipe

    recipe = write_recipe(tmp_path, trained_zoo)
    result = runner.invoke(app, ["search", str(recipe), "--quiet", "--precision", "bf16", "--evaluations", "12"])
    assert result.exit_code == 0, result.output
    from mergetool.evaluation.runner import bf16_native

    assert ("emulated and slower than fp32" in result.stderr) == (not bf16_native(torch.device("cpu")))
    run = tmp_path / "runs" / "toy" / "search"
    rescored = [json.loads(x) for x in (run / "rescored.jsonl").read_text().splitlines()]
    fr = json.loads((run / "front.json").read_text())
    assert fr and {f["id"] for f in fr} <= {r["i"] for r in rescored}
    fp32 = Session(load_recipe(recipe), device="cpu").evaluator("validation")
    for f in fr:
        assert f["performance"] == fp32.evaluate(np.asarray(f["grouping"])).performance  # fp32, exactly
    screened = {key(r["grouping"]): r["performance"] for r in journal(tmp_path / "runs" / "toy")}
    for r in rescored:
        assert abs(r["screened_performance"] - screened[key(r["grouping"])]) < 1e-12
        assert abs(r["performance"] - r["screened_performance"]) < 0.1  # bf16 ranks, fp32 decides


def test_output_that_is_not_a_folder_or_a_corrupt_run_record(trained_zoo, tmp_path):
    """`output` naming a file or a path under one, and an unreadable run.json: one line, exit 2."""
    afile = tmp_path / "afile.txt"
    afile.write_text("x")
    for out, expected in ((afile, "is a file, not a folder"), (afile / "run", "which is a file")):
        recipe = write_recipe(tmp_path, trained_zoo, extra=f"output: {out}\n")
        result = runner.invoke(app, ["search", str(recipe), "--quiet"])
        assert result.exit_code == 2 and expected in result.stderr and "Traceback" not in result.output
    assert afile.read_text() == "x"
    run = tmp_path / "runs" / "toy"
    run.mkdir(parents=True)
    (run / "run.json").write_text("{not json")
    recipe = write_recipe(tmp_path, trained_zoo)
    result = runner.invoke(app, ["search", str(recipe), "--quiet", "--resume"])
    assert result.exit_code == 2 and "not a readable run record" in result.stderr and "--force" in result.stderr
    assert sorted(p.name for p in run.iterdir()) == ["run.json"]


def test_front_command_on_corrupt_records(finished, tmp_path):
    """A corrupt front.json or reference.json: one line naming the file, exit 2, no traceback."""
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(finished, run)
    (run / "search" / "reference.json").write_text("[1, 2")
    result = runner.invoke(app, ["front", str(run)])
    assert result.exit_code == 2 and "reference.json is not a readable JSON record" in result.stderr
    (run / "search" / "front.json").write_text("{bad")
    result = runner.invoke(app, ["front", str(run)])
    assert result.exit_code == 2 and "front.json is not a list" in result.stderr and "Traceback" not in result.output
