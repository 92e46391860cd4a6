"""`mergetool baselines`: Twin/EMR formulas on literal tensors, the CLI on the trained toy zoo, bad input."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from mergetool.baselines import refresh_summary, static
from mergetool.baselines.dynamic import (
    TwinModel,
    emr_masks,
    emr_rescalers,
    emr_sums,
    emr_task,
    emr_unify,
    twin_merge,
    twin_params,
)
from mergetool.cli.app import app
from mergetool.testing.toy import trained_recipe

runner = CliRunner()


# --- formulas -------------------------------------------------------------------------------------
def test_emr_formulas():
    t1, t2 = torch.tensor([1.0, -2.0, 3.0, 0.0]), torch.tensor([2.0, 1.0, -1.0, 0.5])
    uni = emr_unify([t1, t2])
    # sign(Σ) = [+, -, +, +]; magnitude = max |τ| among the tasks agreeing with it
    assert torch.equal(uni, torch.tensor([2.0, -2.0, 3.0, 0.5]))
    m1, m2 = emr_masks([t1, t2], uni)
    assert m1.tolist() == [True, True, True, False] and m2.tolist() == [True, False, False, True]
    lam = emr_rescalers([emr_sums([t1, t2], uni, [m1, m2])])
    assert lam == pytest.approx([6 / 7, 4.5 / 2.5])
    # the rescaler sums over every tensor of the model: split in two tensors, same λ
    halves = [emr_sums([t1[i:i + 2], t2[i:i + 2]], uni[i:i + 2], [m1[i:i + 2], m2[i:i + 2]]) for i in (0, 2)]
    assert emr_rescalers(halves) == pytest.approx(lam)
    pre = torch.ones(4)
    assert torch.allclose(emr_task(pre, uni, m1, lam[0]), torch.tensor([1 + 12 / 7, 1 - 12 / 7, 1 + 18 / 7, 1.0]))
    assert torch.allclose(emr_task(pre, uni, m2, lam[1]), torch.tensor([1 + 3.6, 1.0, 1.0, 1 + 0.9]))
    # a coordinate whose task vectors cancel elects sign 0: nothing is kept there
    assert emr_unify([torch.tensor([1.0]), torch.tensor([-1.0])]).tolist() == [0.0]


def test_oracle_route():
    from mergetool.baselines.dynamic import oracle_route

    w = oracle_route(3)(1, {"input_ids": torch.zeros(2, 5, dtype=torch.long)})
    assert w.tolist() == [[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]


def test_twin_formulas():
    shared = torch.eye(3)
    task1 = torch.eye(3) + torch.diag(torch.tensor([3.0, 0.5, 0.0]))
    task2 = torch.eye(3) + torch.tensor([[0.0, 0.0, 2.0], [0.0, 0.0, 2.0], [0.0, 0.0, 0.0]])  # rank-1 delta
    twin = TwinModel(None, {"w": shared}, [SimpleNamespace(get={"w": t}.get) for t in (task1, task2)], [1, 2])
    d1, d2 = twin.delta(0, "w", 1), twin.delta(1, "w", 1)
    assert torch.allclose(d1, torch.diag(torch.tensor([3.0, 0.0, 0.0])), atol=1e-6)  # best rank-1 approximation
    assert torch.allclose(d2, task2 - shared, atol=1e-6)
    merged = twin_merge(shared, [d1, d2], [0.25, 0.75])
    expected = torch.tensor([[1.75, 0.0, 1.5], [0.0, 1.0, 1.5], [0.0, 0.0, 1.0]])
    assert torch.allclose(merged, expected, atol=1e-6)
    assert torch.equal(twin_merge(shared, [d1, d2], [0.0, 0.0]), shared)
    # storage per compressed delta: r·(m+n), dense when that is no smaller, 1-D always dense
    assert twin_params((3, 3), 1) == 6 and twin_params((3, 3), 2) == 9 and twin_params((4,), 1) == 4
    assert twin_params((10, 2, 3), 1) == 16 and twin_params((64, 32), 4) == 384
    bias = TwinModel(None, {"b": torch.tensor([1.0, 1.0])}, [SimpleNamespace(get={"b": torch.tensor([2.0, 3.0])}.get)], [1])
    assert torch.equal(bias.delta(0, "b", 1), torch.tensor([1.0, 2.0]))  # 1-D: always dense
    assert torch.equal(twin.delta(0, "w", 2), task1 - shared)  # rank 2 of 3×3 is stored whole
    # the model's per-input state is the same formula over every tensor at once (one flat merge)
    two = TwinModel(None, {"w": shared, "b": torch.tensor([1.0, 1.0, 1.0])},
                    [SimpleNamespace(get={"w": task1, "b": torch.tensor([2.0, 3.0, 1.0])}.get),
                     SimpleNamespace(get={"w": task2, "b": torch.tensor([1.0, 0.0, 1.0])}.get)], [1, 2])
    for rank in (1, 2, 1):
        state = two.state([0.25, 0.75], rank)
        assert list(state) == ["w", "b"] and state["w"].shape == (3, 3)
        for n in ("w", "b"):
            by_hand = two.shared[n] + 0.25 * two.delta(0, n, rank) + 0.75 * two.delta(1, n, rank)
            assert torch.allclose(state[n], by_hand, atol=1e-6)
    assert torch.equal(state["b"], torch.tensor([1.25, 1.0 + 0.5 - 0.75, 1.0]))  # 1 + .25·[1, 2, 0] + .75·[0, −1, 0]


# --- CLI on the trained toy zoo -----------------------------------------------------------------------
SMALL = {"wa": static.STATIC["wa"],
         "ta": ("Task Arithmetic", "task_arithmetic", {}, {"lambda": [0.5, 1.0]}),
         "ties": ("Ties-Merging", "ties", {"lambda": 1.0}, {"density": [0.2, 0.8]}),
         "bc": ("Breadcrumbs", "breadcrumbs", {"gamma": 0.01}, {"lambda": [0.5, 1.0], "density": [0.2]})}


def small_recipe(zoo) -> str:
    """The toy recipe with 16-example validation and test subsets (fast on a shared CPU)."""
    text = trained_recipe(zoo, evaluations=4, population=4)
    for n, d in zoo["data"].items():
        for split in ("validation", "test"):
            text = text.replace(f"{split}: {{path: {d[split]}}}", f"{split}: {{path: {d[split]}, limit: 16}}")
    return text


def fake_search(run) -> None:
    """A finished search's files (front, references, test scores, summary) with made-up figures."""
    from mergetool.core.grouping import all_shared, all_singletons, key
    from mergetool.pipeline.rundir import write_json_atomic

    s = run / "search"
    per = lambda p: {f"task{i}": p for i in range(3)}  # noqa: E731
    front = [{"id": 0, "grouping": all_shared(3, 2).tolist(), "performance": 0.0, "storage_cost": 0.3,
              "per_task": per(0.0)},
             {"id": 1, "grouping": all_singletons(3, 2).tolist(), "performance": 1.0, "storage_cost": 0.9,
              "per_task": per(1.0)}]
    write_json_atomic(s / "front.json", front)
    ref = {k: {"grouping": [], "storage_cost": c, "validation": {"performance": 0.5, "per_task": per(0.5)}}
           for k, c in (("individual", 3.0), ("static_merge", 1.0))}
    write_json_atomic(s / "reference.json", ref)
    write_json_atomic(s / "test_scores.json", {key(f["grouping"]): {"performance": 0.7, "per_task": per(0.7)}
                                               for f in front})
    (s / "summary.md").write_text("# Search summary\n\n## Search\n\n- evaluations: 2\n- hypervolume: 0.5\n")


