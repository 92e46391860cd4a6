"""Grouping matrices: canonical form, keys, chains, encoding, Bell numbers."""

import math

import numpy as np
import pytest

from mergetool.core import grouping
from mergetool.core.errors import MergetoolError


def relabel(G: np.ndarray, seed: int) -> np.ndarray:
    """Permute the labels of every column independently (same partitions)."""
    rng = np.random.default_rng(seed)
    out = G.copy()
    T = G.shape[0]
    for l in range(G.shape[1]):
        perm = rng.permutation(T)
        out[:, l] = perm[G[:, l]]
    return out


G0 = np.array([[2, 0, 1], [0, 0, 1], [2, 3, 0], [1, 3, 1]])


def test_canonical_first_appearance():
    c = grouping.canonical(G0)
    assert c.tolist() == [[0, 0, 0], [1, 0, 0], [0, 1, 1], [2, 1, 0]]
    assert np.array_equal(grouping.canonical(c), c)  # idempotent
    assert c.dtype == np.int64


@pytest.mark.parametrize("seed", range(5))
def test_keys_invariant_to_label_permutation(seed):
    G = relabel(G0, seed)
    assert grouping.key(G) == grouping.key(G0)
    assert np.array_equal(grouping.canonical(G), grouping.canonical(G0))
    for t in range(4):
        assert grouping.chain_key(G, t) == grouping.chain_key(G0, t)
    assert np.array_equal(grouping.co_membership(G), grouping.co_membership(G0))
    assert grouping.experts(G) == grouping.experts(G0)


def test_key_round_trip_and_distinct():
    k = grouping.key(G0)
    G1 = G0.copy()
    G1[3, 2] = 0  # task 3 joins task 2's group at component 2
    assert grouping.key(G1) != k


def test_chain_and_expert_keys():
    assert grouping.chain_key(G0, 0) == ((0, 2), (0, 1), (0, 1, 3))
    assert grouping.chain_key(G0, 3) == ((3,), (2, 3), (0, 1, 3))
    assert grouping.expert_key(2, [3, 0, 1]) == (2, (0, 1, 3))
    assert grouping.n_groups(G0).tolist() == [3, 2, 2]
    with pytest.raises(MergetoolError):
        grouping.chain_key(G0, 4)


def test_co_membership_bits():
    G = np.array([[0, 0], [0, 1], [1, 0]])
    # pairs (0,1), (0,2), (1,2) per component
    assert grouping.co_membership(G).tolist() == [1, 0, 0, 0, 1, 0]
    assert len(grouping.co_membership(np.zeros((5, 7), int))) == 7 * 10
    assert grouping.co_membership(grouping.all_shared(4, 2)).sum() == 12
    assert grouping.co_membership(grouping.all_singletons(4, 2)).sum() == 0


def test_anchors_and_validate():
    assert grouping.all_singletons(3, 2).tolist() == [[0, 0], [1, 1], [2, 2]]
    assert grouping.all_shared(3, 2).tolist() == [[0, 0]] * 3
    assert grouping.validate(G0, 4, 3).shape == (4, 3)
    with pytest.raises(MergetoolError, match="shape 4x3, expected 4x2"):
        grouping.validate(G0, 4, 2)
    with pytest.raises(MergetoolError, match="outside 0..3"):
        grouping.validate(np.array([[0], [4], [0], [0]]), 4, 1)
    with pytest.raises(MergetoolError, match="outside"):
        grouping.validate(np.array([[0], [-1], [0], [0]]), 4, 1)
    with pytest.raises(MergetoolError, match="2-D"):
        grouping.validate(np.zeros(4, int), 4, 1)


def test_bell_and_search_space():
    assert [grouping.bell(n) for n in range(8)] == [1, 1, 2, 5, 15, 52, 203, 877]
    assert grouping.bell(4) == 15
    assert grouping.search_space_log10(4, 6) == pytest.approx(6 * math.log10(15))
    assert grouping.search_space_size(3, 2) == 25
    assert grouping.search_space_log10(8, 200) == pytest.approx(200 * math.log10(4140))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_set_partitions_are_all_distinct_partitions(n):
    parts = grouping.set_partitions(n)
    assert len(parts) == grouping.bell(n)
    as_groups = {frozenset(frozenset(t for t in range(n) if p[t] == g) for g in set(p)) for p in parts}
    assert len(as_groups) == len(parts)  # no partition twice, under any labelling
    assert all(p[0] == 0 and max(p) <= n - 1 for p in parts)
