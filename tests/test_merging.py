"""F (mergetool.merge.methods): expected values are computed by hand here, never by mergekit."""

import pytest
import torch

from mergetool.core.errors import MergetoolError
from mergetool.merge.adapters.lora import lora_delta, refactor_lora
from mergetool.merge.methods import (
    METHOD_ALIASES,
    VARIANT_SETTINGS,
    check_method,
    merge_group,
    resolve_method,
    uses_randomness,
    variant_key,
    variant_settings,
)

T = torch.tensor
BASE = T([1.0, 1.0, 1.0, 1.0])


def test_aliases_resolve():
    assert {a: resolve_method(a) for a in METHOD_ALIASES} == METHOD_ALIASES
    assert resolve_method("TIES") == "ties"
    assert resolve_method("dare_ties") == "dare_ties"


def test_wa_is_plain_average_of_task_models():
    a, b = T([1.0, 2.0, 3.0, 4.0]), T([3.0, 2.0, 1.0, 0.0])
    # The base is ignored: (a + b) / 2.
    assert torch.equal(merge_group(BASE, [a, b], "wa", {}), T([2.0, 2.0, 2.0, 2.0]))
    # Per-model weights: (1·a + 3·b) / 4.
    out = merge_group(BASE, [a, b], "wa", {"weight": [1.0, 3.0]})
    assert torch.equal(out, T([2.5, 2.0, 1.5, 1.0]))


def test_ta_follows_eq5():
    t1, t2 = T([2.0, 0.0, 1.0, 3.0]), T([1.0, 3.0, 1.0, -1.0])
    # θ_pre + λ Σ (θ_t − θ_pre) = 1 + 0.5·([1,−1,0,2] + [0,2,0,−2]) = 1 + 0.5·[1,1,0,0]
    out = merge_group(BASE, [t1, t2], "ta", {"lambda": 0.5})
    assert torch.equal(out, T([1.5, 1.5, 1.0, 1.0]))
    # λ = 1 by default: a sum of task vectors, not an average.
    assert torch.equal(merge_group(BASE, [t1, t2], "ta", {}), T([2.0, 2.0, 1.0, 1.0]))


def test_weight_defaults_to_one():
    t1, t2 = T([2.0, 0.0, 1.0, 3.0]), T([1.0, 3.0, 1.0, -1.0])
    explicit = merge_group(BASE, [t1, t2], "ta", {"lambda": 0.5, "weight": [1.0, 1.0]})
    assert torch.equal(merge_group(BASE, [t1, t2], "ta", {"lambda": 0.5}), explicit)


def test_ties_trim_elect_disjoint_mean():
    # Task vectors τ_t = θ_t − θ_pre; density 0.5 of 4 values keeps the 2 largest |τ|.
    #   τ1 = [ 4, −1,  2, −3]  → [4, 0,  0, −3]
    #   τ2 = [−2,  5,  1, −1]  → [−2, 5, 0,  0]
    #   τ3 = [ 3,  2, −4, .5]  → [3, 0, −4,  0]
    # Elected sign = sign of the sum: [+5, +5, −4, −3] → [+, +, −, −].
    # Disjoint mean over agreeing values: [(4+3)/2, 5, −4, −3] = [3.5, 5, −4, −3].
    t1 = BASE + T([4.0, -1.0, 2.0, -3.0])
    t2 = BASE + T([-2.0, 5.0, 1.0, -1.0])
    t3 = BASE + T([3.0, 2.0, -4.0, 0.5])
    out = merge_group(BASE, [t1, t2, t3], "tm", {"density": 0.5})
    assert torch.equal(out, T([4.5, 6.0, -3.0, -2.0]))


def test_breadcrumbs_drops_smallest_and_top_outliers():
    # 4 values, density 0.5 → keep 2; gamma 0.25 → drop the 1 largest; so drop the smallest
    # and the largest |τ| of each task and keep the middle two.
    #   τ1 = [ 1, −4,   2,  3] → [0, 0, 2,    3]
    #   τ2 = [−3, .5, 2.5, −1] → [0, 0, 2.5, −1]
    # Sum (no sign election, no normalisation): [0, 0, 4.5, 2]; λ = 0.5 → [0, 0, 2.25, 1].
    t1 = BASE + T([1.0, -4.0, 2.0, 3.0])
    t2 = BASE + T([-3.0, 0.5, 2.5, -1.0])
    params = {"density": 0.5, "gamma": 0.25}
    assert torch.equal(merge_group(BASE, [t1, t2], "bc", params), T([1.0, 1.0, 5.5, 3.0]))
    out = merge_group(BASE, [t1, t2], "bc", {**params, "lambda": 0.5})
    assert torch.equal(out, T([1.0, 1.0, 3.25, 2.0]))


