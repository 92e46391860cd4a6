"""The router: trained at export on the `router` split, stored without pickle, cached per run, reported."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from routed import invoke, write_recipe

from mergetool.library import LibraryFiles
from mergetool.library.safetensors_io import read_header
from mergetool.routing.features import resolve, shared_prefix
from mergetool.routing.router import Router

FAST = "router: {epochs: 3, max_per_task: 40}\n"


def test_export_ships_a_prefix_router_with_accuracy(routed):
    m = LibraryFiles.load(routed["lib"]).manifest
    r = m.router
    assert r.features == "prefix" and r.requested == "auto" and r.prefix_stages == 2  # embeddings + layer 0
    assert (r.hidden, r.epochs, r.lr, r.max_per_task) == ([256, 128], 30, 5e-4, 1000)  # the paper's defaults
    assert r.train_examples == {"task0": 128, "task1": 128, "task2": 128}  # the router split, never val/test
    assert r.test_examples == {"task0": 96, "task1": 96, "task2": 96}
    assert 0.5 < r.routing_accuracy <= 1 and set(r.routing_accuracy_per_task) == {"task0", "task1", "task2"}
    assert r.feature_storage.file is None and r.feature_storage.bytes == 0  # prefix reuses the experts
    assert {"router.safetensors", "router.json"} <= set(m.files) and m.disk_bytes["router"] > 0
    assert "routing accuracy" in routed["export_output"]
    read_header(routed["lib"] / "router.safetensors")  # plain safetensors, nothing to unpickle
    cfg = json.loads((routed["lib"] / "router.json").read_text())
    assert cfg["tasks"] == ["task0", "task1", "task2"] and cfg["features"] == "prefix"
    router, _ = Router.load(routed["lib"])
    assert [l.out_features for l in router.net if isinstance(l, torch.nn.Linear)] == [256, 128, 3]


def test_inspect_shows_router(routed):
    result, text = invoke("inspect", routed["lib"])
    assert result.exit_code == 0, text
    assert "router: prefix features (2 shared stages)" in text and "routing accuracy on test 0." in text
    result, _ = invoke("inspect", routed["lib"], "--json")
    rep = json.loads(result.stdout)
    assert rep["router"]["prefix_stages"] == 2 and rep["storage"]["on_disk"]["by_category"]["router"] > 0


def test_shared_prefix_of_groupings(routed):
    m = LibraryFiles.load(routed["lib"], verify=False).manifest
    assert shared_prefix(m) == 2 and resolve("auto", m) == ("prefix", 2) and resolve("base", m) == ("base", 0)
    # the same library with task0 leaving layer 0's MLP group: only the embeddings stay shared
    chains = {t: list(c) for t, c in m.chains.items()}
    other = next(e.id for e in m.experts if m.components[e.component].name == "layer.0.mlp")
    chains["task0"][3] = other + "x"
    experts = m.experts + [m.expert(other).model_copy(update={"id": other + "x"})]
    sol = m.solutions[0].model_copy(update={"chains": chains})
    assert shared_prefix(m.model_copy(update={"solutions": [sol], "experts": experts})) == 1
    chains["task0"][0] = other + "x"  # embeddings differ: nothing shared, auto falls back to base
    sol = m.solutions[0].model_copy(update={"chains": chains})
    m2 = m.model_copy(update={"solutions": [sol], "experts": experts})
    assert shared_prefix(m2) == 0 and resolve("auto", m2) == ("base", 0) and resolve("prefix", m2) == ("base", 0)


@pytest.mark.parametrize("features", ["base", "embeddings"])
def test_base_and_embedding_features_ship_their_weights(routed, tmp_path, features):
    recipe = write_recipe(tmp_path / "r.yaml", routed["zoo"], FAST.replace("{", f"{{features: {features}, "))
    result, text = invoke("export", recipe, "--grouping", routed["grouping"], "--out", tmp_path / "lib")
    assert result.exit_code == 0, text
    m = LibraryFiles.load(tmp_path / "lib").manifest
    fs = m.router.feature_storage
    header = read_header(tmp_path / "lib" / "base-features.safetensors")
    keys = {k for k in header if k != "__metadata__"}
    assert fs.file == "base-features.safetensors" and m.disk_bytes["base_features"] == fs.bytes > 0
    assert m.router.train_examples == {"task0": 40, "task1": 40, "task2": 40}  # max_per_task
    if features == "base":
        assert any(k.startswith("encoder.layer.1.") for k in keys) and not any(k.startswith("pooler.") for k in keys)
        assert 0.9 < fs.share_of_base < 1
    else:
        assert keys and all(k.startswith("embeddings.") for k in keys) and 0 < fs.share_of_base < 0.5
    result, text = invoke("inspect", tmp_path / "lib")
    assert f"router feature extractor ({features}): base-features.safetensors" in text
    from mergetool import ExpertLibrary

    lib = ExpertLibrary.load(tmp_path / "lib", device="cpu")
    res = lib.predict(["w1 w2 w50", "w3 w60 w7"], batch_size=1)
    assert lib.stats["feature_calls"] == 2 and all(r["task"] in lib.tasks for r in res)


def test_router_cached_per_run_and_retrained_on_change(routed, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", routed["zoo"], FAST)
    result, text = invoke("export", recipe, "--grouping", routed["grouping"], "--out", tmp_path / "a")
    assert result.exit_code == 0 and "(cached)" not in text, text
    assert len(list((tmp_path / "run" / "router").iterdir())) == 1
    result, text = invoke("export", recipe, "--grouping", routed["grouping"], "--out", tmp_path / "b")
    assert result.exit_code == 0 and "(cached)" in text, text
    a, b = (LibraryFiles.load(tmp_path / x).manifest for x in "ab")
    assert a.files["router.safetensors"] == b.files["router.safetensors"] and a.router == b.router
    write_recipe(tmp_path / "r.yaml", routed["zoo"], FAST.replace("epochs: 3", "epochs: 4"))
    result, text = invoke("export", recipe, "--grouping", routed["grouping"], "--out", tmp_path / "c")
    assert result.exit_code == 0 and "(cached)" not in text, text
    assert LibraryFiles.load(tmp_path / "c").manifest.router.epochs == 4


def test_training_is_seeded():
    from mergetool.pipeline.router_training import fit

    X, y = torch.randn(60, 8, generator=torch.Generator().manual_seed(0)), torch.arange(60) % 3
    a, b = (fit(X, y, ["a", "b", "c"], (16, 8), 3, 5e-4, seed=7) for _ in range(2))
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    sep = torch.cat([torch.randn(30, 4) + 4, torch.randn(30, 4) - 4])  # separable: the MLP learns it
    r = fit(sep, torch.tensor([0] * 30 + [1] * 30), ["a", "b"], (16, 8), 30, 5e-3, seed=0)
    assert np.mean((r(sep).argmax(-1) == torch.tensor([0] * 30 + [1] * 30)).numpy()) == 1.0
