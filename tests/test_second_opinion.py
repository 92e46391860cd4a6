"""The router's second opinion: unsure inputs also run the runner-up chain with its own head, and keep the
(task, label) of larger router probability × head confidence. On the toy routed library."""

from __future__ import annotations

import json

import pytest

from mergetool.inference.second_opinion import check_threshold, decide, runner_up, unsure


@pytest.fixture(scope="module")
def lib(routed):
    from mergetool import ExpertLibrary

    return ExpertLibrary.load(routed["lib"], device="cpu")


def fixed_routing(monkeypatch, lib, probs_of):
    """The library's own prefix states, with router probabilities probs_of(i) for input i."""
    original = type(lib)._route

    def fake(self, encs, batch_size):
        _, states, _ = original(self, encs, batch_size)
        probs = [probs_of(i) for i in range(len(encs))]
        names = self.router_tasks
        return [names[max(range(len(p)), key=p.__getitem__)] for p in probs], states, probs

    monkeypatch.setattr(type(lib), "_route", fake)


def own_and_other(lib, routed):
    """A task0 test text that task0's chain and head answer more confidently than task1's do, with both
    confidences."""
    texts = [json.loads(x)["text"] for x in routed["zoo"]["data"]["task0"]["test"].read_text().splitlines()[:40]]
    own = lib.predict(texts, task="task0")
    other = lib.predict(texts, task="task1")
    best = max(range(len(texts)), key=lambda i: own[i]["score"] / other[i]["score"])
    assert own[best]["score"] > other[best]["score"]
    return texts[best], own[best], other[best]


def test_second_opinion_picks_the_right_task(lib, routed, monkeypatch):
    text, own, other = own_and_other(lib, routed)
    names = lib.router_tasks
    # the router slightly prefers task1; task0's head is the more confident, enough to win the product
    ratio = own["score"] / other["score"]
    p1 = min(0.6, ratio / (1 + ratio) - 1e-3)
    p = {"task1": p1, "task0": 1 - p1, "task2": 0.0}
    assert p["task1"] > p["task0"] and p["task0"] * own["score"] > p["task1"] * other["score"]
    fixed_routing(monkeypatch, lib, lambda i: [p[n] for n in names])
    plain = lib.predict([text])[0]
    assert plain["task"] == "task1" and plain["label"] == other["label"]
    before = lib.stats["second_opinion"]
    res = lib.predict([text], second_opinion=0.9, return_logits=True)[0]
    assert res["task"] == "task0" and res["label"] == own["label"] and res["second_opinion"] is True
    assert abs(res["score"] - own["score"]) < 1e-5 and "chain" not in res
    assert lib.stats["second_opinion"] == before + 1
    # confident enough: no second opinion below the top probability
    assert lib.predict([text], second_opinion=p1 - 1e-6)[0]["task"] == "task1"
    # the library's default threshold applies when predict is given none
    lib.second_opinion = 0.9
    try:
        assert lib.predict([text])[0]["task"] == "task0"
    finally:
        lib.second_opinion = None


def test_second_opinion_keeps_the_first_when_it_wins(lib, routed, monkeypatch):
    text, own, other = own_and_other(lib, routed)
    names = lib.router_tasks
    p = {"task0": 0.55, "task1": 0.44, "task2": 0.01}  # task0 first, and more confident too
    fixed_routing(monkeypatch, lib, lambda i: [p[n] for n in names])
    res = lib.predict([text], second_opinion=0.9, return_logits=True)[0]
    assert res["task"] == "task0" and res["second_opinion"] is True


def test_only_routed_inputs_get_a_second_opinion(lib, routed, monkeypatch):
    text, own, other = own_and_other(lib, routed)
    names = lib.router_tasks
    p = {"task1": 0.5, "task0": 0.49, "task2": 0.01}
    fixed_routing(monkeypatch, lib, lambda i: [p[n] for n in names])
    before = lib.stats["second_opinion"]
    res = lib.predict([text, text], task=[None, "task1"], second_opinion=0.9)
    assert res[1]["task"] == "task1" and lib.stats["second_opinion"] == before + 1


def test_rule_helpers():
    assert unsure([[0.5, 0.4, 0.1], [0.95, 0.04, 0.01], [0.3, 0.3, 0.4]], [True, True, False], 0.9) == [0]
    assert runner_up([0.5, 0.1, 0.4], ["a", "b", "c"]) == "c"
    assert decide(0.5, 0.6, 0.45, 0.9) and not decide(0.5, 0.9, 0.45, 0.9) and not decide(0.5, 0.5, 0.5, 0.5)
    assert check_threshold(None) is None and check_threshold(1) == 1.0
    from mergetool.core.errors import MergetoolError

    for bad in (0, 1.01, -1, True, "0.9"):
        with pytest.raises(MergetoolError, match=r"\(0, 1\]"):
            check_threshold(bad)


def test_predict_cli_second_opinion(routed, tmp_path):
    from routed import invoke

    src = tmp_path / "in.jsonl"
    texts = [json.loads(x)["text"] for t in ("task0", "task1", "task2")
             for x in routed["zoo"]["data"][t]["test"].read_text().splitlines()[:10]]
    src.write_text("".join(json.dumps({"text": x}) + "\n" for x in texts))
    result, text = invoke("predict", routed["lib"], "--input", src, "--output", tmp_path / "o.jsonl",
                          "--second-opinion", "1.0", "-q")
    assert result.exit_code == 0, text
    assert "second opinion on 30 input(s)" in text  # a probability below 1 everywhere: all are asked
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 30
