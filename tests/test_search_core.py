"""Search core on a synthetic black box: front, budget, surrogate, resume, HV, pick, Ray."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mergetool.core import grouping
from mergetool.core.errors import MergetoolError
from mergetool.search import EvalResult, SearchSettings, run_search
from mergetool.search.front import hv_curve, hypervolume, pareto_front, pick
from mergetool.search.journal import read_journal

# latent task clusters per component: sharing across clusters hurts, within a cluster is nearly free
CLUSTERS = np.array([[0, 0, 1, 1], [0, 1, 0, 1], [0, 0, 0, 1], [0, 1, 2, 3], [0, 0, 0, 0], [0, 0, 1, 2]]).T
SIZES = np.array([1.0, 2.0, 1.0, 3.0, 1.0, 2.0]) / 10.0  # component share of the model (sums to 1)


class Killed(RuntimeError):
    pass


class Synthetic:
    """Deterministic black box, T=4 tasks, L=6 components. C = sum_l size_l * N_l (1 .. T)."""

    T, L = CLUSTERS.shape

    def __init__(self, fail_after=None):
        self.calls = 0
        self.fail_after = fail_after
        self.seen = []

    def storage_cost(self, G):
        return round(float(np.sum(SIZES * grouping.n_groups(G))), 12)

    def evaluate(self, G):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise Killed("simulated kill")
        self.calls += 1
        G = np.asarray(G)
        self.seen.append(grouping.key(G))
        per_task = {}
        for t in range(self.T):
            bad = loss = 0.0
            for l in range(self.L):
                mates = np.flatnonzero(G[:, l] == G[t, l])
                bad += SIZES[l] * np.sum(CLUSTERS[mates, l] != CLUSTERS[t, l]) / (self.T - 1)
                loss += SIZES[l] * (len(mates) - 1) / (self.T - 1)
            per_task[f"task{t}"] = round(1.0 - 0.6 * bad - 0.05 * loss, 12)
        perf = float(np.mean(list(per_task.values())))
        return EvalResult(perf, per_task, self.storage_cost(G), 0.0, {"hits": 1, "misses": 1})

    def task_vectors(self):
        rng = np.random.default_rng(123)
        out = []
        for l in range(self.L):
            centres = rng.normal(size=(self.T, 8))
            out.append(centres[CLUSTERS[:, l]] + 0.05 * rng.normal(size=(self.T, 8)))
        return out


def settings(**kw):
    base = dict(population=10, evaluations=48, seed=3, rf_trees=10, max_evals_per_generation=6, write_artifacts=False)
    base.update(kw)
    return SearchSettings(**base)


def front_of(res):
    return [(f["id"], f["grouping"], f["performance"], f["storage_cost"]) for f in res.front]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted surrogate run, shared by the comparisons."""
    d = tmp_path_factory.mktemp("ref")
    p = Synthetic()
    res = run_search(p, settings(write_artifacts=True), d / "evaluations.jsonl")
    return p, res, d


def test_search_front_and_artifacts(reference):
    p, res, d = reference
    assert res.evaluations == 48 == p.calls == res.evaluated_now
    assert len(res.front) >= 3
    assert len({f["storage_cost"] for f in res.front}) == len(res.front)
    keys = [grouping.key(r["grouping"]) for r in res.records]
    assert grouping.key(grouping.all_singletons(4, 6)) in keys
    assert grouping.key(grouping.all_shared(4, 6)) in keys
    assert len(set(keys)) == len(keys) == len(set(p.seen))  # no configuration evaluated twice
    assert res.init_used == "kmeans" and res.stopped == "budget"
    assert json.loads((d / "front.json").read_text()) == res.front
    assert (d / "hv.csv").read_text().splitlines()[0] == "evaluations,hv"
    assert (d / "pareto.png").stat().st_size > 0 and (d / "hv.png").stat().st_size > 0
    assert [r["i"] for r in read_journal(d / "evaluations.jsonl")] == list(range(48))


def test_surrogate_screens_more_than_it_evaluates(reference):
    _, res, _ = reference
    later = [r for r in res.records if r["generation"] > 0]
    assert later and all(r["predicted_performance"] is not None for r in later)
    assert res.screened > len(later)
    assert res.kendall_tau is not None and -1.0 <= res.kendall_tau <= 1.0


def test_search_improves_on_initial_population(reference):
    _, res, _ = reference
    init = [r for r in res.records if r["generation"] == 0]
    assert len(init) == 10
    assert res.hv > hypervolume(init, res.hv_ref) > 0
    assert res.hv <= 1.0 * 5  # P <= 1 and C_ref = T + 1
    assert max(f["performance"] for f in res.front) == pytest.approx(1.0)  # all singletons


