"""Racing: subset-then-complete equals one-shot bitwise; decisions do not depend on executor order or resume."""

import json
import math
import zlib

import numpy as np
import pytest

from mergetool.core import grouping
from mergetool.core.errors import MergetoolError
from mergetool.search import EvalResult, SearchSettings, run_search
from mergetool.search.journal import read_journal
from mergetool.search.racing import continues, difference_se, front_points
from mergetool.search.types import RacingSettings
from tests.test_search_core import Killed, Synthetic


class RacingSynthetic(Synthetic):
    """The synthetic black box with a racing subset: the subset score is the full one plus a fixed,
    grouping-dependent error, with a standard error of 0.02."""

    def __init__(self, fail_after=None):
        super().__init__(fail_after)
        self.subset_calls = 0
        self.racing = None

    def use_racing(self, fraction, seed):
        self.racing = (fraction, seed)

    def _noise(self, G) -> float:
        return float(np.random.default_rng(zlib.crc32(grouping.key(G).encode())).normal(0, 0.02))

    def evaluate_subset(self, G):
        if self.fail_after is not None and self.calls + self.subset_calls >= self.fail_after:
            raise Killed("simulated kill")
        self.subset_calls += 1
        full = Synthetic.evaluate(self, G)
        self.calls -= 1  # a subset evaluation is not a full one
        self.seen.pop()
        return EvalResult(full.performance, full.per_task, full.storage_cost, 0.0, {"examples": 25},
                          self._subset(full, G))

    def _subset(self, full, G):
        return {"performance": round(full.performance + self._noise(G), 12), "se": 0.02,
                "per_task": full.per_task, "rows": 100}

    def evaluate(self, G):
        if self.fail_after is not None and self.calls + self.subset_calls >= self.fail_after:
            raise Killed("simulated kill")
        full = Synthetic.evaluate(self, G)
        full.subset = self._subset(full, G)
        full.cache = {"examples": 75}
        return full


class ReversedExecutor:
    """Evaluates a batch in reverse order and yields results out of order (as Ray may)."""

    def map(self, problem, items, part="full"):
        from mergetool.search.executors import evaluate_part

        for i, G in reversed(list(items)):
            yield i, evaluate_part(problem, G, part)


def settings(**kw):
    base = dict(population=10, evaluations=40, seed=3, rf_trees=10, max_evals_per_generation=8, write_artifacts=False,
                racing=RacingSettings(0.25, 0.9))
    base.update(kw)
    return SearchSettings(**base)


def partial_log(path):
    return [(r["i"], r["grouping"], r["continued"]) for r in read_journal(path.with_name("partial.jsonl"))]


@pytest.fixture(scope="module")
def raced(tmp_path_factory):
    d = tmp_path_factory.mktemp("raced")
    p = RacingSynthetic()
    return p, run_search(p, settings(), d / "evaluations.jsonl"), d


def test_racing_drops_candidates_and_counts_full_evaluations(raced):
    p, res, d = raced
    assert res.evaluations == 40 == p.calls and res.partial > 0 and p.subset_calls >= res.partial
    log = partial_log(d / "evaluations.jsonl")
    dropped = [i for i, _, cont in log if not cont]
    full_i = {r["i"] for r in res.records}
    assert dropped and not full_i & set(dropped)  # a dropped candidate never gets a full record
    assert all(r.get("subset") for r in res.records)  # every full record carries its subset score
    assert {f["id"] for f in res.front} <= full_i  # the front comes from full evaluations only
    assert res.examples == 75 * 40 + 25 * p.subset_calls


def test_decision_rule_is_the_upper_bound_against_the_front(raced):
    _, res, d = raced
    front = front_points([r for r in res.records if r["generation"] == 0])
    r = RacingSettings(0.25, 0.9)
    gen1 = [rec for rec in read_journal(d / "partial.jsonl") if rec["generation"] == 1]
    assert gen1 and all(rec["continued"] == continues(rec, front, r) for rec in gen1)


