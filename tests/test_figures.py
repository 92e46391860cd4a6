"""pareto.png with the reference and baseline points, relations.png (paper Fig. 5), `front --plots`.

A fake run directory (no models): run.json, the search's records, reference.json, baselines.json and the
component kinds cached in search/components.json, as the search command leaves them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mergetool.pipeline.figures import (
    UNKNOWN_KIND,
    component_kinds,
    redraw_figures,
    reference_points,
    relation_weights,
)

PNG = b"\x89PNG\r\n\x1a\n"
TASKS = ["alpha", "beta_task_with_long_name", "gamma"]
KINDS = ["embeddings", "attention", "mlp", "attention", "mlp"]
FRONT_G = [  # T=3 x L=5
    [[0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]],
    [[0, 0, 0, 0, 0], [0, 1, 0, 1, 0], [1, 1, 1, 1, 1]],
    [[0, 0, 0, 0, 0], [1, 1, 1, 1, 1], [2, 2, 2, 2, 2]],
]


def _recipe_text(root: Path) -> str:
    lines = ["name: fake", f"base_model: {root / 'no-base'}", "models:"]
    lines += [f"  - {{name: {t}, model: {root / ('no-' + t)}}}" for t in TASKS]
    lines += ["tasks:"] + [f"  {t}: {{validation: {{path: {root / (t + '.jsonl')}}}}}" for t in TASKS]
    return "\n".join(lines + [f"output: {root / 'run'}"]) + "\n"


def _score(p: float) -> dict:
    return {"performance": p, "per_task": {t: p for t in TASKS}}


def _method(name, key, kind, cost, p, **extra) -> dict:
    return {"name": name, "id": key, "kind": kind, "storage_cost": cost, "validation": _score(p), "test": None,
            "params": {}, **extra}


BASELINES = {"split": "validation", "tasks": TASKS, "methods": [
    _method("Individual (fp32)", "individual", "individual", 3.0, 0.9),
    _method("Individual (8-bit)", "individual_8bit", "individual", 0.8, 0.89),
    _method("Pre-trained", "pretrained", "pretrained", 1.0, 0.4),
    _method("Weight Averaging", "wa", "static", 1.0, 0.6),
    _method("Task Arithmetic", "ta", "static", 1.0, 0.65),
    _method("Twin-Merging", "twin", "dynamic", 1.6, 0.85),
    _method("TALL masks", "tall", "dynamic", 2.1, 0.88,
            variants={"fp16": {"storage_cost": 1.1, "validation": _score(0.87), "test": None}}),
    {"name": "Broken", "id": "broken", "kind": "static", "storage_cost": 1.0, "validation": None},
]}


@pytest.fixture
def run_dir(tmp_path) -> Path:
    run = tmp_path / "run"
    (run / "search").mkdir(parents=True)
    (run / "baselines").mkdir()
    (run / "run.json").write_text(json.dumps({"recipe_path": None, "recipe_sha256": "x",
                                              "recipe_text": _recipe_text(tmp_path)}))
    costs, perfs = [0.5, 1.2, 3.0], [0.6, 0.8, 0.9]
    front = [{"id": i, "grouping": g, "performance": p, "storage_cost": c, "per_task": {t: p for t in TASKS}}
             for i, (g, c, p) in enumerate(zip(FRONT_G, costs, perfs))]
    front[1]["codecs"] = ["full", "delta_quant", "full", "full", "full"]  # a codec-menu search's labels
    (run / "search" / "front.json").write_text(json.dumps(front))
    recs = [dict(f, i=f["id"], predicted_performance=None, seconds=0.1, cache={}, generation=0) for f in front]
    recs.append({**recs[0], "i": 3, "performance": 0.3, "storage_cost": 2.0})
    for r in recs:
        r.pop("id")
    (run / "search" / "evaluations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    ref = lambda c, p: {"grouping": [], "storage_cost": c, "validation": _score(p)}  # noqa: E731
    (run / "search" / "reference.json").write_text(json.dumps({"static_merge": ref(1.0, 0.62),
                                                               "individual": ref(3.0, 0.9)}))
    (run / "baselines" / "baselines.json").write_text(json.dumps(BASELINES))
    (run / "search" / "components.json").write_text(json.dumps(
        {"components": [{"name": f"c{i}", "kind": k} for i, k in enumerate(KINDS)]}))
    return run


def _is_png(path: Path) -> bool:
    import matplotlib.image

    return path.is_file() and path.read_bytes()[:8] == PNG and matplotlib.image.imread(path).ndim == 3


def _invoke(*args):
    from mergetool.cli.app import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    return result, result.stdout + (result.stderr or "")


def _one_line(result, text: str, needle: str) -> None:
    assert result.exit_code == 2, text
    assert "Traceback" not in text
    errors = [x for x in text.strip().splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and needle in errors[0], text


# --- the relation weights ---------------------------------------------------------------------------------

def test_relation_weights_on_literal_groupings():
    w = relation_weights(FRONT_G, KINDS)
    assert list(w) == ["embeddings", "attention", "mlp"]  # order of first appearance
    assert all(m.shape == (3, 3) and np.allclose(np.diag(m), 1) and np.allclose(m, m.T) for m in w.values())
    # embeddings (1 component): 0-1 share in solutions 0 and 1, 0-2 and 1-2 in solution 0 only
    assert np.allclose(w["embeddings"], [[1, 2 / 3, 1 / 3], [2 / 3, 1, 1 / 3], [1 / 3, 1 / 3, 1]])
    # attention (components 1, 3): 0-1 in solution 0 only (2 of 6), 1-2 in solutions 0, 1 (4 of 6), 0-2: 2 of 6
    assert np.allclose(w["attention"], [[1, 1 / 3, 1 / 3], [1 / 3, 1, 2 / 3], [1 / 3, 2 / 3, 1]])
    # mlp (components 2, 4): 0-1 in solutions 0 and 1 (4 of 6), 0-2 and 1-2 in solution 0 only (2 of 6)
    assert np.allclose(w["mlp"], [[1, 2 / 3, 1 / 3], [2 / 3, 1, 1 / 3], [1 / 3, 1 / 3, 1]])
    assert relation_weights([], KINDS) == {}


@pytest.mark.parametrize("groupings", [[[[0, 0], [0, 1]]], [[[0, 0, 0, 0, 0]], [[0, 0, 0, 0]]], [[[]]], [[1, 2]],
                                       [[["a", 0, 0, 0, 0]]], [[[10 ** 30, 0, 0, 0, 0]]]])
def test_relation_weights_refuse_bad_shapes(groupings):
    with pytest.raises(ValueError):
        relation_weights(groupings, KINDS)


def test_reference_points_list_every_baseline_and_reference_once():
    refs = {"static_merge": {"storage_cost": 1.0, "validation": {"performance": 0.62}},
            "individual": {"storage_cost": 3.0, "validation": {"performance": 0.9}}}
    points = reference_points(refs, BASELINES)
    names = [p["name"] for p in points]
    assert "TALL masks [fp16]" in names and "Twin-Merging" in names and "Broken" not in names
    assert names.count("Individual (fp32)") == 1 and "All-shared merge (fp32)" in names  # the same point once
    assert reference_points(refs, None)[1] == {"name": "Individual (fp32)", "kind": "individual",
                                               "storage_cost": 3.0, "performance": 0.9}


# --- the figures ------------------------------------------------------------------------------------------

def test_redraw_figures_writes_both_pngs(run_dir):
    paths = redraw_figures(run_dir)
    assert paths == {"pareto": run_dir / "search" / "pareto.png", "relations": run_dir / "search" / "relations.png"}
    assert all(_is_png(p) for p in paths.values())
    assert not [p for p in (run_dir / "search").iterdir() if p.name.startswith(".")]  # no temp file left


def test_without_baselines_or_journal(run_dir):
    (run_dir / "baselines" / "baselines.json").unlink()
    (run_dir / "search" / "evaluations.jsonl").unlink()
    paths = redraw_figures(run_dir)
    assert all(_is_png(p) for p in paths.values())


def test_an_empty_front_still_draws(run_dir):
    (run_dir / "search" / "front.json").write_text("[]")
    assert all(_is_png(p) for p in redraw_figures(run_dir).values())


def test_unreadable_models_put_every_component_in_one_kind(run_dir):
    from mergetool.pipeline.rundir import resolve_run

    (run_dir / "search" / "components.json").unlink()
    _, recipe = resolve_run(run_dir)
    assert component_kinds(run_dir, recipe) is None  # the recipe's models do not exist
    assert _is_png(redraw_figures(run_dir)["relations"])
    assert list(relation_weights(FRONT_G, [UNKNOWN_KIND] * 5)) == [UNKNOWN_KIND]


def test_a_plan_is_cached_as_component_kinds(run_dir):
    from types import SimpleNamespace

    from mergetool.pipeline.rundir import resolve_run

    _, recipe = resolve_run(run_dir)
    plan = SimpleNamespace(components=[SimpleNamespace(name=f"n{i}", kind=k) for i, k in enumerate(KINDS[::-1])])
    assert component_kinds(run_dir, recipe, plan) == KINDS[::-1]
    assert component_kinds(run_dir, recipe) == KINDS[::-1]  # from search/components.json now


# --- the CLI ------------------------------------------------------------------------------------------------

def test_front_plots_writes_and_prints_both(run_dir):
    result, text = _invoke("front", run_dir, "--plots")
    assert result.exit_code == 0, text
    for name in ("pareto.png", "relations.png"):
        assert _is_png(run_dir / "search" / name)
        assert name in text


def test_front_without_plots_redraws_only_pareto(run_dir):
    result, text = _invoke("front", run_dir)
    assert result.exit_code == 0, text
    assert _is_png(run_dir / "search" / "pareto.png") and not (run_dir / "search" / "relations.png").exists()


def test_bad_run_dirs_are_one_line(run_dir, tmp_path):
    result, text = _invoke("front", tmp_path / "nowhere", "--plots")
    _one_line(result, text, "RUN")
    front = json.loads((run_dir / "search" / "front.json").read_text())
    front[1]["grouping"] = [[0, 0], [0]]
    (run_dir / "search" / "front.json").write_text(json.dumps(front))
    result, text = _invoke("front", run_dir, "--plots")
    _one_line(result, text, "front.json")
    (run_dir / "baselines" / "baselines.json").write_text(json.dumps({"methods": "none"}))
    result, text = _invoke("front", run_dir)
    _one_line(result, text, "baselines.json")