@pytest.mark.parametrize("surrogate,init", [("none", "kmeans"), ("random_forest", "random")])
def test_ablations_respect_budget(tmp_path, surrogate, init):
    p = Synthetic()
    res = run_search(p, settings(surrogate=surrogate, init=init, evaluations=40), tmp_path / "evaluations.jsonl")
    assert res.evaluations == p.calls == 40
    assert len(set(p.seen)) == 40
    if surrogate == "none":
        assert res.screened == 0 and all(r["predicted_performance"] is None for r in res.records)


@pytest.mark.parametrize("kill_after", [4, 29])
def test_resume_after_kill_matches_uninterrupted(tmp_path, reference, kill_after):
    _, ref, _ = reference
    path = tmp_path / "evaluations.jsonl"
    with pytest.raises(Killed):
        run_search(Synthetic(fail_after=kill_after), settings(), path)
    assert len(read_journal(path)) == kill_after
    p = Synthetic()
    res = run_search(p, settings(), path)
    assert p.calls == 48 - kill_after and res.replayed == kill_after  # nothing repeated
    assert res.evaluations == 48 == len(read_journal(path))
    assert set(p.seen).isdisjoint({grouping.key(r["grouping"]) for r in res.records[:kill_after]})
    assert front_of(res) == front_of(ref)
    assert [r["grouping"] for r in res.records] == [r["grouping"] for r in ref.records]
    if kill_after == 29:  # a finished run resumes to the same result without evaluating
        p2 = Synthetic()
        assert front_of(run_search(p2, settings(), path)) == front_of(ref) and p2.calls == 0


def test_missing_newline_kept(tmp_path):
    path = tmp_path / "evaluations.jsonl"
    with pytest.raises(Killed):
        run_search(Synthetic(fail_after=5), settings(), path)
    path.write_text(path.read_text().rstrip("\n"))
    p = Synthetic()
    run_search(p, settings(evaluations=12), path)
    assert p.calls == 7 and len(read_journal(path)) == 12


KILL_SCRIPT = """
import sys, time
sys.path.insert(0, sys.argv[1])
import test_search_core as m
from mergetool.search import run_search

class Slow(m.Synthetic):
    def evaluate(self, G):
        time.sleep(0.02)
        return super().evaluate(G)

run_search(Slow(), m.settings(), sys.argv[2])
"""


def test_resume_after_real_kill_9_and_cut_line(tmp_path, reference):
    _, ref, _ = reference
    path = tmp_path / "evaluations.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(Path(__file__).parent), str(path)])
    try:
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            if path.exists() and path.read_bytes().count(b"\n") >= 20:
                break
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    done = len(read_journal(path))
    assert 20 <= done < 48
    with open(path, "a") as f:  # as if killed in the middle of writing the next line
        f.write('{"i": %d, "grouping": [[0, 0' % done)
    assert len(read_journal(path)) == done
    p = Synthetic()
    res = run_search(p, settings(), path)
    assert p.calls == 48 - done and res.evaluations == 48 == len(read_journal(path))
    assert front_of(res) == front_of(ref)
    assert all(json.loads(x) for x in path.read_text().splitlines())  # the cut line was dropped


def test_budget_can_grow_on_resume(tmp_path, reference):
    _, ref, _ = reference
    path = tmp_path / "evaluations.jsonl"
    run_search(Synthetic(), settings(evaluations=25), path)
    p = Synthetic()
    res = run_search(p, settings(), path)
    assert p.calls == 23 and front_of(res) == front_of(ref)
    with pytest.raises(MergetoolError, match="more than the budget"):
        run_search(Synthetic(), settings(evaluations=10), path)


def test_resume_with_other_settings_is_refused(tmp_path):
    path = tmp_path / "evaluations.jsonl"
    run_search(Synthetic(), settings(evaluations=12), path)
    with pytest.raises(MergetoolError, match="other settings"):
        run_search(Synthetic(), settings(evaluations=12, seed=4), path)


def test_progress_and_hv_monotone(tmp_path):
    calls = []
    res = run_search(Synthetic(), settings(evaluations=30), tmp_path / "e.jsonl", progress=lambda *a: calls.append(a))
    assert calls[-1][0] == 30 and calls[-1][1] == 30
    assert calls[-1][2] == pytest.approx(res.hv) and calls[-1][4] == pytest.approx(0.5)
    hv = [h for _, h in res.hv_curve]
    assert len(hv) == 30 and all(b >= a for a, b in zip(hv, hv[1:]))
    assert hv[-1] == pytest.approx(hypervolume(res.records, res.hv_ref))
    assert res.hv_ref == (0.0, 5.0)