def test_variant_settings_are_the_papers_and_valid_recipes():
    assert variant_settings("ties") == variant_settings("TM") == ("ties", {"density": 0.2, "lambda": 1.0})
    assert [variant_key(k) for k in ("wa", "TA", "ties", " bc")] == ["wa", "ta", "tm", "bc"]
    assert variant_settings("ta") == ("task_arithmetic", {"lambda": 0.3})
    assert variant_settings("wa") == ("linear", {})
    for method, params in VARIANT_SETTINGS.values():
        check_method(method, params, n_tasks=4)
    # Breadcrumbs: of |τ| = 1..100 it keeps ranks 91..99 (bottom 90 % and top 1 % masked), scaled by λ = 0.3
    tau = torch.arange(1.0, 101.0)
    method, params = variant_settings("bc")
    out = merge_group(torch.zeros(100), [tau, torch.zeros(100)], method, params)
    kept = (out != 0).nonzero().flatten() + 1
    assert kept.tolist() == list(range(91, 100))
    assert torch.allclose(out[90:99], 0.3 * tau[90:99])
    with pytest.raises(MergetoolError, match="no paper settings"):
        variant_settings("dare")


def test_singleton_returns_member_unmerged():
    member = T([5.0, -2.0, 7.0])
    for method in ("ta", "ties", "wa", "slerp"):
        out = merge_group(T([0.0, 0.0, 0.0]), [member], method, {"lambda": 0.3})
        assert out is member


def test_bf16_inputs_keep_dtype():
    t1 = T([2.0, 0.0, 1.0, 3.0]).bfloat16()
    t2 = T([1.0, 3.0, 1.0, -1.0]).bfloat16()
    out = merge_group(BASE.bfloat16(), [t1, t2], "ta", {"lambda": 0.5})
    assert out.dtype == torch.bfloat16
    assert torch.equal(out.float(), T([1.5, 1.5, 1.0, 1.0]))


def test_random_methods_are_seeded_and_leave_global_rng_alone():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(200, generator=g)
    members = [base + torch.randn(200, generator=g) for _ in range(3)]
    params = {"density": 0.5}
    state = torch.get_rng_state()
    a = merge_group(base, members, "dare_ties", params, seed_key="layer.3.mlp|{0,2}")
    b = merge_group(base, members, "dare_ties", params, seed_key="layer.3.mlp|{0,2}")
    c = merge_group(base, members, "dare_ties", params, seed_key="layer.4.mlp|{0,2}")
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert uses_randomness("dare_ties") and uses_randomness("della")
    assert not uses_randomness("ta") and not uses_randomness("ties")


def test_slerp_takes_exactly_two_tasks():
    a, b = T([1.0, 0.0]), T([3.0, 0.0])
    # Collinear rows fall back to linear interpolation: (a + b) / 2.
    assert torch.equal(merge_group(None, [a, b], "slerp", {"t": 0.5}), T([2.0, 0.0]))
    check_method("slerp", {"t": 0.5}, 2)
    check_method("nuslerp", {}, 2)
    with pytest.raises(MergetoolError, match="3 tasks"):
        check_method("slerp", {"t": 0.5}, 3)
    with pytest.raises(MergetoolError, match="3 tasks"):
        merge_group(None, [a, b, a], "slerp", {"t": 0.5})


def test_unknown_method_and_parameters():
    with pytest.raises(MergetoolError, match="unknown merge method") as e:
        resolve_method("tiez")
    assert "did you mean ties" in str(e.value)
    with pytest.raises(MergetoolError, match="unknown parameter 'densty'") as e:
        check_method("ties", {"densty": 0.5}, 2)
    assert "did you mean density" in str(e.value)
    with pytest.raises(MergetoolError, match="needs parameter 't'"):
        check_method("slerp", {}, 2)
    with pytest.raises(MergetoolError, match="invalid value"):
        check_method("ties", {"density": "lots"}, 2)
    with pytest.raises(MergetoolError, match="per-model values"):
        check_method("ta", {"weight": [1.0, 2.0, 3.0]}, 2)
    # The per-model weight key is accepted for every method.
    check_method("ta", {"lambda": 0.3, "weight": [1.0, 2.0]}, 2)
    check_method("karcher", {"weight": 1.0}, 3)


