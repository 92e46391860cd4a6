"""Task kinds beyond text classification: image_classification, causal_lm_choice, seq2seq_choice.

Tiny random models built offline (mergetool.testing.toy_kinds). Literal log-likelihoods on hand-set weights,
batched scoring equal to one sequence at a time, staged equal to plain forwards, cached evaluation
bitwise equal to naive, and bad data refused with one located line.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mergetool.cli.app import app
from mergetool.core.errors import DataError, MergetoolError, MultiError
from mergetool.core.grouping import all_shared, all_singletons
from mergetool.evaluation.choice import choice_logprobs, choice_predictions, parse_choices
from mergetool.evaluation.runner import TaskModel
from mergetool.pipeline.checks import check_recipe
from mergetool.pipeline.session import Session
from mergetool.recipe import parse_recipe
from mergetool.testing.toy_kinds import (
    KIND_OF,
    VOCAB,
    _jsonl,
    kind_recipe_text,
    make_kind_zoo,
    make_tiny_gpt2,
    make_tiny_t5,
    word_id,
    write_choice_rows,
    write_tiny_images,
)

LOG_V = math.log(VOCAB)


@pytest.fixture(scope="module")
def zoos(tmp_path_factory):
    """zoo(arch) -> (Session, recipe path); each built once."""
    cache: dict = {}

    def get(arch: str) -> tuple[Session, Path]:
        if arch not in cache:
            root = tmp_path_factory.mktemp(f"kinds-{arch}")
            base, tasks = make_kind_zoo(root, arch)
            kind = KIND_OF[arch]
            if kind == "image_classification":
                data = [write_tiny_images(root / f"d{i}", 10, (2, 3)[i], seed=i) for i in range(2)]
            else:
                data = [write_choice_rows(root / f"d{i}.jsonl", 8, seed=i, label_as=("index", "text")[i])
                        for i in range(2)]
            path = root / "recipe.yaml"
            path.write_text(kind_recipe_text(base, tasks, data, kind, batch_size=4))
            cache[arch] = (Session(parse_recipe(path.read_text(), path), device="cpu"), path)
        return cache[arch]

    return get


def same_model_session(root: Path, model: Path, kind: str, rows: list[dict], metric: str = "accuracy") -> Session:
    """base = both tasks = `model`, no quantization: every expert is the model's own weights."""
    data = _jsonl(root / "data.jsonl", rows)
    text = kind_recipe_text(model, [model, model], [data, data], kind, metric=metric,
                            extra="quantization: {bits: none}\n")
    return Session(parse_recipe(text, root / "r.yaml"), device="cpu")


# --- literal log-likelihoods ---------------------------------------------------------------------
def test_choice_logprobs_by_hand():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]]]))
    batch = {"target_ids": torch.tensor([[1, 1, 0]]), "target_mask": torch.tensor([[False, True, True]])}
    assert choice_logprobs(logits, batch).item() == pytest.approx(math.log(0.8) + math.log(1 / 3), abs=1e-6)
    pairs = np.array([[0, 0], [0, 1], [1, 1], [1, 0]])
    assert list(choice_predictions(np.array([-3.0, -1.0, -2.0, -2.0]), pairs, 2)) == [1, 0]  # tie: first choice
    assert list(choice_predictions(np.array([-3.0, -2.0, -1.0, -4.0]), pairs, 2, np.array([3, 1, 1, 1.0]))) == [0, 1]


def test_uniform_gpt2_and_acc_norm(tmp_path):
    """All weights zero: every token has log-probability -log V, so a choice scores -n_tokens*log V;
    accuracy prefers fewer tokens, acc_norm (per character) the longer text."""
    model = make_tiny_gpt2(tmp_path / "zero")
    sd = {k: torch.zeros_like(v) for k, v in load_file(model / "model.safetensors").items()}
    save_file(sd, model / "model.safetensors", metadata={"format": "pt"})
    rows = [{"text": "w1 w2", "choices": ["w3", "w10 w11 w12"], "label": 1}]
    for metric, expected in (("accuracy", 0.0), ("acc_norm", 1.0)):
        s = same_model_session(tmp_path / metric, model, "causal_lm_choice", rows, metric)
        ev = s.evaluator()
        G = all_shared(2, s.plan.L)
        out = ev.outputs(G, 0)
        order = [tuple(p) for p in ev.data[0].pairs]
        got = {c: out[order.index((0, c))] for c in (0, 1)}
        assert got[0] == pytest.approx(-LOG_V, abs=1e-5) and got[1] == pytest.approx(-3 * LOG_V, abs=1e-5)
        assert ev.evaluate(G).per_task == {"t0": expected, "t1": expected}