def test_tiny_space_is_exhausted(tmp_path):
    class Tiny(Synthetic):
        T, L = 2, 1
        task_vectors = None

        def evaluate(self, G):
            self.calls += 1
            return EvalResult(float(G[1, 0] != G[0, 0]), {"a": 1.0}, float(grouping.n_groups(G).sum()))

    p = Tiny()
    res = run_search(p, settings(population=4, evaluations=10), tmp_path / "e.jsonl")
    assert res.stopped == "exhausted" and res.evaluations == p.calls == 2


def test_pick_and_front_helpers():
    recs = [
        {"i": 0, "grouping": [[0]], "performance": 0.5, "storage_cost": 1.0, "per_task": {}},
        {"i": 1, "grouping": [[0]], "performance": 0.9, "storage_cost": 3.0, "per_task": {}},
        {"i": 2, "grouping": [[0]], "performance": 0.4, "storage_cost": 2.0, "per_task": {}},  # dominated
        {"i": 3, "grouping": [[0]], "performance": 0.7, "storage_cost": 2.0, "per_task": {}},
    ]
    front = pareto_front(recs)
    assert [f["id"] for f in front] == [0, 3, 1]
    assert pick(front, 2.5)["id"] == 3 and pick(front, 10)["id"] == 1 and pick(front, 1.0)["id"] == 0
    with pytest.raises(MergetoolError, match="smallest storage cost available is 1"):
        pick(front, 0.5)
    assert hypervolume(recs, (0.0, 4.0)) == pytest.approx(0.5 * 1 + 0.7 * 1 + 0.9 * 1)
    assert [n for n, _ in hv_curve(recs, (0.0, 4.0))] == [1, 2, 3, 4]


def test_ray_missing_is_a_clear_error(monkeypatch):
    from mergetool.search.executors import RayExecutor, make_executor

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(MergetoolError, match="needs the 'ray' package"):
        RayExecutor()
    assert make_executor("local").name == "local"
    with pytest.raises(MergetoolError, match="unknown executor"):
        make_executor("dask")


def _ray():
    try:
        import ray
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("ray is not installed")
    return ray


@pytest.mark.slow
def test_ray_executor_matches_local(tmp_path, reference):
    ray = _ray()
    from mergetool.search.executors import RayExecutor

    _, ref, _ = reference
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with RayExecutor(num_workers=2) as ex:
            res = run_search(Synthetic(), settings(), tmp_path / "evaluations.jsonl", executor=ex)
    finally:
        ray.shutdown()
    assert res.evaluations == 48
    assert front_of(res) == front_of(ref)


def test_one_point_crossover_keeps_parent_prefixes():
    from mergetool.search.operators import crossover

    A = np.zeros((3, 8), dtype=np.int64)
    B = np.array([[0] * 8, [1] * 8, [2] * 8], dtype=np.int64)
    rng = np.random.default_rng(0)
    for _ in range(20):
        c1, c2 = crossover(A, B, rng, 1.0, "one_point")
        cut = int(np.argmax((c1 != A).any(axis=0)))  # first column taken from B
        assert 1 <= cut <= 7
        assert (c1[:, :cut] == A[:, :cut]).all() and (c1[:, cut:] == B[:, cut:]).all()
        assert (c2[:, :cut] == B[:, :cut]).all() and (c2[:, cut:] == A[:, cut:]).all()
    c1, c2 = crossover(A, B, rng, 0.0, "one_point")  # no crossover: copies
    assert (c1 == A).all() and (c2 == B).all()


def test_chain_order_puts_shared_prefixes_next_to_each_other():
    from mergetool.search.operators import chain_order

    a = np.array([[0, 0, 0], [1, 1, 1]])
    b = np.array([[0, 0, 0], [0, 1, 1]])
    c = np.array([[0, 1, 0], [1, 1, 1]])  # same first column as a, then differs
    ordered = chain_order([a, b, c])
    assert [x.tolist() for x in ordered] == [b.tolist(), c.tolist(), a.tolist()]
    assert chain_order([2, 0, 1], key=lambda j: [a, b, c][j]) == [1, 2, 0]


def test_unknown_crossover_is_refused():
    with pytest.raises(MergetoolError, match="crossover"):
        SearchSettings(crossover="two_point")