def test_lora_refactor_is_exact_for_rank_r_delta():
    g = torch.Generator().manual_seed(2)
    A = torch.randn(3, 10, generator=g, dtype=torch.float64)
    B = torch.randn(8, 3, generator=g, dtype=torch.float64)
    delta = lora_delta(A, B, 0.5)
    assert torch.allclose(delta, 0.5 * B @ A)
    B2, A2 = refactor_lora(delta, 3)
    assert B2.shape == (8, 3) and A2.shape == (3, 10)
    assert torch.allclose(B2 @ A2, delta, atol=1e-10)
    # Sqrt split: both factors carry the same singular values.
    assert torch.allclose(B2.norm(dim=0), A2.norm(dim=1), atol=1e-10)
    # Rank 1 keeps exactly the top singular component.
    s = torch.linalg.svdvals(delta)
    B1, A1 = refactor_lora(delta, 1)
    assert torch.allclose(torch.linalg.matrix_norm(delta - B1 @ A1), s[1:].norm(), atol=1e-10)


# ---------------------------------------------------------------- the streaming kernel (fast_merge)

def _bits(t):
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def _same_as_mergekit(base, members, method, params):
    fast = merge_group(base, members, method, params)
    ref = merge_group(base, members, method, params, fast=False)  # mergekit's merge_tensors
    return fast.dtype == ref.dtype and torch.equal(_bits(fast), _bits(ref))


def test_kept_ranks_by_hand():
    from mergetool.merge.fast_kernels import kept_ranks

    # magnitude: the k = max(1, int(d·n)) largest of n, i.e. ascending ranks [n − k, n)
    assert kept_ranks(10, "magnitude", 0.5) == (5, 10)
    assert kept_ranks(10, "magnitude", 0.01) == (9, 10)
    assert kept_ranks(10, "magnitude", 0.0) == (0, 0)
    assert kept_ranks(10, "magnitude", 1.0) is None
    # outliers: drop int(γ·n) largest, keep int(d·n) below them: 10 − 5 − 1 = 4 → [4, 9)
    assert kept_ranks(10, "magnitude_outliers", 0.5, 0.1) == (4, 9)
    assert kept_ranks(10, None, 0.5) is None


def test_fast_ties_literal_with_ties_off_the_threshold():
    # τ1 = [3, −3, 1, 1, 2, 0] (density 0.5 → keep the 3 largest |τ|: 3, −3, 2; the tied 1s are
    # below the threshold, so no tie straddles it), τ2 = [−1, 2, 4, −4, 0, 1] (keep 2, 4, −4).
    #   τ1' = [3, −3, 0, 0, 2, 0], τ2' = [0, 2, 4, −4, 0, 0]; signs by sum [3, −1, 4, −4, 2, 0]
    #   → [+, −, +, −, +, + (0 ≥ 0)]; disjoint mean: [3, −3, 4, −4, 2, 0].
    base = torch.zeros(6)
    t1, t2 = T([3.0, -3.0, 1.0, 1.0, 2.0, 0.0]), T([-1.0, 2.0, 4.0, -4.0, 0.0, 1.0])
    out = merge_group(base, [t1, t2], "ties", {"density": 0.5})
    assert torch.equal(out, T([3.0, -3.0, 4.0, -4.0, 2.0, 0.0]))
    assert _same_as_mergekit(base, [t1, t2], "ties", {"density": 0.5})