@pytest.fixture(scope="module")
def done(trained_zoo, tmp_path_factory):
    """`baselines --split test` (smaller grids) in a run directory holding a (made-up) search."""
    tmp = tmp_path_factory.mktemp("baselines")
    recipe = tmp / "toy.yaml"
    recipe.write_text(small_recipe(trained_zoo))
    fake_search(tmp / "runs" / "toy")
    mp = pytest.MonkeyPatch()
    mp.setattr(static, "STATIC", SMALL)
    try:
        result = runner.invoke(app, ["baselines", str(recipe), "--split", "test", "--twin-ranks", "2,8", "--quiet",
                                      "--methods", "wa,ta,ties,bc,twin,emr"])
    finally:
        mp.undo()
    assert result.exit_code == 0, result.output
    return recipe, tmp / "runs" / "toy", result


def test_baselines_json(done):
    from mergetool.core.grouping import all_singletons
    from mergetool.merge.experts import ExpertStore
    from mergetool.models.plan import build_plan, open_models
    from mergetool.recipe import load_recipe

    recipe_path, run, result = done
    data = json.loads((run / "baselines" / "baselines.json").read_text())
    assert data["split"] == "test" and data["routing"].startswith("router")  # the toy recipe has router splits
    by = {m["id"]: m for m in data["methods"]}
    assert list(by) == ["individual", "individual_8bit", "pretrained", "wa", "ta", "ties", "bc", "twin", "emr"]
    for m in data["methods"]:
        assert m["validation"]["performance"] == pytest.approx(sum(m["validation"]["per_task"].values()) / 3)
        assert m["test"] is not None and set(m["test"]["per_task"]) == {"task0", "task1", "task2"}
    kinds = {k: m["kind"] for k, m in by.items()}
    assert kinds == {"individual": "individual", "individual_8bit": "individual", "pretrained": "pretrained",
                     "wa": "static", "ta": "static", "ties": "static", "bc": "static", "twin": "dynamic",
                     "emr": "dynamic"}

    recipe = load_recipe(recipe_path)
    base, tasks = open_models(recipe)
    plan = build_plan(recipe, sources=(base, tasks), check_values=False)
    T, d = plan.T, plan.d
    assert by["individual"]["storage_cost"] == pytest.approx(plan.individual_cost) == pytest.approx(3.0)
    # quantised individual models: exactly the search's store; ≈ T·b/32 plus 2 metadata values per unit (Eq. 8)
    q = by["individual_8bit"]["storage_cost"]
    assert q == ExpertStore(recipe, plan, base, tasks).storage_cost(all_singletons(T, plan.L))
    shapes = [base.meta(n).shape for c in plan.components for n in c.tensors]
    units = sum(s[0] if len(s) >= 2 else 1 for s in shapes)  # per-channel rows; 1-D tensors are one unit
    assert q == pytest.approx(T * (8 / 32 + 2 * units / d), rel=1e-3)
    for k in ("pretrained", "wa", "ta", "ties", "bc"):
        assert by[k]["storage_cost"] == pytest.approx(1.0)
    assert by["individual"]["validation"]["performance"] > by["pretrained"]["validation"]["performance"]

    assert by["ta"]["params"]["lambda"] in (0.5, 1.0) and len(by["ta"]["grid"]) == 2
    assert by["ties"]["params"]["density"] in (0.2, 0.8)
    assert by["bc"]["params"]["gamma"] == 0.01 and {"lambda", "density"} <= set(by["bc"]["params"])
    best_ta = max(g["performance"] for g in by["ta"]["grid"] if not g.get("raced_out"))
    assert by["ta"]["validation"]["performance"] == best_ta
    for m in ("wa", "ta", "ties", "bc"):  # racing (the recipe default): a raced-out point has only its subset P
        for g in by[m]["grid"]:
            assert (g["performance"] is None) == bool(g.get("raced_out")) == ("subset_performance" in g)

    twin, emr = by["twin"], by["emr"]
    assert twin["params"]["rank"] in (2, 8) and twin["params"]["shared"]["density"] == by["ties"]["params"]["density"]
    bd = twin["storage_breakdown"]
    router = twin["routing"]
    assert router["kind"] == "router" and router["params"] > 0 and set(router["accuracy"]) == {"validation", "test"}
    assert bd["shared"] == pytest.approx(1.0) and bd["router"] == pytest.approx(router["params"] / d)
    assert twin["storage_cost"] == pytest.approx(1.0 + bd["per_task"] + bd["router"]) and 0 < bd["per_task"] < T
    bd = emr["storage_breakdown"]
    assert bd["masks"] == pytest.approx(T / 32, rel=1e-2) and bd["rescalers"] == pytest.approx(T / d)
    assert emr["storage_cost"] == pytest.approx(2 + bd["masks"] + T / d + bd["router"])
    assert 0 <= emr["routing"]["accuracy"]["test"] <= 1
    assert bd["paper_convention"] == pytest.approx(emr["storage_cost"] - 1)
    assert len(emr["params"]["rescalers"]) == T
    for m in (twin, emr):  # oracle and both routed protocols, at the fp32 base and (a variant) an fp16 one
        assert m["params"]["base_storage"] == "fp32" and set(m["variants"]) == {"fp16"}
        for v in (m, m["variants"]["fp16"]):
            prot = v["protocols"]
            for sp in ("validation", "test"):
                bb, e2e = prot["backbone_routed"][sp], prot["end_to_end"][sp]
                assert v[sp] == bb and prot["oracle"][sp]["per_task"].keys() == bb["per_task"].keys()
                assert all(e2e["per_task"][n] <= bb["per_task"][n] for n in bb["per_task"])
        fp16 = m["variants"]["fp16"]["storage_breakdown"]
        assert fp16["storage"] == "fp16" and fp16["router"] == m["storage_breakdown"]["router"]
    assert twin["variants"]["fp16"]["storage_breakdown"]["shared"] == pytest.approx(0.5)
    assert twin["variants"]["fp16"]["storage_breakdown"]["per_task"] == pytest.approx(twin["storage_breakdown"]["per_task"] / 2)
    assert emr["variants"]["fp16"]["storage_cost"] == pytest.approx(emr["storage_cost"] - 1)  # θ_pre and τ_uni halve

    assert "Table I" in result.stdout and "EMR-Merging" in result.stdout and "routing accuracy (test)" in result.stdout