def _sub(items: dict, se: float = 0.05) -> dict:
    per = {t: float(np.mean(x)) for t, x in items.items()}
    return {"performance": float(np.mean(list(per.values()))), "se": se, "per_task": per,
            "per_task_se": {t: se for t in items}, "items": items}


def test_paired_difference_is_tighter_than_two_intervals():
    """Two models that agree on most rows are told apart on the subset by the paired error."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2, 200)
    b = a.copy()
    b[:12] = 0  # b loses up to 12 rows a may get right
    a[:12] = 1
    A, B = _sub({"t": a.tolist()}), _sub({"t": b.tolist()})
    assert difference_se(A, B) < 0.25 * math.hypot(0.05, 0.05)
    assert difference_se(A, A) == 0.0
    r = RacingSettings(confidence=0.95)
    front = [dict(i=0, storage_cost=1.0, performance=A["performance"], subset=A)]
    assert not continues(dict(storage_cost=1.5, subset=B), front, r)  # worse and dearer: dropped
    assert continues(dict(storage_cost=0.5, subset=B), front, r)  # cheaper than every front point: kept
    assert not continues(dict(storage_cost=1.0, subset=A), front, r)  # the same rows at the same C: no gain
    assert continues(dict(storage_cost=2.0, subset=A), front, RacingSettings(margin=0.01))  # slack keeps it
    # without rows (a custom metric) the separate errors are combined
    assert difference_se({"se": 0.03}, {"se": 0.04}) == pytest.approx(0.05)


def test_decisions_do_not_depend_on_evaluation_order(raced, tmp_path):
    _, res, d = raced
    out = run_search(RacingSynthetic(), settings(), tmp_path / "evaluations.jsonl", executor=ReversedExecutor())
    assert [r["grouping"] for r in out.records] == [r["grouping"] for r in res.records]
    assert partial_log(tmp_path / "evaluations.jsonl") == partial_log(d / "evaluations.jsonl")


@pytest.mark.parametrize("kill_after", [12, 31])
def test_decisions_survive_a_resume(raced, tmp_path, kill_after):
    ref, res, d = raced
    path = tmp_path / "evaluations.jsonl"
    with pytest.raises(Killed):
        run_search(RacingSynthetic(fail_after=kill_after), settings(), path)
    p = RacingSynthetic()
    out = run_search(p, settings(), path)
    assert read_journal(path) == read_journal(d / "evaluations.jsonl")
    assert partial_log(path) == partial_log(d / "evaluations.jsonl")
    assert out.front == res.front
    # every evaluation before the kill was journalled and is replayed, not repeated
    assert p.calls + p.subset_calls == ref.calls + ref.subset_calls - kill_after
    assert out.replayed + p.calls == 40


def test_racing_is_part_of_the_fingerprint(raced, tmp_path):
    path = tmp_path / "evaluations.jsonl"
    run_search(RacingSynthetic(), settings(evaluations=12), path)
    with pytest.raises(MergetoolError, match="other settings"):
        run_search(RacingSynthetic(), settings(racing=RacingSettings(0.5, 0.9)), path)
    with pytest.raises(MergetoolError, match="other settings"):
        run_search(RacingSynthetic(), settings(racing=None), path)


def test_a_problem_that_cannot_race_is_refused(tmp_path):
    with pytest.raises(MergetoolError) as e:
        run_search(Synthetic(), settings(), tmp_path / "evaluations.jsonl")
    assert e.value.key == "search.racing" and "--no-racing" in e.value.fix


@pytest.mark.parametrize("kw,key", [({"fraction": 0.0}, "fraction"), ({"fraction": 1.5}, "fraction"),
                                    ({"confidence": 1.0}, "confidence"), ({"margin": -0.01}, "margin")])
def test_bad_racing_settings(kw, key):
    with pytest.raises(MergetoolError) as e:
        RacingSettings(**kw)
    assert e.value.key == f"search.racing.{key}"


def test_journal_lines_are_json(raced):
    _, _, d = raced
    for line in (d / "partial.jsonl").read_text().splitlines():
        assert {"i", "grouping", "subset", "continued"} <= set(json.loads(line))
