"""`mergetool baselines` TALL masks, T-Switch-like, BitDelta: formulas on literal tensors, exact C, the routed
protocols (end-to-end ≤ backbone-routed under misroutes), one CLI run on a tiny trained zoo, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mergetool.baselines.delta import (
    BitDeltaModel,
    SwitchModel,
    TallModel,
    bitdelta_delta,
    packed_mask_bits,
    switch_delta,
    tall_mask,
    tall_task,
)
from mergetool.baselines.dynamic import PerInputEvaluator, misrouted_wrong, oracle_route
from mergetool.cli.app import app
from mergetool.merge.codecs import DeltaQuantSpec, DeltaSwitchSpec, base_stored_bits, stored_bits

runner = CliRunner()


# --- formulas on literal tensors ----------------------------------------------------------------------
def test_tall_mask_rule():
    t1 = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0])
    t2 = torch.tensor([-1.0, -0.5, 2.0, 0.0, 1.0])
    mtl = t1 + t2  # [0, -2.5, 2.5, 0, 4]
    # |τ1| ≥ λ|τ_MTL − τ1| = λ|τ2|: λ = 0.5 → [1 ≥ .5, 2 ≥ .25, .5 ≥ 1, 0 ≥ 0, 3 ≥ .5]
    assert tall_mask(t1, mtl, 0.5).tolist() == [True, True, False, True, True]
    # λ = 3: [1 ≥ 3, 2 ≥ 1.5, .5 ≥ 6, 0 ≥ 0, 3 ≥ 3]: a tie keeps the entry
    assert tall_mask(t1, mtl, 3.0).tolist() == [False, True, False, True, True]
    assert tall_mask(t2, mtl, 0.5).tolist() == [True, False, True, True, False]  # 1 ≥ 0.5·3 fails
    pre = torch.full((5,), 10.0)
    assert torch.equal(tall_task(pre, mtl, tall_mask(t1, mtl, 0.5)), torch.tensor([10.0, 7.5, 10.0, 10.0, 14.0]))
    assert packed_mask_bits(torch.ones(9, dtype=torch.bool)) == 16  # 9 bits, padded once to 2 bytes


def test_switch_and_bitdelta_literal():
    tau = torch.tensor([[0.5, -1.0, 0.1], [-0.2, 0.3, -2.0]])
    dec, bits = switch_delta(tau, 0.5)  # k = 3 of 6: -2.0, -1.0, 0.5; one tensor scale = mean 3.5/3
    s = 3.5 / 3
    assert torch.allclose(dec, torch.tensor([[s, -s, 0.0], [0.0, 0.0, -s]]))
    assert bits == 8 + 8 + 32 == stored_bits(DeltaSwitchSpec(0.5), (2, 3), 32)
    dec, bits = bitdelta_delta(tau)  # sign × per-row mean |τ|
    r0, r1 = 1.6 / 3, 2.5 / 3
    assert torch.allclose(dec, torch.tensor([[r0, -r0, r0], [-r1, r1, -r1]]))
    assert bits == 8 + 2 * 32 == stored_bits(DeltaQuantSpec(1), (2, 3), 32)
    dec2, bits2 = bitdelta_delta(tau, 1.25)  # the multiplier is folded into the stored scales: same bytes
    assert torch.allclose(dec2, 1.25 * dec) and bits2 == bits


def test_misrouted_rows_become_wrong():
    from types import SimpleNamespace

    data = SimpleNamespace(pairs=None, kind="sequence_classification", metric="accuracy", labels=np.array([0, 2, 1]))
    logits = np.array([[5.0, 0, 0], [0, 0, 5.0], [0, 5.0, 0]])  # all right
    out = misrouted_wrong(data, logits, np.array([0, 0, 1]), 1)  # rows 0 and 1 of task 1 went to task 0
    assert out.argmax(1).tolist() == [1, 0, 1] and np.array_equal(out[2], logits[2])
    assert misrouted_wrong(SimpleNamespace(**{**vars(data), "metric": "pearson"}), logits, np.zeros(3), 1) is None


# --- a tiny trained zoo ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Two tiny trained BERTs (one layer), 16-example validation/test, a small fast router."""
    from mergetool.testing.toy import make_trained_zoo, trained_recipe

    root = tmp_path_factory.mktemp("delta")
    zoo = make_trained_zoo(root / "zoo", n_tasks=2, layers=1, hidden=16, steps=20)
    text = trained_recipe(zoo, evaluations=4, population=4,
                          extra="router: {hidden: [16, 16], epochs: 3, max_per_task: 32}\n")
    for d in zoo["data"].values():
        for split in ("validation", "test"):
            text = text.replace(f"{split}: {{path: {d[split]}}}", f"{split}: {{path: {d[split]}, limit: 16}}")
    recipe = root / "toy.yaml"
    recipe.write_text(text)
    return recipe