@pytest.mark.parametrize("chunk", [7, 1 << 20])
@pytest.mark.parametrize("method,params", [
    ("ties", {"density": 0.5}), ("ties", {"density": 0.2, "weight": [1.0, 0.5, 2.0]}),
    ("ties", {"density": 0.4, "normalize": False, "lambda": 0.7}), ("ties", {"density": 0.0}),
    ("breadcrumbs", {"density": 0.5, "gamma": 0.1}), ("breadcrumbs_ties", {"density": 0.6, "gamma": 0.05}),
    ("task_arithmetic", {"lambda": 0.3}),
])
def test_fast_kernel_is_bitwise_mergekit(monkeypatch, chunk, method, params):
    import mergetool.merge.fast_kernels as fm

    monkeypatch.setattr(fm, "CHUNK", chunk)
    g = torch.Generator().manual_seed(3)
    base = torch.randn(40, 33, generator=g) * 0.02
    members = [base + 1e-3 * torch.randn(40, 33, generator=g) for _ in range(3)]
    assert _same_as_mergekit(base, members, method, params)
    # Heavy ties: |τ| takes 4 values, so tie groups straddle every threshold; the kernel then
    # uses mergekit's own argsort for that task vector and must still agree bit for bit.
    tied = [torch.randint(-3, 4, (40, 33), generator=g).float() * 0.5 for _ in range(3)]
    assert _same_as_mergekit(torch.zeros(40, 33), tied, method, params)


def test_fast_kernel_half_and_double_inputs():
    g = torch.Generator().manual_seed(4)
    base = torch.randn(50, 20, generator=g) * 0.02
    members = [base + 1e-3 * torch.randn(50, 20, generator=g) for _ in range(3)]
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        assert _same_as_mergekit(base.to(dtype), [m.to(dtype) for m in members], "ties", {"density": 0.5})


def test_lazy_tensors_stream_from_safetensors(tmp_path):
    from safetensors.torch import save_file

    from mergetool.models.source import ModelSource
    from mergetool.models.streaming import LazyTensor, unit_ranges

    g = torch.Generator().manual_seed(5)
    tensors = []
    for i in range(3):
        t = {"w": torch.randn(30, 11, generator=g), "b": torch.randn(11, generator=g)}
        d = tmp_path / f"m{i}"
        d.mkdir()
        save_file(t, str(d / "model.safetensors"))
        (d / "config.json").write_text('{"model_type": "custom"}')
        tensors.append(t)
    lazy = [LazyTensor(ModelSource(tmp_path / f"m{i}"), "w") for i in range(3)]
    assert torch.equal(lazy[1].full(), tensors[1]["w"])
    assert torch.equal(lazy[1].read(5, 40), tensors[1]["w"].reshape(-1)[5:40])
    w = tensors[2]["w"]
    assert torch.equal(unit_ranges(lazy[2], True), w.amax(1).double() - w.amin(1).double())
    assert torch.equal(unit_ranges(lazy[2], False), (w.max().double() - w.min().double()).reshape(1))
    out = merge_group(lazy[0], lazy[1:], "ties", {"density": 0.5})
    ref = merge_group(tensors[0]["w"], [t["w"] for t in tensors[1:]], "ties", {"density": 0.5}, fast=False)
    assert torch.equal(out, ref)


# --- PCB-Merging (native kernel), expected values by hand ----------------------------------------
def _pcb_by_hand(t1: list[float], t2: list[float], keep_top: int) -> list[float]:
    """PCB's formula on two 4-entry task vectors, entry by entry (no outlier is clipped at d = 4)."""
    import math

    def minmax(v):
        lo, hi = min(v), max(v)
        return [(x - lo) / (hi - lo) for x in v]

    total = [a + b for a, b in zip(t1, t2)]
    weights = []
    for t in (t1, t2):
        intra = [math.exp(2 * m * m) for m in minmax([abs(x) for x in t])]
        beta = [i * math.tanh(x * s) for i, x, s in zip(intra, t, total)]
        floor = sorted(beta)[len(beta) - 1 - keep_top]  # entries at or below it weigh 0
        weights.append(minmax([max(b, floor) for b in beta]))
    return [(w1 * a + w2 * b) / max(w1 + w2, 1e-12) for w1, w2, a, b in zip(*weights, t1, t2)]


@pytest.mark.parametrize("ratio,keep_top", [(1.0, 3), (0.5, 1)])
def test_pcb_merge_on_literal_tensors(ratio, keep_top):
    from mergetool.merge.native_methods import pcb_merge

    t1, t2 = [1.0, -2.0, 3.0, 0.5], [2.0, 1.0, -1.0, 0.5]
    expected = _pcb_by_hand(t1, t2, keep_top)
    got = pcb_merge(BASE, [BASE + T(t1), BASE + T(t2)], ratio=ratio, lam=0.5)
    assert got.tolist() == pytest.approx([1 + 0.5 * e for e in expected], abs=1e-6)
    # ratio 1 keeps every entry but each task's lowest β (min-max gives it weight 0): entry 2 of τ2 here
    if ratio == 1.0:
        assert expected[2] == pytest.approx(3.0)


