"""Routed protocols of `evaluate` (oracle, backbone-routed, end-to-end), predict's per-input head, the
router's second opinion, and mean+max router pooling through export and load. On the toy routed library."""

from __future__ import annotations

import json

import pytest
import torch
from routed import invoke, write_recipe

from mergetool.recipe import load_recipe
from mergetool.routing import backbone as bb

TASKS = ("task0", "task1", "task2")


@pytest.fixture(scope="module")
def lib(routed):
    from mergetool import ExpertLibrary

    return ExpertLibrary.load(routed["lib"], device="cpu")


@pytest.fixture(scope="module")
def truth_of(routed):
    """The true task of every test text of the toy zoo."""
    out = {}
    for t in TASKS:
        for line in routed["zoo"]["data"][t]["test"].read_text().splitlines():
            out[json.loads(line)["text"]] = t
    return out


def steer(monkeypatch, lib, pick):
    """Route with the library's router, then replace each input's task by pick(token ids, routed task)
    (its probabilities follow: 1 for the picked task)."""
    original = type(lib)._route

    def fake(self, encs, batch_size):
        tasks, states, probs = original(self, encs, batch_size)
        tasks = [pick(tuple(e["input_ids"]), t) for e, t in zip(encs, tasks)]
        names = self.router_tasks
        return tasks, states, [[float(n == t) for n in names] for t in tasks]

    monkeypatch.setattr(type(lib), "_route", fake)


def _by_ids(lib, truth_of):
    """The true task per tokenised text (what `steer` sees)."""
    texts = list(truth_of)
    return {tuple(e["input_ids"]): truth_of[x] for e, x in zip(lib.encode([(x, None) for x in texts])[0], texts)}


def test_backbone_routed_is_the_oracle_when_routing_is_perfect(routed, lib, truth_of, monkeypatch):
    from mergetool.routing.evaluate import evaluate_library

    decoded = _by_ids(lib, truth_of)
    steer(monkeypatch, lib, lambda x, t: decoded[x])
    rep = evaluate_library(lib, load_recipe(routed["recipe"]), "test", 32)
    assert rep["routing_accuracy"] == 1.0
    for row in rep["tasks"].values():
        assert row["routing_accuracy"] == 1.0
        assert row["backbone_routed"] == row["oracle"] == row["end_to_end"] == row["routed"]
        assert row["backbone_routed_minus_oracle"] == 0
    assert set(rep["mean"]) == {"oracle", "backbone_routed", "end_to_end", "routed"}
    assert rep["throughput"]["oracle_inputs_per_s"] > 0 and rep["throughput"]["end_to_end_inputs_per_s"] > 0


def test_a_misroute_is_wrong_end_to_end_but_keeps_its_head_backbone_routed(routed, lib, truth_of, monkeypatch):
    from mergetool.routing.evaluate import evaluate_library

    decoded = _by_ids(lib, truth_of)
    steer(monkeypatch, lib, lambda x, t: "task1" if decoded[x] == "task0" else decoded[x])
    rep = evaluate_library(lib, load_recipe(routed["recipe"]), "test", 32)
    t0 = rep["tasks"]["task0"]
    assert t0["routing_accuracy"] == 0 and t0["end_to_end"] == 0  # every answer in task1's label space
    assert t0["backbone_routed"] > 0.3 and t0["backbone_routed"] >= t0["end_to_end"]  # task0's head on task1's chain
    for t in ("task1", "task2"):
        assert rep["tasks"][t]["backbone_routed"] == rep["tasks"][t]["oracle"] == rep["tasks"][t]["end_to_end"]
    assert rep["mean"]["backbone_routed"] >= rep["mean"]["end_to_end"]


def test_predict_runs_a_head_on_another_tasks_chain(lib, truth_of):
    texts = [x for x, t in truth_of.items() if t == "task0"][:5]
    res = lib.predict(texts, task=["task1"] * 5, head=["task0"] * 5, return_logits=True)
    assert all(r["task"] == "task0" and r["chain"] == "task1" for r in res)
    assert lib.chain("task0") != lib.chain("task1")
    other, own = lib.assemble("task1"), lib.assemble("task0")
    batch = lib.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        want = bb.head(own, *bb.full(bb.backbone_of(other), dict(batch)))
    assert torch.allclose(torch.tensor([r["logits"] for r in res]), want, atol=1e-5)
    plain = lib.predict(texts, task="task0", return_logits=True)  # the own chain: other features, no `chain`
    assert all("chain" not in r for r in plain)
    same = lib.predict(texts, task=["task0"] * 5, head=[None] * 5)
    assert [r["label"] for r in same] == [r["label"] for r in plain]