def test_summary_regenerated_with_g2(done):
    from mergetool.pipeline.session import select

    _, run, result = done
    summary = (run / "search" / "summary.md").read_text()
    assert "run `mergetool baselines` first" not in summary
    assert "- evaluations: 2" in summary and "- hypervolume: 0.5" in summary  # the search's stats are kept
    front = json.loads((run / "search" / "front.json").read_text())
    ref = json.loads((run / "search" / "reference.json").read_text())
    chosen = select(front, ref, json.loads((run / "baselines" / "baselines.json").read_text()))
    merging = ("Weight Averaging", "Task Arithmetic", "Ties-Merging", "Breadcrumbs", "Twin-Merging", "EMR-Merging",
               "TALL masks", "T-Switch-like", "BitDelta")
    assert chosen["G2_baseline"] in merging
    g2 = [line for line in summary.splitlines() if line.startswith("| G2")][0]
    if chosen["G2"] is not None:  # the made-up P = 1.0 solution, unless a baseline scored 1.0 too
        assert chosen["G2_baseline"] in g2 and "id 1" in g2 and "0.7000" in g2
    else:
        assert "no front solution qualifies" in g2
    assert "summary" in result.stdout


def test_refresh_summary(tmp_path):
    """G2 = the cheapest front solution above the best *merging* baseline (individual models excluded)."""
    from types import SimpleNamespace

    assert refresh_summary(None, tmp_path, {"methods": []}) is None  # no search: nothing to regenerate
    fake_search(tmp_path)
    val = lambda p: {"performance": p, "per_task": {}}  # noqa: E731
    baselines = {"methods": [{"name": "Individual (fp32)", "kind": "individual", "validation": val(0.99)},
                             {"name": "Task Arithmetic", "kind": "static", "validation": val(0.6)},
                             {"name": "EMR-Merging", "kind": "dynamic", "validation": val(0.8)}]}
    path = refresh_summary(SimpleNamespace(has_split=lambda split: True), tmp_path, baselines)  # all cached
    g2 = [line for line in path.read_text().splitlines() if line.startswith("| G2")][0]
    assert "EMR-Merging" in g2 and "id 1" in g2 and "| 0.9000 | 1.0000 | 0.7000 |" in g2


