"""Fisher merging and RegMean baselines (issue #18) on the trained toy zoo: the statistics they read, the CLI
entries, and the refusal without a `router` split. The merge formulas are tested on literal tensors in
test_merging.py."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from mergetool.cli.app import app

runner = CliRunner()


@pytest.fixture(scope="module")
def session(trained_zoo, tmp_path_factory):
    from mergetool.pipeline.session import Session
    from mergetool.recipe import parse_recipe
    from mergetool.testing.toy import trained_recipe

    return Session(parse_recipe(trained_recipe(trained_zoo), tmp_path_factory.mktemp("data") / "toy.yaml"),
                   device="cpu")


def test_fisher_is_the_mean_squared_gradient_of_the_own_prediction(session):
    """F_t by hand: loss.backward() of log p(ŷ|x) one input at a time, grad² averaged."""
    from mergetool.baselines.data_merges import fisher_diagonal, mergeable, task_model
    from mergetool.baselines.dynamic import router_batches, router_tokenizer

    fisher, seen = fisher_diagonal(session, 1, torch.device("cpu"), limit=3)
    assert seen == 3 and set(fisher) == set(mergeable(session))
    model = task_model(session, 1, torch.device("cpu"))
    names = [n for n in mergeable(session) if n.endswith("query.weight")][:1] + mergeable(session)[:1]
    by_hand = {n: torch.zeros_like(fisher[n]) for n in names}
    for batch in router_batches(session, router_tokenizer(session), 1, 3, 1):
        for p in model.module.parameters():
            p.grad = None
            p.requires_grad_(True)
        logp = torch.log_softmax(model.module(**batch).logits.float(), -1)[0]
        logp[logp.argmax()].backward()
        for n in names:
            by_hand[n] += model.tensor(n).grad ** 2
    for n in names:
        assert torch.allclose(fisher[n], by_hand[n] / 3, rtol=1e-4, atol=1e-12), n
        assert float(fisher[n].sum()) > 0


def test_regmean_grams_are_the_layer_inputs_gram(session):
    """G_t = XᵀX over the unpadded tokens that reach the layer: symmetric, PSD, trace = Σ‖x‖²."""
    from mergetool.baselines.data_merges import gram_matrices, mergeable, task_model
    from mergetool.baselines.dynamic import router_batches, router_tokenizer

    grams, seen = gram_matrices(session, 0, torch.device("cpu"), limit=5)
    assert seen == 5 and grams and set(grams) <= set(mergeable(session))
    name = next(n for n in grams if n.endswith("query.weight"))
    model = task_model(session, 0, torch.device("cpu"))
    layer = next(m for m in model.module.modules()
                 if isinstance(m, torch.nn.Linear) and m.weight is model.tensor(name))
    rows = []
    handle = layer.register_forward_pre_hook(lambda m, inp: rows.append(inp[0].detach()))
    with torch.inference_mode():
        for batch in router_batches(session, router_tokenizer(session), 0, 5, 16):
            model.module(**batch)
            rows[-1] = rows[-1][batch["attention_mask"].bool()]
    handle.remove()
    X = torch.cat(rows).double()
    assert torch.allclose(grams[name], X.T @ X, rtol=1e-9, atol=1e-9)


def test_cli_fisher_and_regmean_entries(trained_zoo, tmp_path, monkeypatch):
    from mergetool.baselines import data_merges
    from tests.test_baselines import small_recipe

    monkeypatch.setattr(data_merges, "FISHER_EXAMPLES", 24)  # the statistics of fewer inputs: a fast test
    monkeypatch.setattr(data_merges, "GRAM_EXAMPLES", 24)
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(small_recipe(trained_zoo))
    result = runner.invoke(app, ["baselines", str(recipe), "--methods", "fisher,regmean", "--quiet"])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "runs" / "toy" / "baselines" / "baselines.json").read_text())
    by = {m["id"]: m for m in data["methods"]}
    assert list(by) == ["individual", "individual_8bit", "pretrained", "fisher", "regmean"]
    fisher, regmean = by["fisher"], by["regmean"]
    for m in (fisher, regmean):
        assert m["kind"] == "static" and m["storage_cost"] == pytest.approx(1.0)
        assert m["params"]["examples"] == 3 * 24 and m["params"]["estimation_seconds"] >= 0
    assert regmean["params"]["alpha"] in (0.5, 0.7, 0.9) and len(regmean["grid"]) == 3
    assert regmean["validation"]["performance"] == max(g["performance"] for g in regmean["grid"])
    # a static merge sits between the pre-trained model and the individual ones here
    assert by["individual"]["validation"]["performance"] >= fisher["validation"]["performance"]
    assert "Fisher Merging" in result.stdout and "RegMean" in result.stdout


@pytest.mark.parametrize("method", ["fisher", "regmean"])
def test_refused_without_a_router_split(method, trained_zoo, tmp_path):
    from mergetool.testing.toy import trained_recipe

    text = "\n".join(line.split(", router:")[0] + ", batch_size: 32}" if "router:" in line else line
                     for line in trained_recipe(trained_zoo, evaluations=4, population=4).splitlines())
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(text)
    result = runner.invoke(app, ["baselines", str(recipe), "--methods", f"ta,{method}", "--quiet"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "router" in lines[0] and method in lines[0] and "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("layerwise", [False, True])
def test_adamerging_lowers_the_entropy(session, layerwise):
    """On the toy's 2-layer BERTs: the learned coefficients give lower entropy than the 0.3 start, on the same
    unlabelled inputs; functional_call's merged model equals the state it exports."""
    from mergetool.baselines.adamerging import AdaMergingModel, AdaMergingSettings, fit, task_batches

    settings = AdaMergingSettings(steps=8, lr=0.05, batch_size=8)
    model = AdaMergingModel(session, layerwise, torch.device("cpu"), settings.init)
    batches = [task[:2] for task in task_batches(session, settings)]  # 16 inputs per task: a fast test

    def total() -> float:
        with torch.no_grad():
            merged = model.merged()
            return sum(float(model.entropy(t, b, merged)) for t, task in enumerate(batches) for b in task)

    before = total()
    history = fit(model, batches, settings)
    assert len(history) == 8 and total() < before
    assert model.coefficients == (3 * len(model.names) if layerwise else 3)
    assert not torch.equal(model.coef.detach(), torch.full_like(model.coef, 0.3))
    state, merged = model.state(), model.merged()
    assert set(state) == set(model.names) and torch.equal(state[model.names[0]], merged[model.names[0]].detach())