def test_bad_head_lists_are_refused(lib):
    from mergetool.core.errors import MergetoolError

    with pytest.raises(MergetoolError, match="2 heads for 1 inputs"):
        lib.predict(["w1"], head=["task0", "task1"])
    with pytest.raises(MergetoolError, match="a task per input"):
        lib.predict(["w1"], head="task0")
    with pytest.raises(MergetoolError):
        lib.predict(["w1"], head=["nope"])


def test_evaluate_cli_reports_both_protocols(routed, tmp_path):
    result, text = invoke("evaluate", routed["lib"], "--recipe", routed["recipe"], "--out", tmp_path / "e.json")
    assert result.exit_code == 0, text
    assert "backbone" in text and "oracle" in text and "inputs/s" in text  # the console table
    rep = json.loads((tmp_path / "e.json").read_text())
    for row in rep["tasks"].values():
        assert row["end_to_end"] <= row["backbone_routed"] + 1e-9  # the same chain; only the head differs
        assert row["routed"] == row["end_to_end"]
        assert abs(row["end_to_end_minus_oracle"] - (row["end_to_end"] - row["oracle"])) < 1e-12
    assert rep["second_opinion"] is None and rep["router"]["pooling"] == "mean"


@pytest.mark.parametrize("value", ["0", "1.5", "-0.2"])
def test_bad_second_opinion_thresholds_exit_2(routed, value):
    for cmd in (["evaluate", routed["lib"], "--recipe", routed["recipe"]],
                ["predict", routed["lib"], "--input", routed["recipe"]]):
        result, text = invoke(*cmd, "--second-opinion", value)
        assert result.exit_code == 2 and "--second-opinion" in text and "Traceback" not in text, text
        assert len([line for line in text.splitlines() if line.startswith("error:")]) == 1


def test_mean_max_pooling_round_trips_through_export_and_load(routed, tmp_path):
    from mergetool import ExpertLibrary
    from mergetool.library import LibraryFiles

    recipe = write_recipe(tmp_path / "r.yaml", routed["zoo"], "router: {pooling: mean_max, epochs: 3, max_per_task: 40}\n")
    result, text = invoke("export", recipe, "--grouping", routed["grouping"], "--out", tmp_path / "lib")
    assert result.exit_code == 0, text
    m = LibraryFiles.load(tmp_path / "lib").manifest
    assert m.router.pooling == "mean_max" and m.router.features == "prefix"
    assert json.loads((tmp_path / "lib" / "manifest.json").read_text())["router"]["pooling"] == "mean_max"
    cfg = json.loads((tmp_path / "lib" / "router.json").read_text())
    hidden = json.loads((tmp_path / "lib" / "config.json").read_text())["hidden_size"]
    assert cfg["pooling"] == "mean_max" and cfg["in_dim"] == 2 * hidden
    lib = ExpertLibrary.load(tmp_path / "lib", device="cpu")
    assert lib.pooling == "mean_max"
    feats, _ = lib.features_of(lib.encode([("w1 w2 w3", None), ("w4", None)])[0])
    assert feats.shape == (2, 2 * hidden)
    assert all(r["task"] in TASKS for r in lib.predict(["w1 w2 w50", "w3 w60 w7"]))
    # a library from before the field (no `pooling` in its manifest) routes on mean-pooled features
    assert "pooling" not in json.loads((routed["lib"] / "manifest.json").read_text())["router"]
    old = ExpertLibrary.load(routed["lib"], device="cpu")
    assert old.pooling == "mean" and old.features_of(old.encode([("w1", None)])[0])[0].shape == (1, hidden)


def test_a_bad_pooling_is_refused_naming_the_key(routed, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", routed["zoo"], "router: {pooling: max}\n")
    result, text = invoke("validate", recipe)
    assert result.exit_code == 2 and "router.pooling" in text, text


def test_pool_mean_max_ignores_padding():
    h = torch.tensor([[[1.0, -1.0], [3.0, 5.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert bb.pool(h, mask, "mean").tolist() == [[2.0, 2.0]]
    assert bb.pool(h, mask, "mean_max").tolist() == [[2.0, 2.0, 3.0, 5.0]]


def test_a_manifest_pooling_that_disagrees_with_the_router_is_refused(routed, tmp_path):
    import shutil

    from mergetool.core.errors import LibraryError
    from mergetool.library import LibraryFiles

    lib = tmp_path / "lib"
    shutil.copytree(routed["lib"], lib)
    m = json.loads((lib / "manifest.json").read_text())
    m["router"]["pooling"] = "mean_max"  # the router was trained on mean features: half the width
    (lib / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(LibraryError, match="input size"):
        LibraryFiles.load(lib)
