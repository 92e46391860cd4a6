"""The benchmark scripts read baselines.json as `mergetool baselines` writes it (entry + variants by storage)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
codec_goals = pytest.importorskip("codec_goals")
table1 = pytest.importorskip("table1")

from mergetool.baselines.common import entry  # noqa: E402
from mergetool.baselines.routed import _add  # noqa: E402


def _scored(oracle: float, backbone: float, e2e: float) -> dict:
    s = lambda p: {"performance": p, "per_task": {"a": p}}  # noqa: E731
    prot = {"oracle": {"validation": s(oracle + 0.01), "test": s(oracle)},
            "backbone_routed": {"validation": s(backbone + 0.01), "test": s(backbone)},
            "end_to_end": {"validation": s(e2e + 0.01), "test": s(e2e)}}
    return {"validation": prot["backbone_routed"]["validation"], "test": prot["backbone_routed"]["test"],
            "protocols": prot}


def _baselines() -> dict:
    run = SimpleNamespace(out=[])
    variants = [{"storage_cost": c, "storage_breakdown": {"storage": st}, **_scored(*ps),
                 "routing": {"accuracy": {"test": 0.98}}}
                for c, st, ps in ((1.25, "fp32", (0.80, 0.79, 0.78)), (0.75, "fp16", (0.70, 0.69, 0.68)))]
    _add(run, "TALL masks", "tall", {}, variants)
    run.out.append(entry("TA (tuned)", "ta", "static", 1.0, (0.60, {"a": 0.60}), (0.55, {"a": 0.55})))
    run.out.append(entry("Individual (fp32)", "individual", "individual", 4.0, (0.9, {"a": 0.9}), (0.9, {"a": 0.9})))
    return {"methods": run.out}


def test_codec_goals_reads_every_variant_under_every_protocol():
    points = {p["name"]: p for p in codec_goals.baseline_points(_baselines())}
    assert set(points) == {"TALL masks [fp32]", "TALL masks [fp16]", "TA (tuned)"}  # references are not points
    assert points["TALL masks [fp16]"]["C"] == 0.75
    assert points["TALL masks [fp16]"]["test"] == {"oracle": 0.70, "backbone_routed": 0.69, "end_to_end": 0.68}
    assert points["TA (tuned)"]["test"] == {"oracle": 0.55}


def test_table1_rows_show_three_protocols_per_storage():
    rows = [r for m in _baselines()["methods"] for r in table1.baseline_rows(m)]
    assert rows[0] == "| TALL masks | 1.2500 | 0.8100 | 0.8000 | 0.7900 | 0.7800 |"
    assert rows[1] == "| TALL masks [fp16] | 0.7500 | 0.7100 | 0.7000 | 0.6900 | 0.6800 |"
    assert rows[2] == "| TA (tuned) | 1.0000 | 0.6000 | 0.5500 | – | – |"


def _front_run(tmp_path: Path) -> Path:
    """A finished run directory as `mergetool search` leaves it: front, references, test scores."""
    import json
    run = tmp_path / "seed-0"
    (run / "search").mkdir(parents=True)
    front = [{"id": i, "grouping": [[0, 0, 0], [int(j < i) for j in range(3)]], "storage_cost": c, "performance": p}
             for i, c, p in ((1, 0.3, 0.70), (2, 0.5, 0.80), (3, 0.9, 0.90))]
    (run / "search" / "front.json").write_text(json.dumps(front))
    static = {"storage_cost": 0.25, "validation": {"performance": 0.65}, "test": {"performance": 0.60}}
    (run / "search" / "reference.json").write_text(json.dumps({"static_merge": static, "individual": static}))
    tests = {table1.solution_key(f): {"performance": f["performance"] - 0.05} for f in front}
    (run / "search" / "test_scores.json").write_text(json.dumps(tests))
    return run


def test_table1_variant_picks_and_bars(tmp_path, monkeypatch):
    run = _front_run(tmp_path)
    exported = []
    monkeypatch.setattr(table1, "exported_test", lambda r, sid, recipe, device: exported.append(sid) or
                        {"mean": {"backbone_routed": 0.7, "end_to_end": 0.69, "oracle": 0.71}, "routing_accuracy": 0.99})
    baselines = {"methods": [entry("TA", "ta", "static", 1.0, (0.75, {"a": 0.75}), (0.72, {"a": 0.72}))]}
    picks = table1.pick_scores({0: run}, run, baselines, Path("r.yaml"), "cpu")
    assert picks["static"]["test"] == [0.60] and picks["static"]["C"] == [0.25]
    assert picks["G1"]["C"] == [0.3] and picks["G1"]["test"] == [pytest.approx(0.65)]  # cheapest above 0.65
    assert picks["G2"]["C"] == [0.5]  # cheapest above TA's validation 0.75
    assert picks["G3"]["C"] == [0.9] and exported == [2, 3]  # only G2/G3 are exported and routed
    assert picks["G2"]["backbone"] == [0.7] and picks["G3"]["routed"] == [0.69]
    assert table1.bar("G1", 0.65, 0.60, "x").startswith("G1: met (0.6500 vs 0.6000, +0.0500")
    assert table1.bar("G2", 0.70, 0.72, "x").startswith("G2: missed (0.7000 vs 0.7200, -0.0200")
    assert table1.bar("G2", None, 0.72, "x") == "G2: not measured (x)"


def test_table1_variant_search_recipes_carry_the_papers_settings(tmp_path, monkeypatch):
    import yaml
    seen = []

    def fake(*args):
        seen.append(yaml.safe_load(Path(args[1]).read_text()))
    monkeypatch.setattr(table1, "mergetool", fake)
    data = {"name": "r", "merge": {"method": "ta", "parameters": {"lambda": 0.5}}, "search": {"population": 20}}
    runs = table1.search_runs(data, tmp_path, tmp_path / "bc", [0, 1], 150, "cpu", merge=table1.variant_settings("bc"))
    assert runs == {0: tmp_path / "bc" / "seed-0", 1: tmp_path / "bc" / "seed-1"}
    assert [d["search"] for d in seen] == [{"population": 20, "seed": 0, "evaluations": 150},
                                           {"population": 20, "seed": 1, "evaluations": 150}]
    assert seen[0]["merge"] == {"method": "breadcrumbs", "parameters": {"density": 0.09, "gamma": 0.01, "lambda": 0.3}}
    assert seen[0]["output"] == str(tmp_path / "bc" / "seed-0")
    assert not list(tmp_path.glob(".table1-*"))  # the temporary recipes are gone
    assert table1.search_runs(data, tmp_path, tmp_path / "own", [0], 10, "cpu")[0].name == "seed-0"
    assert seen[-1]["merge"] == data["merge"]  # without --methods: the recipe's own merge


def test_table1_refuses_an_unknown_variant_before_writing(tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    monkeypatch.setattr(sys, "argv", ["table1.py", str(tmp_path / "r.yaml"), "--methods", "wa,dare",
                                      "--workdir", str(work), "--no-write"])
    with pytest.raises(SystemExit) as exit_info:
        table1.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--methods" in err and "'dare'" in err and "ties = tm" in err
    assert not work.exists()


def test_time_to_target_keeps_finished_runs_and_restarts_killed_ones(tmp_path, monkeypatch):
    ttt = pytest.importorskip("time_to_target")
    calls = []

    def fake_run(recipe, name, seed, evaluations, workdir, device, deadline=None):
        calls.append((name, seed))
        folder = ttt.run_dir(workdir, name, seed)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "evaluations.jsonl").write_text("{}\n")
        return {"records": [{"i": 0, "performance": 0.5, "storage_cost": 1.0}], "times": [1.5],
                "front": [], "wall": 2.0 + len(calls), "full": 1, "partial": 0, "examples": 10}

    monkeypatch.setattr(ttt, "run_one", fake_run)
    name = "(iii) + racing"
    first = ttt.timed_run(None, name, 0, 5, tmp_path, "cpu")
    again = ttt.timed_run(None, name, 0, 5, tmp_path, "cpu")  # a later sitting reads it back
    assert calls == [(name, 0)] and again == first and first["wall"] == 3.0
    ttt.timed_run(None, name, 0, 6, tmp_path, "cpu")  # another budget is another measurement
    killed = ttt.run_dir(tmp_path, "(i) plain NSGA-II", 1)
    killed.mkdir(parents=True)
    (killed / "evaluations.jsonl").write_text('{"stale": true}\n')  # a run killed before its result
    ttt.timed_run(None, "(i) plain NSGA-II", 1, 5, tmp_path, "cpu")
    assert len(calls) == 3 and (killed / "evaluations.jsonl").read_text() == "{}\n"  # restarted from nothing


def test_time_to_target_hv_point_is_the_best_static_merge_of_the_named_baselines(tmp_path, monkeypatch):
    ttt = pytest.importorskip("time_to_target")
    methods = [{"kind": "mtl", "name": "Traditional MTL", "validation": {"performance": 0.85}},
               {"kind": "static", "name": "Task Arithmetic", "validation": {"performance": 0.73}},
               {"kind": "static", "name": "RegMean", "validation": {"performance": 0.8225}},
               {"kind": "dynamic", "name": "Twin-Merging", "validation": {"performance": 0.87}}]
    path = tmp_path / "baselines.json"
    path.write_text(json.dumps({"methods": methods}))
    monkeypatch.setattr(ttt, "references", lambda session, d: {"static_merge": {"validation": {"performance": 0.7}}})
    p, what = ttt.static_p(ttt.best_static(path), path, tmp_path / "run", None)
    assert p == 0.8225 and what.startswith("RegMean, the best static merge in")  # not MTL, not a dynamic method
    absent = tmp_path / "absent.json"
    p, what = ttt.static_p(ttt.best_static(absent), absent, tmp_path / "run", None)
    assert p == 0.7 and what.startswith("the recipe's own merge")


@pytest.mark.parametrize("content", [None, '{"methods": [{"kind": "dynamic", "name": "Twin-Merging", '
                                     '"validation": {"performance": 0.87}}]}', "{not json"])
def test_time_to_target_refuses_named_baselines_without_a_static_merge(tmp_path, monkeypatch, capsys, content):
    ttt = pytest.importorskip("time_to_target")
    named = tmp_path / "baselines.json"
    if content is not None:
        named.write_text(content)
    monkeypatch.setattr(ttt, "load_recipe", lambda path: pytest.fail("read the recipe before refusing"))
    monkeypatch.setattr(sys, "argv", ["time_to_target.py", "recipe.yaml", "--baselines", str(named),
                                      "--workdir", str(tmp_path / "work")])
    with pytest.raises(SystemExit) as exit_info:
        ttt.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--baselines" in err and "fix" in err
    assert not (tmp_path / "work").exists()


def test_time_to_target_run_folders_are_named_by_the_configuration_numeral(tmp_path):
    ttt = pytest.importorskip("time_to_target")
    names = [ttt.run_dir(tmp_path, name, 1).name for name in ttt.CONFIGS]
    assert names == ["1-i", "1-ii", "1-iii", "1-iv"]


def test_time_to_target_kept_only_tabulates_what_is_kept_and_runs_nothing(tmp_path, monkeypatch):
    ttt = pytest.importorskip("time_to_target")
    monkeypatch.setattr(ttt, "run_one", lambda *a: pytest.fail("--kept-only ran a search"))
    plain, fast = "(i) plain NSGA-II", "(iv) + racing + bf16"
    for name, seed, times in [(plain, 0, [10.0, 100.0]), (fast, 0, [5.0, 15.0]), (plain, 1, [10.0, 50.0])]:
        ttt.write_json_atomic(ttt.run_dir(tmp_path, name, seed) / "result.json", {
            "evaluations": 2, "times": times, "wall": times[-1] + 1, "full": 2, "partial": 0, "examples": 9,
            "records": [{"i": 0, "performance": 0.6, "storage_cost": 1.0},
                        {"i": 1, "performance": 0.9, "storage_cost": 1.0}],
            "front": [{"grouping": None, "performance": 0.9, "storage_cost": 1.0}]})
    args = SimpleNamespace(seeds=[0, 1], plain_cap=2, kept_only=True, share=0.95, device="cpu", deadline=None)
    rows, hits, runs = ttt.tabulate(args, None, [plain, fast], 2, tmp_path, (0.5, 4.0), 0.95 * 1.2)
    assert rows[2].startswith("| (i) plain NSGA-II | 0 | 100 | 1.000 |")  # HV 1.2 first reached at the 2nd
    assert rows[-1] == "| (iv) + racing + bf16 | 1 | not run | | | | | |"
    assert hits == {plain: {0: (100.0, 101.0), 1: (50.0, 51.0)}, fast: {0: (15.0, 16.0)}}
    assert sorted(runs) == [(plain, 0), (plain, 1), (fast, 0)]
    goal = ttt._goal(hits)  # paired on the seed both ran: 15 / 100
    assert "seeds [0]: [0.15], mean 0.150 → **met**" in goal


def test_time_to_target_kept_only_needs_the_workdir(monkeypatch, capsys):
    ttt = pytest.importorskip("time_to_target")
    monkeypatch.setattr(sys, "argv", ["time_to_target.py", "recipe.yaml", "--kept-only"])
    with pytest.raises(SystemExit) as exit_info:
        ttt.main()
    assert exit_info.value.code == 2 and "--workdir" in capsys.readouterr().err.strip().splitlines()[-1]


def test_time_to_target_parity_times_each_run_to_the_hv_plain_nsga_ended_with():
    ttt = pytest.importorskip("time_to_target")
    rec = lambda i, p: {"i": i, "performance": p, "storage_cost": 1.0}  # noqa: E731
    plain = {"records": [rec(0, 0.6), rec(1, 0.8), rec(2, 0.7)], "times": [10.0, 40.0, 50.0],
             "front": [{"grouping": None, "performance": 0.8, "storage_cost": 1.0}]}
    fast = {"records": [rec(0, 0.85)], "times": [8.0], "front": []}
    slow = {"records": [rec(0, 0.7)], "times": [5.0], "front": []}
    runs = {(ttt.PLAIN, 0): plain, ("(iii) + racing", 0): fast, ("(iv) + racing + bf16", 0): slow,
            ("(iii) + racing", 1): fast}
    lines = ttt.plain_parity(runs, (0.5, 4.0), 1.8)  # (i) ended at HV (0.8 - 0.5) × 3 = 0.9 = half the reference
    assert lines[3] == "| seed | (i)'s final HV / reference | (i) | (iii) | (iv) |"
    assert lines[-1] == "| 0 | 0.500 | 40 (1.00) | 8 (0.20) | not reached |"  # seed 1 has no (i) run: no row
    assert ttt.plain_parity({("(iii) + racing", 0): fast}, (0.5, 4.0), 1.8) == []


def test_time_to_target_deadline_stops_a_run_and_keeps_what_its_journals_hold(tmp_path):
    ttt = pytest.importorskip("time_to_target")
    problem = SimpleNamespace(T=2, L=3, evaluate=lambda G: "full", evaluate_subset=lambda G: "subset", storage_cost=7)
    open_ended = ttt.Clocked(problem)
    assert open_ended.evaluate(None) == "full" and open_ended.evaluate_subset(None) == "subset"
    assert open_ended.storage_cost == 7 and len(open_ended.finished) == 1
    late = ttt.Clocked(problem, deadline=1e-9)
    for call in (late.evaluate, late.evaluate_subset):
        with pytest.raises(ttt.DeadlineReached):
            call(None)
    journal = tmp_path / "evaluations.jsonl"
    rec = lambda i, p, c, n: {"i": i, "grouping": [[i]], "per_task": {"a": p}, "performance": p,  # noqa: E731
                              "storage_cost": c, "cache": {"examples": n}, "predicted_performance": None,
                              "seconds": 1.0, "generation": 0}
    full = [rec(1, 0.8, 1.0, 800), rec(0, 0.7, 2.0, 800)]
    subset = [dict(rec(1, 0.8, 1.0, 200), continued=True), dict(rec(2, 0.6, 1.5, 200), continued=False)]
    journal.write_text("".join(json.dumps(r) + "\n" for r in full))
    journal.with_name(ttt.PARTIAL_NAME).write_text("".join(json.dumps(r) + "\n" for r in subset))
    run = ttt.stopped_run(journal, late)
    assert [r["i"] for r in run["records"]] == [0, 1] and [f["i"] for f in run["front"]] == [1]
    assert (run["full"], run["partial"], run["examples"], run["deadline"]) == (2, 1, 2000, 1e-9)


def test_time_to_target_a_run_stopped_at_a_deadline_is_kept_as_such(tmp_path):
    ttt = pytest.importorskip("time_to_target")
    name = "(iv) + racing + bf16"
    ttt.write_json_atomic(ttt.run_dir(tmp_path, name, 0) / "result.json", {"evaluations": 150, "deadline": 465.0})
    assert ttt.kept_run(tmp_path, name, 0, 150) is None  # a whole run is asked for: run it again
    assert ttt.kept_run(tmp_path, name, 0, 150, 465.0)["deadline"] == 465.0
    assert ttt.kept_run(tmp_path, name, 0, 150, 300.0) is None
    assert ttt.kept_run(tmp_path, name, 0, 150, ttt.ANY_DEADLINE) is not None  # --kept-only reads it
    assert ttt.kept_run(tmp_path, name, 0, 100, ttt.ANY_DEADLINE) is None


def test_time_to_target_refuses_a_deadline_that_is_not_positive(monkeypatch, capsys, tmp_path):
    ttt = pytest.importorskip("time_to_target")
    monkeypatch.setattr(sys, "argv", ["time_to_target.py", "recipe.yaml", "--deadline", "0",
                                      "--workdir", str(tmp_path / "work")])
    with pytest.raises(SystemExit) as exit_info:
        ttt.main()
    assert exit_info.value.code == 2 and "--deadline" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "work").exists()
