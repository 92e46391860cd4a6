"""The evaluation engine: caches are exact, counted and actually skip work."""

from __future__ import annotations

import numpy as np
import pytest

from mergetool.core.grouping import all_shared, all_singletons
from mergetool.pipeline.session import Session
from mergetool.recipe import parse_recipe
from mergetool.testing.toy import trained_recipe


@pytest.fixture(scope="module")
def session(trained_zoo, tmp_path_factory):
    path = tmp_path_factory.mktemp("engine") / "toy.yaml"
    return Session(parse_recipe(trained_recipe(trained_zoo), path), device="cpu")


def test_trained_fixtures_separate_groupings(session):
    p = session.plan
    ev = session.evaluator()
    singles, shared = ev.evaluate(all_singletons(p.T, p.L)), ev.evaluate(all_shared(p.T, p.L))
    assert singles.performance > shared.performance + 0.1  # merging conflicting tasks costs accuracy
    assert singles.storage_cost > shared.storage_cost


def test_cached_scores_equal_uncached_bitwise(session):
    p = session.plan
    cached, naive = session.evaluator(), session.evaluator(caches=False)
    rng = np.random.default_rng(0)
    for _ in range(20):
        G = rng.integers(0, p.T, (p.T, p.L))
        a, b = cached.evaluate(G), naive.evaluate(G)
        assert a.per_task == b.per_task  # exact equality, not approx
        assert a.storage_cost == b.storage_cost
    assert cached.counts["prefix_hits"] > 0 and session.store.hits > 0
    assert naive.counts["stage_calls"] == 0 and naive.counts["forward_calls"] > 0


def test_memo_skips_known_chains(session):
    p = session.plan
    ev = session.evaluator()
    G = all_shared(p.T, p.L)
    ev.evaluate(G)
    before = dict(ev.counts)
    ev.evaluate(G)
    assert ev.counts["memo_hits"] - before["memo_hits"] == p.T
    assert ev.counts["stage_calls"] == before["stage_calls"]


def test_prefix_reuse_runs_only_later_layers(session):
    """Changing the last layer's MLP group reruns that layer and the head, nothing before it."""
    p = session.plan
    ev = session.evaluator()
    G = all_shared(p.T, p.L)
    ev.evaluate(G)
    last_mlp = [c.name for c in p.components].index(f"layer.{max(c.layer or 0 for c in p.components)}.mlp")
    G2 = G.copy()
    G2[0, last_mlp] = 1  # task 0 leaves the shared group at that component: all chains change there
    before = ev.counts["stage_calls"]
    ev.evaluate(G2)
    batches = sum(len(d.batches) for d in ev.data)
    assert ev.counts["stage_calls"] - before == 2 * batches  # the last layer + the head, per batch


def test_staged_outputs_equal_full_forward(session):
    p = session.plan
    G = np.random.default_rng(1).integers(0, p.T, (p.T, p.L))
    staged = session.evaluator().outputs(G, 1)
    full = session.evaluator(caches=False).outputs(G, 1)
    assert np.array_equal(staged, full)


def test_score_store_swaps_experts_exactly(session):
    """Baselines score other stores on the session's prepared data: same numbers as a fresh evaluator."""
    from mergetool.baselines.static import variant
    from mergetool.evaluation.engine import Evaluator
    from mergetool.merge.experts import ExpertStore
    from mergetool.merge.quantize import QuantSpec

    p = session.plan
    G = all_shared(p.T, p.L)
    stores = [ExpertStore(variant(session.recipe, "task_arithmetic", {"lambda": lam}), p, session.base,
                          session.tasks, quantization=QuantSpec(bits=32)) for lam in (0.3, 1.0)]
    swapped = [session.score_store(s, G) for s in stores]
    fresh = [Evaluator(s, device="cpu", caches=False).evaluate(G) for s in stores]
    assert [r.per_task for r in swapped] == [r.per_task for r in fresh]
    assert swapped[0].per_task != swapped[1].per_task  # the swap really changed the experts


def test_prefix_budget_env_overrides(monkeypatch):
    from mergetool.evaluation.engine import default_prefix_budget

    monkeypatch.delenv("MERGETOOL_PREFIX_CACHE_BYTES", raising=False)
    monkeypatch.delenv("MERGETOOL_PREFIX_CACHE_SHARE", raising=False)
    whole = default_prefix_budget()
    assert 0 < whole <= 12 << 30
    monkeypatch.setenv("MERGETOOL_PREFIX_CACHE_SHARE", "3")  # Ray workers on one host split it
    assert default_prefix_budget() <= whole // 3 + (64 << 20)  # free memory moves a little between calls
    monkeypatch.setenv("MERGETOOL_PREFIX_CACHE_BYTES", "12345")
    assert default_prefix_budget() == 12345


def test_prefix_cache_yields_to_memory_pressure(session, monkeypatch):
    """With the host short of memory the prefix cache empties and keeps nothing; scores stay exact."""
    import mergetool.evaluation.engine as engine

    p = session.plan
    G = all_singletons(p.T, p.L)
    ev = session.evaluator()
    expected = ev.evaluate(G).per_task
    assert ev._prefix and ev._prefix_bytes > 0
    monkeypatch.setattr(engine, "memory_is_short", lambda extra: True)
    G2 = G.copy()
    G2[0, 0] = 1
    assert ev.evaluate(G2).per_task == session.evaluator(caches=False).evaluate(G2).per_task
    assert not ev._prefix and ev._prefix_bytes == 0
    monkeypatch.setattr(engine, "memory_is_short", lambda extra: False)
    assert ev.evaluate(G).per_task == expected