def test_peaked_gpt2_exact_logprob(tmp_path):
    """Untied head, zero weights, ln_f.bias = 10*e_0 and lm_head[w5, 0] = 1: logit(w5) = 10, others 0."""
    model = make_tiny_gpt2(tmp_path / "peak", tie=False)
    sd = {k: torch.zeros_like(v) for k, v in load_file(model / "model.safetensors").items()}
    sd["transformer.ln_f.bias"][0] = 10.0
    sd["lm_head.weight"][word_id("w5"), 0] = 1.0
    save_file(sd, model / "model.safetensors", metadata={"format": "pt"})
    rows = [{"text": "w1", "choices": ["w6", "w5", "w5 w5", "w5 w6"], "label": "w5"}]
    s = same_model_session(tmp_path, model, "causal_lm_choice", rows)
    ev = s.evaluator()
    out = ev.outputs(all_singletons(2, s.plan.L), 1)
    z = math.log(math.exp(10) + VOCAB - 1)
    expected = {0: -z, 1: 10 - z, 2: 2 * (10 - z), 3: 10 - 2 * z}
    for i, (r, c) in enumerate(ev.data[1].pairs):
        assert out[i] == pytest.approx(expected[c], abs=1e-5)
    assert ev.evaluate(all_singletons(2, s.plan.L)).per_task == {"t0": 1.0, "t1": 1.0}


def test_uniform_t5_scores_decoder_targets(tmp_path):
    """Zero T5: uniform next-token distribution; a target is its words plus </s>."""
    model = make_tiny_t5(tmp_path / "zero")
    sd = {k: torch.zeros_like(v) for k, v in load_file(model / "model.safetensors").items()}
    save_file(sd, model / "model.safetensors", metadata={"format": "pt"})
    rows = [{"text": "w1 w2 w3", "choices": ["w4 w5", "w6"], "label": 1}]
    s = same_model_session(tmp_path, model, "seq2seq_choice", rows)
    ev = s.evaluator()
    out = ev.outputs(all_shared(2, s.plan.L), 0)
    for i, (r, c) in enumerate(ev.data[0].pairs):
        assert out[i] == pytest.approx(-(3 - c) * LOG_V, abs=1e-5)
    assert ev.evaluate(all_shared(2, s.plan.L)).per_task["t0"] == 1.0


# --- batched scoring equals one sequence at a time ----------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "llama", "t5"])
def test_batched_padded_equals_single_sequences(zoos, arch):
    s, _ = zoos(arch)
    ev = s.evaluator(caches=False)
    G = np.random.default_rng(0).integers(0, 2, (2, s.plan.L))
    out = ev.outputs(G, 1)  # leaves task 1's chain loaded in its module
    module = ev._models[1].module
    data = ev.data[1]
    i = 0
    for batch in data.batches:
        for j in range(len(batch["input_ids"])):
            n = int(batch["attention_mask"][j].sum())
            with torch.no_grad():
                if arch == "t5":
                    m = int(batch["decoder_attention_mask"][j].sum())
                    logits = module(input_ids=batch["input_ids"][j:j + 1, :n],
                                    decoder_input_ids=batch["decoder_input_ids"][j:j + 1, :m]).logits[0]
                    want = torch.log_softmax(logits, -1)[torch.arange(m), batch["target_ids"][j, :m]].sum()
                else:
                    logits = module(input_ids=batch["input_ids"][j:j + 1, :n]).logits[0]
                    lp = torch.log_softmax(logits[:-1], -1)[torch.arange(n - 1), batch["input_ids"][j, 1:n]]
                    want = lp[batch["target_mask"][j, :n - 1]].sum()
            assert out[i] == pytest.approx(want.item(), abs=1e-5)
            i += 1
    assert i == len(out) == sum(len(r["choices"]) for r in data.records)


# --- staged execution and caches ----------------------------------------------------------------
@pytest.mark.parametrize("arch", ["vit", "clip", "gpt2", "llama", "t5"])
def test_cached_equals_uncached_bitwise(zoos, arch):
    s, _ = zoos(arch)
    cached, naive = s.evaluator(), s.evaluator(caches=False)
    rng = np.random.default_rng(1)
    for _ in range(6):
        G = rng.integers(0, 2, (2, s.plan.L))
        a, b = cached.evaluate(G), naive.evaluate(G)
        assert a.per_task == b.per_task and a.storage_cost == b.storage_cost
        assert all(0.0 <= v <= 1.0 for v in a.per_task.values())
        for t in range(2):
            staged, full = cached.outputs(G, t), naive.outputs(G, t)
            np.testing.assert_allclose(staged, full, rtol=0, atol=1e-5)
    layerable = arch != "t5"
    assert cached._models[0].layerable == layerable
    assert (cached.counts["prefix_hits"] > 0) == layerable and naive.counts["stage_calls"] == 0


