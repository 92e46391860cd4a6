"""The runtime: exact models, batched by chain, prefix reuse, input order, predict/evaluate CLIs, bad input."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from routed import invoke

from mergetool.pipeline.session import Session
from mergetool.recipe import load_recipe


@pytest.fixture(scope="module")
def lib(routed):
    from mergetool import ExpertLibrary

    return ExpertLibrary.load(routed["lib"], device="cpu")


@pytest.fixture(scope="module")
def session(routed):
    return Session(load_recipe(routed["recipe"]), device="cpu")


@pytest.fixture(scope="module")
def stream(routed):
    """A mixed stream of test inputs: (texts, true tasks), tasks interleaved at random."""
    rows = [(json.loads(line)["text"], t) for t in ("task0", "task1", "task2")
            for line in routed["zoo"]["data"][t]["test"].read_text().splitlines()[:30]]
    random.Random(0).shuffle(rows)
    return [r[0] for r in rows], [r[1] for r in rows]


def _counter(modules):
    calls = {"n": 0}
    hooks = [m.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1)) for m in modules]
    return calls, hooks


def test_assembled_models_are_the_searched_ones_bitwise(lib, session, routed):
    ev = session.evaluator("test")
    for t, name in enumerate(session.plan.tasks):
        model = lib.assemble(name)
        want = session.store.task_state(routed["G"], t) | session.store.own_tensors(t)
        got = model.state_dict()
        names = lib.manifest.task(name).original_names
        assert all(torch.equal(got[names.get(k, k)], v) for k, v in want.items())
        with torch.inference_mode():
            out = torch.cat([model(**b).logits for b in ev.data[t].batches]).numpy()
        assert np.array_equal(out, ev.outputs(routed["G"], t))  # bitwise, on the search's own batches
        texts = [r["text"] for r in ev.data[t].records]
        res = lib.predict(texts, task=name, batch_size=32, return_logits=True)
        assert np.array_equal(np.asarray([r["logits"] for r in res]), out)
    # task1 and task2 share one chain: one backbone; task0 shares layer 0's parameters with it
    a, b, c = (lib.assemble(t) for t in ("task0", "task1", "task2"))
    assert b.bert is c.bert and a.bert is not b.bert and b.classifier is not c.classifier
    assert a.bert.encoder.layer[0].attention.self.query.weight is b.bert.encoder.layer[0].attention.self.query.weight


def test_predict_task_matches_export_model_and_transformers(routed, tmp_path, stream):
    import transformers as tf

    texts = stream[0][:20]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": x}) + "\n" for x in texts))
    result, text = invoke("predict", routed["lib"], "--input", tmp_path / "in.jsonl", "--task", "task2",
                          "--output", tmp_path / "out.jsonl", "--batch-size", "7")
    assert result.exit_code == 0, text
    preds = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    result, text = invoke("export-model", routed["lib"], "--task", "task2", "--out", tmp_path / "m")
    assert result.exit_code == 0, text
    model = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    tok = tf.AutoTokenizer.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        probs = torch.softmax(model(**tok(texts, padding=True, return_tensors="pt")).logits, -1)
    assert [p["line"] for p in preds] == list(range(1, 21)) and {p["task"] for p in preds} == {"task2"}
    assert [p["label"] for p in preds] == [model.config.id2label[i] for i in probs.argmax(-1).tolist()]
    assert np.allclose([p["score"] for p in preds], probs.max(-1).values.numpy(), atol=1e-5)


def test_backbone_runs_once_per_chain_batch(lib, stream):
    texts, truth = stream
    backbones = {id(m.bert): m.bert for m in map(lib.assemble, lib.tasks)}
    assert len(backbones) == 2  # three tasks, two chains
    calls, hooks = _counter([b.encoder.layer[-1] for b in backbones.values()])
    for task, bs in ((None, 16), (truth, 7)):  # routed, then oracle-routed
        before, stat = calls["n"], lib.stats["backbone_calls"]
        res = lib.predict(texts, batch_size=bs, task=task)
        per_chain = {}
        for r in res:
            per_chain[lib.chain(r["task"])] = per_chain.get(lib.chain(r["task"]), 0) + 1
        want = sum(math.ceil(n / bs) for n in per_chain.values())
        assert calls["n"] - before == want == lib.stats["backbone_calls"] - stat < len(texts)
    for h in hooks:
        h.remove()


def test_prefix_runs_once_per_batch(lib, stream):
    texts = stream[0]
    mods = {id(m.bert): m.bert for m in map(lib.assemble, lib.tasks)}.values()
    emb, h1 = _counter([b.embeddings for b in mods])
    layer0, h2 = _counter([b.encoder.layer[0] for b in mods])
    last, h3 = _counter([b.encoder.layer[1] for b in mods])
    lib.predict(texts, batch_size=16)
    batches = math.ceil(len(texts) / 16)
    assert emb["n"] == layer0["n"] == batches  # the router's features and the chains share one pass
    assert last["n"] > 0  # chains continue after the prefix
    for h in h1 + h2 + h3:
        h.remove()


def test_mixed_stream_comes_back_in_input_order(lib, stream):
    texts, truth = stream
    res = lib.predict(texts, batch_size=8)
    order = sorted(range(len(texts)), key=lambda i: (truth[i], texts[i]))
    again = lib.predict([texts[i] for i in order], batch_size=5)
    for j, i in enumerate(order):
        assert again[j]["task"] == res[i]["task"] and again[j]["label"] == res[i]["label"]
        assert abs(again[j]["score"] - res[i]["score"]) < 1e-4
    for i in (0, 17, 55):
        one = lib.predict(texts[i])[0]
        assert (one["task"], one["label"]) == (res[i]["task"], res[i]["label"])
    assert set(res[0]) == {"task", "label", "label_id", "score"} and res[0]["label"].startswith("class")
    acc = np.mean([r["task"] == t for r, t in zip(res, truth)])
    assert acc == pytest.approx(lib.manifest.router.routing_accuracy, abs=0.2)


def test_lru_is_bounded_and_keyed_by_chain(routed):
    from mergetool import ExpertLibrary

    small = ExpertLibrary.load(routed["lib"], device="cpu", max_resident_models=1)
    a = small.assemble("task1")
    assert small.assemble("task2").bert is a.bert  # same chain: still resident
    small.assemble("task0")
    assert len(small._resident) == 1 and small.assemble("task1").bert is not a.bert


def test_import_is_lazy():
    code = "import sys, mergetool; print('torch' in sys.modules, mergetool.ExpertLibrary.__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "mergetool.inference.runtime"]


def test_evaluate_routed_and_oracle(routed, session, tmp_path):
    result, text = invoke("evaluate", routed["lib"], "--recipe", routed["recipe"], "--out", tmp_path / "e.json")
    assert result.exit_code == 0, text
    rep = json.loads((tmp_path / "e.json").read_text())
    searched = session.evaluator("test").evaluate(routed["G"]).per_task
    for t, row in rep["tasks"].items():
        assert row["n"] == 96 and abs(row["oracle"] - searched[t]) <= 1 / 96  # the search's own test score
        assert row["routed"] <= row["oracle"] + 1e-9
    recorded = json.loads((routed["lib"] / "manifest.json").read_text())["router"]["routing_accuracy"]
    assert abs(rep["routing_accuracy"] - recorded) <= 2 / 288  # as recorded at export, up to float noise


# ---------------------------------------------------------------------------------- predict: bad input

def _predict(routed, tmp_path, content: str, *args, name="in.jsonl"):
    src = tmp_path / name
    src.write_text(content)
    out = tmp_path / "out.jsonl"
    result, text = invoke("predict", routed["lib"], "--input", src, "--output", out, "-q", *args)
    lines = out.read_text().splitlines() if out.exists() else None
    return result, text, lines


def test_predict_bad_lines(routed, tmp_path):
    good = json.dumps({"text": "w1 w2 w50"})
    result, text, _ = _predict(routed, tmp_path, f"{good}\n{good}\n{{oops\n")
    assert result.exit_code == 2 and "line 3 is not JSON" in text and "in.jsonl:3" in text
    result, text, _ = _predict(routed, tmp_path, f'{good}\n{{"txt": "w1"}}\n')
    assert result.exit_code == 2 and "line 2 has no field 'text'" in text
    result, text, lines = _predict(routed, tmp_path, f'{good}\n{{oops\n{{"txt": 1}}\n[1]\n\n{good}\n', "--skip-bad")
    assert result.exit_code == 0 and "skipped 3 bad line(s)" in text, text
    assert [json.loads(x)["line"] for x in lines] == [1, 6]
    result, text, lines = _predict(routed, tmp_path, '{"body": "w1 w2"}\n', "--text-field", "body")
    assert result.exit_code == 0 and len(lines) == 1


def test_predict_empty_unknown_task_long_csv_stdin(routed, tmp_path):
    for empty in ("", "\n\n", "id,text\n"):  # nothing to predict is an error, and leaves no output file
        result, text, lines = _predict(routed, tmp_path, empty, name="in.csv" if "," in empty else "in.jsonl")
        assert result.exit_code == 2 and "no inputs to predict" in text and not (tmp_path / "out.jsonl").exists()
    result, text, lines = _predict(routed, tmp_path, "{oops\n", "--skip-bad")
    assert result.exit_code == 2 and "1 bad line(s) skipped" in text
    result, text, lines = _predict(routed, tmp_path, '{"text": "w1"}\n', "--task", "nope")
    assert result.exit_code == 2 and "not in this library" in text and "task0" in text
    long = " ".join(["w5"] * 100)
    result, text, lines = _predict(routed, tmp_path, f'{{"text": "{long}"}}\n{{"text": "w1"}}\n')
    assert result.exit_code == 0 and "truncated 1 input(s) to 32 tokens" in text and len(lines) == 2
    result, text, lines = _predict(routed, tmp_path, 'id,text\n1,w1 w2\n2,"w3, w4"\n', name="in.csv")
    assert result.exit_code == 0 and [json.loads(x)["line"] for x in lines] == [2, 3]
    result, text, _ = _predict(routed, tmp_path, "id,body\n1,w1\n", name="bad.csv")
    assert result.exit_code == 2 and "no column 'text'" in text
    result, text = invoke("predict", routed["lib"], "--input", "-", "-q", input='{"text": "w1 w2"}\n')
    assert result.exit_code == 0 and json.loads(result.stdout.splitlines()[0])["line"] == 1


def test_put_moves_tied_aliases_and_counts_them_loaded(tmp_path):
    """Assembling a model with tied weights (GPT-2 lm_head = wte) keeps the tie and reports nothing missing."""
    import transformers

    from mergetool.routing import backbone as bb
    from mergetool.testing.toy_kinds import make_tiny_gpt2

    module = transformers.GPT2LMHeadModel.from_pretrained(make_tiny_gpt2(tmp_path / "gpt2"))
    sd = module.state_dict()
    loaded = set()
    for name, t in sd.items():
        if name != "lm_head.weight":
            loaded.add(bb.put(module, name, torch.full_like(t, 0.5)))
    assert module.lm_head.weight is module.transformer.wte.weight
    assert float(module.lm_head.weight[0, 0]) == 0.5
    assert bb.unloaded(module, loaded) == []
    assert bb.unloaded(module, loaded - {"transformer.ln_f.bias"}) == ["transformer.ln_f.bias"]


def test_predict_never_destroys_files(routed, tmp_path):
    """--output is written aside and renamed at the end: the input is never the output, and a bad line
    anywhere leaves whatever was at --output untouched (and no temp file)."""
    good = json.dumps({"text": "w1 w2 w50"})
    src = tmp_path / "in.jsonl"
    src.write_text(f"{good}\n" * 3)
    result, text = invoke("predict", routed["lib"], "--input", src, "--output", src, "-q")
    assert result.exit_code == 2 and "destroy the input" in text and src.read_text() == f"{good}\n" * 3
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(f"{good}\n" * 300 + "{oops\n")
    result, text = invoke("predict", routed["lib"], "--input", bad, "--output", out, "-q", "--batch-size", "8")
    assert result.exit_code == 2 and "line 301" in text
    assert out.read_text() == "precious\n" and sorted(p.name for p in tmp_path.iterdir()) == \
        ["bad.jsonl", "in.jsonl", "out.jsonl"]
    result, text = invoke("predict", routed["lib"], "--input", src, "--output", tmp_path, "-q")
    assert result.exit_code == 2 and "is a directory" in text
    result, text = invoke("predict", routed["lib"], "--input", src, "--output", tmp_path / "no" / "o.jsonl", "-q")
    assert result.exit_code == 2 and "does not exist" in text


def test_evaluate_never_follows_the_librarys_own_data_paths(routed, tmp_path):
    """The manifest's recipe is untrusted: evaluate takes data only from a --recipe the user gives."""
    out = tmp_path / "e.json"
    result, text = invoke("evaluate", routed["lib"], "--out", out)
    assert result.exit_code == 2 and "Missing option '--recipe'" in text and "Traceback" not in text
    assert len(text.strip().splitlines()) == 1 and not out.exists()