def test_a_stopped_run_resumes_from_its_finished_parts(done, tmp_path):
    """Every finished baseline is kept in RUN/baselines/parts; a re-run reads them back (same table, same
    progress count); a lost part (here: Twin, whose shared expert is the read-back TIES merge) is scored again to
    the same figures; other settings score every part again."""
    import shutil

    from mergetool.baselines import count_steps, run_baselines
    from mergetool.pipeline.rundir import read_references
    from mergetool.pipeline.session import Session, settings_for
    from mergetool.recipe import load_recipe

    recipe_path, run, _ = done
    shutil.copytree(recipe_path.parent, tmp_path / "copy")  # the fixture's run stays as it is for the other tests
    recipe_path, run = tmp_path / "copy" / recipe_path.name, tmp_path / "copy" / "runs" / "toy"
    first = json.loads((run / "baselines" / "baselines.json").read_text())
    parts = run / "baselines" / "parts"
    names = ["individual", "static-wa", "static-ta", "static-ties", "static-bc", "twin", "emr"]
    assert sorted(p.stem for p in parts.glob("*.json")) == sorted(names) and first["resumed"] == []
    (parts / "twin.json").unlink()
    (parts / "emr.json").write_text("{not json")  # a part cut short is scored again too
    recipe = load_recipe(recipe_path)
    args = dict(split="test", methods=["wa", "ta", "ties", "bc", "twin", "emr"], twin_ranks=[2, 8], parts=parts,
                racing=settings_for(recipe).racing, reference=read_references(run / "search" / "reference.json"))
    said = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(static, "STATIC", SMALL)
        again = run_baselines(Session(recipe, device="cpu"), progress=said.append, **args)
        total = count_steps(recipe, split="test", methods=args["methods"], twin_ranks=[2, 8], routing="router",
                            storages=("fp32", "fp16"))
    assert again["resumed"] == names[:5] and len(said) == total
    assert sum(w.endswith("(resumed)") for w in said) > 0 and not any("twin" in w and "resumed" in w for w in said)
    assert json.dumps(again["methods"], sort_keys=True) == json.dumps(first["methods"], sort_keys=True)
    with pytest.MonkeyPatch.context() as mp:  # a part's own settings (TA's grid) change: that part alone re-runs
        mp.setattr(static, "STATIC", {**SMALL, "ta": ("Task Arithmetic", "task_arithmetic", {}, {"lambda": [0.5]})})
        other = run_baselines(Session(recipe, device="cpu"), **{**args, "methods": ["wa", "ta"]})
    assert other["resumed"] == ["individual", "static-wa"]
    assert len({m["id"]: m for m in other["methods"]}["ta"]["grid"]) == 1
    with pytest.MonkeyPatch.context() as mp:  # the run's settings change: every part is scored again
        mp.setattr(static, "STATIC", SMALL)
        other = run_baselines(Session(recipe, device="cpu"), **{**args, "storages": ("fp32",), "methods": ["wa"]})
    assert other["resumed"] == []