def test_tied_head_follows_embeddings_after_prefix_hit(zoos):
    """GPT-2's lm_head is wte: a chain reusing cached layer states must still get its own wte back."""
    s, _ = zoos("gpt2")
    names = [c.name for c in s.plan.components]
    emb, final = names.index("embeddings"), names.index("final_norm")
    assert "lm_head" not in names  # tied: stored once, in the embeddings component
    ev, naive = s.evaluator(), s.evaluator(caches=False)
    assert emb in ev._model(0).stages[-1]
    G1 = all_singletons(2, s.plan.L)
    G2 = G1.copy()
    G2[0, emb] = 1  # task 0 shares its embeddings: every later state changes
    G3 = G1.copy()
    G3[0, final] = 1  # G1's prefix, new head: the head stage alone runs, after G2 loaded other embeddings
    for G in (G1, G2, G3):
        ev.outputs(G, 0)
    before = ev.counts["prefix_hits"]
    np.testing.assert_array_equal(ev.outputs(G3, 0), naive.outputs(G3, 0))
    assert ev.counts["prefix_hits"] == before + 1


def test_checkpoint_storing_tied_weights_twice_is_untied(tmp_path):
    """A tied config whose checkpoint also stores lm_head: both are components, each gets its own tensor."""
    model = make_tiny_gpt2(tmp_path / "both")
    sd = load_file(model / "model.safetensors")
    sd["lm_head.weight"] = 2 * sd["transformer.wte.weight"]
    save_file(sd, model / "model.safetensors", metadata={"format": "pt"})
    s = same_model_session(tmp_path, model, "causal_lm_choice", [{"text": "w1", "choices": ["w2"], "label": 0}])
    assert "lm_head" in [c.name for c in s.plan.components]
    tm = TaskModel(s.plan, s.tasks[0], {}, torch.device("cpu"))
    for l, c in enumerate(s.plan.components):
        tm.load(l, (0,), {n: s.tasks[0].get(n) for n in c.tensors})
    m = tm.module
    assert m.lm_head.weight is not m.transformer.wte.weight and not tm._tied()
    assert torch.equal(m.lm_head.weight, 2 * m.transformer.wte.weight)


# --- bad data -------------------------------------------------------------------------------------
def test_bad_choice_labels_refused(zoos, tmp_path):
    s, path = zoos("gpt2")
    bad = _jsonl(tmp_path / "bad.jsonl", [{"text": "w1", "choices": ["w2", "w3"], "label": 0},
                                          {"text": "w1", "choices": ["w2", "w3"], "label": 2}])
    text = path.read_text().replace(str(s.recipe.tasks["t1"].validation.path), str(bad))
    recipe = parse_recipe(text, tmp_path / "r.yaml")
    with pytest.raises(MultiError) as err:
        check_recipe(recipe, check_values=False)
    line = err.value.lines()[0]
    assert f"{bad}:2: tasks.t1.validation.label: row 2: label 2" in line and "fix: use an index 0..1" in line
    with pytest.raises(DataError, match="row 2: label 2"):
        Session(recipe, device="cpu").evaluator()
    (tmp_path / "r.yaml").write_text(text)
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "r.yaml")])
    assert result.exit_code == 2 and "row 2: label 2" in result.stderr and "Traceback" not in result.stderr


def test_bad_choices_and_missing_images_refused(zoos, tmp_path):
    with pytest.raises(DataError, match="choices must be a non-empty list"):
        parse_choices("not json", file="f.csv", key="k", row=1)
    assert parse_choices('["a", "b"]', file="f.csv", key="k", row=1) == ["a", "b"]  # csv cells hold JSON
    s, path = zoos("vit")
    data = s.recipe.tasks["t0"].validation.path
    rows = Path(data).read_text().replace("images/0-3.png", "images/missing.png")
    bad = Path(data).parent / "bad.jsonl"
    bad.write_text(rows)
    recipe = parse_recipe(path.read_text().replace(str(data), str(bad)), tmp_path / "r.yaml")
    with pytest.raises(MultiError, match="missing.png' does not exist"):
        check_recipe(recipe, check_values=False)
    with pytest.raises(DataError, match="row 4: image .*missing.png"):
        Session(recipe, device="cpu").evaluator()


def test_schema_refuses_mismatched_kind_settings(zoos):
    s, path = zoos("gpt2")
    text = path.read_text()
    with pytest.raises(MergetoolError, match="needs `choices: <column>`"):
        parse_recipe(text.replace(", choices: choices", ""), path)
    with pytest.raises(MergetoolError, match="acc_norm"):
        parse_recipe(text.replace("kind: causal_lm_choice, metric: accuracy",
                                  "kind: sequence_classification, metric: acc_norm"), path)
    with pytest.raises(MergetoolError, match="scores with one of"):
        parse_recipe(text.replace("metric: accuracy", "metric: pearson"), path)