def test_adamerging_describes_its_steps_without_counting_them(session):
    from mergetool.baselines import count_steps, run_baselines
    from mergetool.baselines.adamerging import AdaMergingSettings

    said, details = [], []
    run_baselines(session, methods=["adamerging"], routing="oracle", adamerging=AdaMergingSettings(steps=2),
                  progress=said.append, detail=details.append)
    assert details == [f"adamerging_{k}: step {i}/2" for k in ("task", "layer") for i in (1, 2)]
    assert len(said) == count_steps(session.recipe, split="validation", methods=["adamerging"], twin_ranks=[4],
                                    routing="oracle")  # the bar's total still matches


def test_adamerging_cli_entries_and_bad_steps(trained_zoo, tmp_path):
    from tests.test_baselines import small_recipe

    recipe = tmp_path / "toy.yaml"
    recipe.write_text(small_recipe(trained_zoo))
    bad = runner.invoke(app, ["baselines", str(recipe), "--methods", "adamerging", "--adamerging-steps", "0"])
    assert bad.exit_code == 2 and len(bad.stderr.strip().splitlines()) == 1 and "--adamerging-steps" in bad.stderr
    assert not (tmp_path / "runs").exists()
    result = runner.invoke(app, ["baselines", str(recipe), "--methods", "adamerging", "--adamerging-steps", "3",
                                 "--quiet"])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "runs" / "toy" / "baselines" / "baselines.json").read_text())
    by = {m["id"]: m for m in data["methods"]}
    task, layer = by["adamerging_task"], by["adamerging_layer"]
    assert task["params"]["coefficients"] == 3 and layer["params"]["coefficients"] > 3
    for m in (task, layer):
        assert m["kind"] == "static" and m["storage_cost"] == pytest.approx(1.0) and m["params"]["steps"] == 3
        assert m["params"]["wall_seconds"] > 0 and set(m["params"]["lambda_mean_per_task"]) == set(data["tasks"])