def test_fresh_scores_every_part_again(done, tmp_path):
    import shutil

    recipe_path, run, _ = done
    shutil.copytree(recipe_path.parent, tmp_path / "copy")
    recipe_path, run = tmp_path / "copy" / recipe_path.name, tmp_path / "copy" / "runs" / "toy"
    stamp = {p.name: p.stat().st_mtime_ns for p in (run / "baselines" / "parts").glob("*.json")}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(static, "STATIC", SMALL)
        resumed = runner.invoke(app, ["baselines", str(recipe_path), "--methods", "wa,ta", "--quiet"])
        fresh = runner.invoke(app, ["baselines", str(recipe_path), "--methods", "wa", "--quiet", "--fresh"])
    assert resumed.exit_code == 0 and fresh.exit_code == 0, resumed.output + fresh.output
    assert "resumed" not in resumed.stdout  # validation split only: another fingerprint than the test-split parts
    assert "resumed" not in fresh.stdout
    left = sorted(p.name for p in (run / "baselines" / "parts").glob("*.json"))
    assert left == ["individual.json", "static-wa.json"] and all(n in stamp for n in left)


@pytest.mark.parametrize("case", ["missing", "split", "no_test_split", "no_router_split", "ranks"])
def test_bad_input(case, trained_zoo, tmp_path):
    recipe = tmp_path / "toy.yaml"
    text = trained_recipe(trained_zoo, evaluations=4, population=4)
    args = ["baselines", str(recipe), "--quiet"]
    if case == "missing":
        args[1] = str(tmp_path / "nowhere")
    elif case == "split":
        args += ["--split", "train"]
    elif case == "no_test_split":
        text = "\n".join(line.split(", test:")[0] + ", batch_size: 32}" if "test:" in line else line
                         for line in text.splitlines())
        args += ["--split", "test"]
    elif case == "no_router_split":
        text = "\n".join(line.split(", router:")[0] + ", batch_size: 32}" if "router:" in line else line
                         for line in text.splitlines())
        args += ["--routing", "router"]
    else:
        args += ["--twin-ranks", "0"]
    recipe.write_text(text)
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    expected = {"missing": "neither a recipe", "split": "unknown split", "no_test_split": "test split",
                "no_router_split": "`router` split", "ranks": "--twin-ranks"}[case]
    assert expected in result.stderr
    assert not (tmp_path / "runs").exists()


def test_raced_grid_picks_what_the_full_grid_picks(trained_zoo, tmp_path):
    """Racing a static grid completes fewer points and still picks the full grid's winner here."""
    from mergetool.baselines import static
    from mergetool.pipeline.session import Session
    from mergetool.recipe import parse_recipe
    from mergetool.search.types import RacingSettings
    from mergetool.testing.toy import trained_recipe

    session = Session(parse_recipe(trained_recipe(trained_zoo), tmp_path / "toy.yaml"), device="cpu")
    full_best, full_rows = static.tune(session, "bc")
    racing = RacingSettings(0.5, 0.9)
    raced_best, raced_rows = static.tune(session, "bc", racing=racing)
    assert all(r["performance"] is not None for r in full_rows)
    assert raced_best.params == full_best.params and raced_best.performance == full_best.performance
    out = [r for r in raced_rows if r.get("raced_out")]
    assert out and len(out) < len(raced_rows)
    for r in raced_rows:  # completed points score exactly as in the full grid
        if r["performance"] is not None:
            assert r["performance"] == next(f["performance"] for f in full_rows
                                            if (f["lambda"], f["density"]) == (r["lambda"], r["density"]))
