"""LoRA task models: a group merges ΔW = s·B@A, stores it re-factorised at the largest rank, counts it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergetool.merge.adapters.lora import lora_pairs, lowrank_refactor, merge_lora
from mergetool.merge.experts import ExpertStore
from mergetool.merge.quantize import to_tensors
from mergetool.models.plan import build_plan, open_models
from mergetool.recipe import load_recipe
from mergetool.testing.toy import make_lora_zoo, recipe_text, tiny_text_data

T = torch.tensor


def test_linear_merge_of_hand_made_factors_truncates_at_largest_rank():
    # ΔW1 = 1·[2,0]ᵀ[1,0,0] = [[2,0,0],[0,0,0]] (rank 1); ΔW2 = 1·[0,4]ᵀ[0,1,0] = [[0,0,0],[0,4,0]].
    # WA: [[1,0,0],[0,2,0]], rank 2; the largest member rank is 1, so the stored expert is its best
    # rank-1 part, [[0,0,0],[0,2,0]].
    A = [T([[1.0, 0.0, 0.0]]), T([[0.0, 1.0, 0.0]])]
    B = [T([[2.0], [0.0]]), T([[0.0], [4.0]])]
    (B2, A2), _ = merge_lora(A, B, [1.0, 1.0], "linear", {})
    assert B2.shape == (2, 1) and A2.shape == (1, 3)
    assert torch.allclose(B2 @ A2, T([[0.0, 0.0, 0.0], [0.0, 2.0, 0.0]]), atol=1e-6)


def test_refactor_reconstructs_a_rank_r_merge_exactly():
    # ΔW1 = 0.5·[[4],[0]]·[[1,0,0]] = [[2,0,0],[0,0,0]]; ΔW2 = 1·[[2,0],[0,4]]·I₂ₓ₃ = [[2,0,0],[0,4,0]].
    # TA (λ = 1): ΔW1 + ΔW2 = [[4,0,0],[0,4,0]], rank 2 = the largest rank: stored exactly.
    A = [T([[1.0, 0.0, 0.0]]), T([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])]
    B = [T([[4.0], [0.0]]), T([[2.0, 0.0], [0.0, 4.0]])]
    (B2, A2), (src_B, src_A) = merge_lora(A, B, [0.5, 1.0], "task_arithmetic", {})
    assert B2.shape == (2, 2) and A2.shape == (2, 3)
    assert torch.allclose(B2 @ A2, T([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0]]), atol=1e-6)
    # the members, factorised the same way and at the same shape (the quantiser's sources)
    assert [tuple(b.shape) for b in src_B] == [(2, 2), (2, 2)]
    assert torch.allclose(src_B[0] @ src_A[0], T([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]), atol=1e-6)
    assert torch.allclose(src_B[1] @ src_A[1], T([[2.0, 0.0, 0.0], [0.0, 4.0, 0.0]]), atol=1e-6)


def test_lowrank_refactor_matches_dense_svd():
    from mergetool.merge.adapters.lora import lora_delta, refactor_lora

    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(3, 9, generator=g, dtype=torch.float64), torch.randn(7, 3, generator=g, dtype=torch.float64)
    B1, A1 = lowrank_refactor(B, A, 0.25, 5)
    B2, A2 = refactor_lora(lora_delta(A, B, 0.25), 5)
    assert B1.shape == B2.shape == (7, 5) and A1.shape == A2.shape == (5, 9)
    assert torch.allclose(B1 @ A1, 0.25 * B @ A, atol=1e-12)
    assert torch.allclose(B1 @ A1, B2 @ A2, atol=1e-12)


def test_lora_pairs_by_name():
    names = ["x.query.lora_A.weight", "x.query.lora_B.weight"]
    assert lora_pairs(names) == {"x.query.weight": tuple(names)}
    with pytest.raises(ValueError):
        lora_pairs(names[:1])


@pytest.fixture(scope="module")
def lora_zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("lorazoo")
    base, tasks = make_lora_zoo(root / "zoo")  # ranks 4 and 5, lora_alpha 8, query + value
    data = tiny_text_data(root)

    def store(bits="none", mode="conditional", method="linear"):
        path = root / f"r-{bits}-{mode}-{method}.yaml"
        path.write_text(recipe_text(base, tasks, data, m=f"merge: {{method: {method}}}",
                                    q=f"quantization: {{bits: {bits}, granularity: per_channel, mode: {mode}}}",
                                    ts="components: {task_specific: ['classifier']}"))
        recipe = load_recipe(path)
        sources = open_models(recipe)
        plan = build_plan(recipe, sources=sources)
        return ExpertStore(recipe, plan, *sources), plan, sources

    return store


def test_store_merges_lora_group_and_gives_dense_base_weights(lora_zoo):
    store, plan, (base, tasks) = lora_zoo()
    assert plan.adapter["type"] == "LORA" and plan.L == 2
    e = store.expert(0, (0, 1))
    q = "encoder.layer.0.attention.self.query"
    A_t = [t.get(f"{q}.lora_A.weight") for t in tasks]
    B_t = [t.get(f"{q}.lora_B.weight") for t in tasks]
    assert [a.shape[0] for a in A_t] == [4, 5]
    # scaling = lora_alpha / r = 8/4 and 8/5; WA averages the two ΔW; stored at rank 5
    delta = (2.0 * B_t[0] @ A_t[0] + 1.6 * B_t[1] @ A_t[1]) / 2
    U, S, Vh = torch.linalg.svd(delta.double())
    best5 = (U[:, :5] * S[:5]) @ Vh[:5]
    assert tuple(e.tensors[f"{q}.lora_B.weight"].shape) == (16, 5)
    assert tuple(e.tensors[f"{q}.lora_A.weight"].shape) == (5, 16)
    dense = e.dense()
    assert set(dense) == {f"{q}.weight", "encoder.layer.0.attention.self.value.weight"}
    w0 = base.get(f"{q}.weight")
    assert torch.allclose(dense[f"{q}.weight"].double(), w0.double() + best5, atol=1e-5)
    # a singleton keeps the task's own factors and scaling
    s = store.expert(0, (1,))
    assert torch.equal(s.tensors[f"{q}.lora_A.weight"].full, A_t[1])
    assert torch.allclose(s.dense()[f"{q}.weight"], w0 + 1.6 * B_t[1] @ A_t[1], atol=1e-6)


def test_lora_cost_counts_the_stored_factors_exactly(lora_zoo):
    store, plan, _ = lora_zoo()
    # unquantised fp32: per module B' 16×5 + A' 5×16 = 160 values; two modules → 320·32 bits
    assert store.expert(0, (0, 1)).bits == 320 * 32
    # singletons: task 0 (rank 4) 2·(64 + 64) values, task 1 (rank 5) 2·(80 + 80)
    assert store.expert(0, (0,)).bits == 256 * 32 and store.expert(0, (1,)).bits == 320 * 32
    G = np.array([[0, 0], [0, 1]])  # component 0 shared, component 1 per task
    assert store.storage_cost(G) == 1.0 + (320 + 256 + 320) * 32 / (32 * plan.d)  # + the frozen base, once
    # 8 bits, always, per channel: B' 16 rows × 5 → 80 B + 16·(4+4) B; A' 5 rows × 16 → 80 B + 5·8 B
    q8, _, _ = lora_zoo(bits=8, mode="always")
    e = q8.expert(1, (0, 1))
    assert e.bits == 2 * 8 * (80 + 128 + 80 + 40)
    stored = sum(v.numel() * v.element_size() for n, qt in e.tensors.items() for v in to_tensors(qt, n).values())
    assert stored * 8 == e.bits + 8 * e.mask_bytes


def test_lora_conditional_and_ties_build(lora_zoo):
    store, plan, _ = lora_zoo(bits=4, mode="conditional", method="ties")
    e = store.expert(1, (0, 1))
    assert all(q.bits == 4 for q in e.tensors.values())
    assert e.bits > 0 and set(e.dense()) == {"encoder.layer.1.attention.self.query.weight",
                                              "encoder.layer.1.attention.self.value.weight"}