@pytest.fixture(scope="module")
def session(toy):
    from mergetool.pipeline.session import Session
    from mergetool.recipe import load_recipe

    return Session(load_recipe(toy), device="cpu")


def _shapes(plan, base) -> list[tuple]:
    return [tuple(base.meta(n).shape) for c in plan.components for n in c.tensors]


@pytest.mark.parametrize("storage", ["fp32", "fp16", "int8"])
def test_payload_bits_are_the_stored_bytes(session, storage):
    """Each part's bits = the closed form of what the codec writes (stored_bits / base_stored_bits)."""
    p, shapes = session.plan, _shapes(session.plan, session.base)
    base = sum(base_stored_bits(s, storage, 32) for s in shapes)
    tall = TallModel(p, session.base, session.tasks, storage)
    b = tall.bits([0.3] * p.T)
    assert b["base"] == base == b["shared"]  # τ_MTL is stored like the base
    assert b["per_task"] == p.T * sum(8 * ((int(np.prod(s)) + 7) // 8) for s in shapes)
    if storage == "fp32":
        assert b["base"] == 32 * p.d  # one full copy: C = 1
    sw = SwitchModel(p, session.base, session.tasks, storage)
    rhos = [0.1, 0.2]
    assert sw.bits(rhos)["per_task_each"] == [sum(stored_bits(DeltaSwitchSpec(r), s, 32) for s in shapes) for r in rhos]
    bd = BitDeltaModel(p, session.base, session.tasks, storage)
    assert bd.bits([0.75, 1.25])["per_task"] == p.T * sum(stored_bits(DeltaQuantSpec(1), s, 32) for s in shapes)
    assert all(b % 8 == 0 for b in bd.bits()["per_task_each"])


def test_end_to_end_never_above_backbone_routed(session):
    """A router that sends every other input to the next task: end-to-end loses exactly those inputs."""
    ev = PerInputEvaluator(session, "validation")
    model = BitDeltaModel(session.plan, session.base, session.tasks)
    model.choice = [1.0] * session.plan.T
    T = session.plan.T

    def misroute(t, batch):
        w = oracle_route(T)(t, batch)
        w[1::2] = np.roll(w[1::2], 1, axis=1)
        return w

    oracle = ev.evaluate(model.state, oracle_route(T), key=model.key)
    assert ev.routing_accuracy == 1.0 and ev.end_to_end == oracle  # nothing misrouted: the protocols agree
    backbone = ev.evaluate(model.state, misroute, key=model.key)
    e2e = ev.end_to_end
    assert 0.4 < ev.routing_accuracy < 0.6
    assert e2e[0] < backbone[0]
    assert all(e2e[1][n] <= backbone[1][n] for n in session.plan.tasks)
    # end-to-end keeps only the rightly routed inputs' right answers: at most their share of each task
    for n, acc in ev.per_task_routing.items():
        assert e2e[1][n] <= acc + 1e-12


# --- the CLI, once --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_run(toy):
    mp = pytest.MonkeyPatch()
    mp.setattr(TallModel, "grid", (0.3, 0.5))
    mp.setattr(SwitchModel, "grid", (0.1, 0.3))
    mp.setattr(BitDeltaModel, "grid", (1.0, 1.25))
    try:
        result = runner.invoke(app, ["baselines", str(toy), "--split", "test", "--methods", "tall,tswitch,bitdelta",
                                     "--base-storage", "fp32,fp16", "--quiet", "--device", "cpu"])
    finally:
        mp.undo()
    assert result.exit_code == 0, result.output
    return json.loads((toy.parent / "runs" / "toy" / "baselines" / "baselines.json").read_text()), result


def test_cli_reports_costs_and_both_protocols(toy, cli_run):
    from mergetool.models.plan import build_plan, open_models
    from mergetool.recipe import load_recipe

    data, result = cli_run
    by = {m["id"]: m for m in data["methods"]}
    assert {"tall", "tswitch", "bitdelta"} <= set(by) and data["base_storages"] == ["fp32", "fp16"]
    recipe = load_recipe(toy)
    base, tasks = open_models(recipe)
    plan = build_plan(recipe, sources=(base, tasks), check_values=False)
    shapes, T, d = _shapes(plan, base), plan.T, plan.d
    mask = sum(8 * ((int(np.prod(s)) + 7) // 8) for s in shapes)
    for key, m in by.items():
        if key not in ("tall", "tswitch", "bitdelta"):
            continue
        router_bits = 32 * m["routing"]["params"]
        assert m["kind"] == "dynamic" and m["params"]["base_storage"] == "fp32" and router_bits > 0
        for storage, v in [("fp32", m), *m["variants"].items()]:
            base_bits = sum(base_stored_bits(s, storage, 32) for s in shapes)
            if key == "tall":
                payload = base_bits + T * mask  # τ_MTL stored like the base, T bit-packed masks
            elif key == "tswitch":
                payload = sum(stored_bits(DeltaSwitchSpec(rho), s, 32) for rho in m["params"]["density"].values()
                              for s in shapes)
            else:
                payload = T * sum(stored_bits(DeltaQuantSpec(1), s, 32) for s in shapes)
            expected = (base_bits + payload + router_bits) / (32 * d)  # bits / (b⁺·d)
            assert v["storage_cost"] == pytest.approx(expected, rel=1e-12), (key, storage)
            prot = v["protocols"]
            for sp in ("validation", "test"):
                o, bb, e2e = (prot[p][sp] for p in ("oracle", "backbone_routed", "end_to_end"))
                assert set(o["per_task"]) == set(bb["per_task"]) == set(e2e["per_task"]) == set(plan.tasks)
                assert all(e2e["per_task"][n] <= bb["per_task"][n] for n in plan.tasks)  # misroutes only lose
                assert v[sp] == bb  # the headline is backbone-routed, as for Twin/EMR
        assert m["variants"]["fp16"]["storage_cost"] < m["storage_cost"]
        assert set(m["routing"]["accuracy"]) == {"validation", "test"}
        chosen = list(m["params"][{"tall": "lambda", "tswitch": "density", "bitdelta": "scale_multiplier"}[key]]
                      .values())
        assert len(m["grid"]) == 2 and all(c in [g[next(iter(g))] for g in m["grid"]] for c in chosen)
        for n in plan.tasks:  # each task keeps its best grid value on validation, task given
            assert m["protocols"]["oracle"]["validation"]["per_task"][n] == max(g["per_task"][n] for g in m["grid"])
    assert "both routed protocols" in result.stdout and "T-Switch-like" in result.stdout


@pytest.mark.parametrize("args, expected", [(["--methods", "tall,nope"], "unknown baseline 'nope'"),
                                            (["--base-storage", "fp8"], "--base-storage"),
                                            (["--base-storage", "fp16,fp16"], "--base-storage")])
def test_bad_input(toy, tmp_path, args, expected):
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(Path(toy).read_text())
    result = runner.invoke(app, ["baselines", str(recipe), "--quiet", *args])
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert expected in result.stderr
    assert not (tmp_path / "runs").exists()