def test_pcb_through_merge_group_and_the_recipe_checks():
    a, b = BASE + T([1.0, -2.0, 3.0, 0.5]), BASE + T([2.0, 1.0, -1.0, 0.5])
    from mergetool.merge.native_methods import pcb_merge

    assert resolve_method("PCB") == "pcb" and not uses_randomness("pcb")
    assert torch.equal(merge_group(BASE, [a, b], "pcb", {"ratio": 0.5, "lambda": 0.7}),
                       pcb_merge(BASE, [a, b], ratio=0.5, lam=0.7))
    assert torch.equal(merge_group(BASE, [a], "pcb", {}), a)  # a singleton is its own tensor
    same = merge_group(BASE, [BASE.clone(), BASE.clone()], "pcb", {})
    assert torch.equal(same, BASE)  # no task vector: every weight is 0, θ_pre stays
    check_method("pcb", {"ratio": 0.2, "lambda": 1.0, "weight": 1.0}, 3)
    for params, key in (({"ratio": 0.0}, "ratio"), ({"ratio": 1.5}, "ratio"), ({"density": 0.2}, "density"),
                        ({"lambda": "big"}, "lambda"), ({"lambda": float("nan")}, "lambda")):
        with pytest.raises(MergetoolError) as e:
            check_method("pcb", params, 3)
        assert e.value.key == key
    with pytest.raises(MergetoolError, match="needs the base"):
        merge_group(None, [a, b], "pcb", {})


# --- Fisher merging and RegMean (weighted kernels), expected values by hand --------------------
def test_fisher_merge_on_literal_tensors():
    from mergetool.merge.weighted_kernels import fisher_merge

    got = fisher_merge([T([1.0, 2.0]), T([3.0, 6.0])], [T([1.0, 0.0]), T([3.0, 0.0])])
    # entry 0: (1·1 + 3·3) / (1 + 3); entry 1: no Fisher anywhere, the floor gives the plain mean
    assert got.tolist() == pytest.approx([2.5, 4.0], abs=1e-5) and got.dtype == torch.float32
    assert fisher_merge([T([1.0]), T([3.0])], [T([2.0]), T([2.0])]).tolist() == pytest.approx([2.0])


def test_regmean_on_literal_tensors():
    from mergetool.merge.weighted_kernels import regmean_merge, scaled_gram

    assert scaled_gram(T([[2.0, 1.0], [1.0, 2.0]]), 0.5).tolist() == [[2.0, 0.5], [0.5, 2.0]]
    # each task saw inputs on its own coordinate: the merge keeps each task's weights on its own subspace
    w1, w2 = T([[1.0, 0.0], [2.0, 0.0]]), T([[0.0, 1.0], [0.0, 3.0]])
    g1, g2 = T([[1.0, 0.0], [0.0, 0.0]]), T([[0.0, 0.0], [0.0, 1.0]])
    assert torch.allclose(regmean_merge([w1, w2], [g1, g2], 1.0), T([[1.0, 1.0], [2.0, 3.0]]))
    # equal Gram matrices: the plain average; α = 0 (only the diagonals): per input column a weighted mean
    g = T([[2.0, 1.0], [1.0, 3.0]])
    assert torch.allclose(regmean_merge([w1, w2], [g, g], 0.9), (w1 + w2) / 2)
    h1, h2 = T([[1.0, 5.0], [5.0, 3.0]]), T([[3.0, -2.0], [-2.0, 1.0]])
    got = regmean_merge([w1, w2], [h1, h2], 0.0)
    assert got[:, 0].tolist() == pytest.approx(((1 * w1[:, 0] + 3 * w2[:, 0]) / 4).tolist())
    assert got[:, 1].tolist() == pytest.approx(((3 * w1[:, 1] + 1 * w2[:, 1]) / 4).tolist())
    # a singular sum (no input ever on coordinate 1) falls back to the least-norm solution
    z = T([[1.0, 0.0], [0.0, 0.0]])
    assert torch.allclose(regmean_merge([w1, w2], [z, z], 1.0), T([[0.5, 0.0], [1.0, 0.0]]))