def test_memory_is_short_reads_meminfo(monkeypatch):
    monkeypatch.undo()  # the real check, not conftest's stand-in
    from mergetool.evaluation.engine import memory_is_short

    assert memory_is_short(1 << 50)  # a petabyte more would not fit anywhere
    assert isinstance(memory_is_short(0), bool)


def test_cheapest_grouping_costs_least(session):
    """Exhaustive per component, so no grouping (random, all shared, all singletons) costs less."""
    p, store = session.plan, session.store
    best = store.storage_cost(store.cheapest_grouping())
    rng = np.random.default_rng(1)
    others = [all_shared(p.T, p.L), all_singletons(p.T, p.L)] + [rng.integers(0, p.T, (p.T, p.L)) for _ in range(30)]
    assert all(best <= store.storage_cost(G) + 1e-12 for G in others)


def test_release_keeps_only_the_search_evaluator(session):
    p = session.plan
    G = all_shared(p.T, p.L)
    search_ev = session.evaluator()
    session.evaluator(quantized=False).evaluate(G)
    assert len(session.full_precision_store._cache) > 0
    session.release()
    assert list(session._evaluators) == [("validation", True, True)] and session.evaluator() is search_ev
    assert "full_precision_store" not in session.__dict__
    assert session.evaluator(quantized=False).evaluate(G).per_task  # rebuilt on demand


def test_raced_then_completed_equals_one_shot_bitwise(session):
    """Racing: subset first, then the other batches, gives exactly the one-shot scores; the subset's
    batches are not run twice, and the subset is a label-stratified part of the split."""
    from mergetool.evaluation.engine import Evaluator

    p = session.plan
    raced, one_shot, plain = (Evaluator(session.store, device="cpu", batch_size=8) for _ in range(3))
    raced.use_subset(0.25, seed=0)
    one_shot.use_subset(0.25, seed=0)
    n_rows = [len(d.labels) for d in raced.data]
    rng = np.random.default_rng(1)
    for _ in range(6):
        G = rng.integers(0, p.T, (p.T, p.L))
        sub = raced.evaluate_subset(G)
        done, direct, ref = raced.evaluate(G), one_shot.evaluate(G), plain.evaluate(G)
        assert done.per_task == direct.per_task == ref.per_task  # bitwise, not approx
        assert done.subset == direct.subset and sub.subset["per_task"] == done.subset["per_task"]
        assert 0 < sub.subset["rows"] < sum(n_rows) and 0 < sub.subset["se"] < 1
        items = sub.subset["items"]  # accuracy tasks: each subset row's 0/1 score, for paired racing
        assert set(items) == set(p.tasks) and sum(len(x) for x in items.values()) == sub.subset["rows"]
        for t, x in items.items():
            assert np.mean(x) == sub.subset["per_task"][t]
        assert ref.subset is None
    assert raced.counts["examples"] == one_shot.counts["examples"] == plain.counts["examples"]
    for d, ids in zip(raced.data, raced.subsets):
        assert 0 < len(ids) < len(d.batches)


def test_racing_subset_is_stratified_and_fixed(session):
    from mergetool.evaluation.engine import Evaluator
    from mergetool.evaluation.racing import batch_rows, draw_subset

    ev = Evaluator(session.store, device="cpu", batch_size=4)
    for d in ev.data:
        ids = draw_subset(d, 0.5, seed=7)
        assert ids == draw_subset(d, 0.5, seed=7)  # drawn from the seed alone
        rows = np.concatenate([batch_rows(d)[b] for b in ids])
        labels = np.asarray(d.labels)
        for c in np.unique(labels):  # each class near half its count
            assert abs(np.sum(labels[rows] == c) - 0.5 * np.sum(labels == c)) <= 0.25 * np.sum(labels == c) + 2
        assert draw_subset(d, 1.0, seed=7) == tuple(range(len(d.batches)))


@pytest.mark.parametrize("spec", [None, ("conditional", "per_tensor", 4), ("always", "per_channel", 3),
                                  ("never", "per_channel", 8)])
def test_exact_cost_without_building_equals_built(session, spec):
    """C from Q's decision alone (no expert quantised, packed or held) equals C of the built experts."""
    from mergetool.core.grouping import experts
    from mergetool.core.storage import storage_cost
    from mergetool.merge.experts import ExpertStore
    from mergetool.merge.quantize import QuantSpec

    q = None if spec is None else QuantSpec(bits=spec[2], granularity=spec[1], mode=spec[0])
    make = lambda: ExpertStore(session.recipe, session.plan, session.base, session.tasks, quantization=q)  # noqa: E731
    counted, built = make(), make()
    p = session.plan
    rng = np.random.default_rng(5)
    for G in [all_shared(p.T, p.L), all_singletons(p.T, p.L)] + [rng.integers(0, p.T, (p.T, p.L)) for _ in range(8)]:
        bits = sum(built.expert(l, m).bits for l, m in experts(G))
        assert counted.storage_cost(G) == storage_cost(bits, d=p.d, base_bits=p.base_bits)  # exactly
    stats = counted.stats()
    assert stats["expert_misses"] == 0 and stats["experts_cached"] == 0 and stats["experts_counted"] > 0
    ablation = make()
    ablation.count_cost = False  # the --build-for-cost ablation: same C, every expert built
    G = all_shared(p.T, p.L)
    assert ablation.storage_cost(G) == counted.storage_cost(G)
    assert ablation.stats()["experts_counted"] == 0 and ablation.stats()["expert_misses"] == p.L