def test_predict_bad_inputs_and_device(routed, tmp_path):
    """A missing or directory input, non-UTF-8 bytes and an unknown device: one line, exit 2, nothing left."""
    out = tmp_path / "o.jsonl"
    for src, expected in ((tmp_path / "missing.jsonl", "not found"), (tmp_path, "is a directory")):
        result, text = invoke("predict", routed["lib"], "--input", src, "--output", out, "-q")
        assert result.exit_code == 2 and expected in text and "Traceback" not in text
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "w1 w2"}\n' * 50 + '{"text": "caf\xe9"}\n'.encode("latin-1"))
    result, text = invoke("predict", routed["lib"], "--input", latin, "--output", out, "-q")
    assert result.exit_code == 2 and "not UTF-8" in text and "Traceback" not in text
    result, text = invoke("predict", routed["lib"], "--input", latin, "--device", "tpu", "-q")
    assert result.exit_code == 2 and "unknown device 'tpu'" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latin.jsonl"]


def test_length_batches_bound_padding_and_batch_size():
    from mergetool.inference.inputs import length_batches

    lengths = {0: 256, 1: 200, 2: 128, 3: 127, 4: 40, 5: 30, 6: 20, 7: 20, 8: 10}
    rows = sorted(lengths, key=lambda i: -lengths[i])
    assert length_batches(rows, lengths, 64) == [[0, 1, 2], [3], [4, 5, 6, 7], [8]]  # 127 · 2 < 256; 10 · 2 < 40
    assert length_batches(rows, lengths, 2) == [[0, 1], [2, 3], [4, 5], [6, 7], [8]]
    assert length_batches(rows, lengths, 64, spread=100) == [rows]
    assert length_batches([], lengths, 8) == []