# --- traditional MTL ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mtl_folder(trained_zoo, tmp_path_factory):
    """The toy tasks trained together: one encoder, a head per task (demo/mtl.py's trainer)."""
    from mergetool.demo.mtl import train_mtl
    from mergetool.demo.training import progress_bar

    out = tmp_path_factory.mktemp("mtl")
    classes = {t: [f"class{c}" for c in range(n)] for t, n in zip(trained_zoo["tasks"], (2, 3, 4))}
    with progress_bar(False) as bar:
        result = train_mtl(trained_zoo["base"], trained_zoo["data"], classes, out, epochs=2, lr=5e-3, batch_size=64,
                           progress=bar)
    assert [t.completed for t in bar.tasks] == [result["steps"]]  # the bar counted every step
    return out, result


def test_mtl_trains_one_encoder_with_a_head_per_task(mtl_folder, trained_zoo):
    from safetensors.torch import load_file

    out, result = mtl_folder
    states = {t: load_file(out / t / "model.safetensors") for t in trained_zoo["tasks"]}
    first = states["task0"]
    encoder = [n for n in first if not n.startswith("classifier.")]
    for t, st in states.items():
        assert all(torch.equal(st[n], first[n]) for n in encoder), t
        assert st["classifier.weight"].shape[0] == {"task0": 2, "task1": 3, "task2": 4}[t]
    base = load_file(trained_zoo["base"] / "model.safetensors")
    moved = [n for n in encoder if n.replace("bert.", "", 1) in base]
    assert moved and any(not torch.equal(first[n], base[n.replace("bert.", "", 1)]) for n in moved)  # it trained
    for t, n in zip(trained_zoo["tasks"], (2, 3, 4)):
        assert result["tasks"][t]["validation_accuracy"] > 1.0 / n  # above chance on every task


def test_baselines_mtl_row(mtl_folder, trained_zoo, tmp_path):
    from tests.test_baselines import small_recipe

    recipe = tmp_path / "toy.yaml"
    recipe.write_text(small_recipe(trained_zoo))
    result = runner.invoke(app, ["baselines", str(recipe), "--methods", "wa", "--mtl", str(mtl_folder[0]),
                                 "--quiet"])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "runs" / "toy" / "baselines" / "baselines.json").read_text())
    by = {m["id"]: m for m in data["methods"]}
    assert list(by) == ["individual", "individual_8bit", "pretrained", "mtl", "wa"]
    assert by["mtl"]["storage_cost"] == pytest.approx(1.0) and by["mtl"]["kind"] == "mtl"
    assert by["mtl"]["validation"]["performance"] > by["pretrained"]["validation"]["performance"]


@pytest.mark.parametrize("case", ["missing", "not_one_encoder"])
def test_baselines_mtl_refused(case, trained_zoo, tmp_path):
    from tests.test_baselines import small_recipe

    recipe = tmp_path / "toy.yaml"
    recipe.write_text(small_recipe(trained_zoo))
    folder = tmp_path / "nowhere" if case == "missing" else trained_zoo["base"].parent  # the fine-tunes: 3 encoders
    result = runner.invoke(app, ["baselines", str(recipe), "--methods", "wa", "--mtl", str(folder), "--quiet"])
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and "--mtl" in result.stderr and "Traceback" not in result.output
