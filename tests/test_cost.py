"""C (mergetool.merge.cost): Eq. 8, and equality with the bytes safetensors writes."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from mergetool.core.storage import storage_cost
from mergetool.merge.cost import mask_bytes, tensor_data_bits
from mergetool.merge.quantize import QuantSpec, bits_of_dtype, quantize, to_tensors

D = 1024  # a power of two keeps every cost an exact binary fraction


def cost_of(qts, d, base_bits):
    """C of stored quantised tensors, as the package computes it (merge/cost.py)."""
    return storage_cost(sum(tensor_data_bits(qt, base_bits) for qt in qts), d=d, base_bits=base_bits)


def eq8_cost(qts, d, base_bits):
    """Eq. 8 exactly as the paper writes it: Σ b·d_u/(b⁺·d) + 2·𝟙(b < b⁺)/d per quantised unit, b⁺ per full value.
    The reference the package's byte-exact C is checked against."""
    bits = 0
    for qt in qts:
        q_values = qt.n_quantized_units * qt.unit_size
        full_values = qt.n_units * qt.unit_size - q_values
        full_bits = base_bits if qt.dtype.is_floating_point else bits_of_dtype(qt.dtype)
        bits += qt.bits * q_values + 2 * base_bits * qt.n_quantized_units + full_bits * full_values
    return bits / (base_bits * d)


def _rand(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def _mixed(bits, dtype=torch.float32):
    """A (4, 6) per-channel tensor whose rows 1 and 3 stay full precision."""
    merged = _rand(4, 6, seed=9, dtype=dtype)
    low = merged.clone()
    low[[1, 3]] = 0.0  # mean source range of rows 1, 3 is half the merged one → kept
    qt = quantize(merged, QuantSpec(bits, "per_channel", "conditional"), [merged, low])
    assert qt.unit_flags().tolist() == [True, False, True, False]
    return qt


def _experts(bits, granularity, dtype=torch.float32):
    spec = QuantSpec(bits, granularity, "always")
    return [
        quantize(_rand(6, 10, seed=1, dtype=dtype), spec),  # 60 values: b·n is a multiple of 8
        quantize(_rand(5, 7, seed=2, dtype=dtype), spec),  # 35 values: b·n padded for b < 8
        quantize(_rand(7, seed=3, dtype=dtype), spec),  # a bias: one unit even per channel
        quantize(_rand(3, 4, seed=4, dtype=dtype), QuantSpec(bits, granularity, "never")),
        _mixed(bits, dtype),
    ]


def _disk_bytes(tmp_path, qts):
    """Bytes of tensor data in a safetensors file holding every qt, from its header."""
    tensors = {}
    for i, qt in enumerate(qts):
        tensors.update(to_tensors(qt, f"e{i}"))
    path = tmp_path / "experts.safetensors"
    save_file(tensors, str(path))
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    spans = [v["data_offsets"] for k, v in header.items() if k != "__metadata__"]
    data = sum(end - start for start, end in spans)
    assert data == os.path.getsize(path) - 8 - n
    assert data == sum(t.numel() * t.element_size() for t in tensors.values())
    return data


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_storage_cost_equals_bytes_on_disk(tmp_path, bits, granularity):
    qts = _experts(bits, granularity)
    on_disk = _disk_bytes(tmp_path, qts)
    masks = sum(mask_bytes(qt) for qt in qts)
    assert masks == 1  # only the mixed tensor stores a row mask: ceil(4 / 8) bytes
    assert on_disk == cost_of(qts, D, 32) * D * 32 / 8 + masks
    assert on_disk * 8 == sum(tensor_data_bits(qt, 32) for qt in qts) + 8 * masks


def test_storage_cost_bf16_base(tmp_path):
    qts = _experts(4, "per_channel", torch.bfloat16)
    assert qts[0].scale.dtype == torch.bfloat16
    on_disk = _disk_bytes(tmp_path, qts)
    assert on_disk == cost_of(qts, D, 16) * D * 16 / 8 + sum(mask_bytes(q) for q in qts)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_eq8_by_hand_and_equal_when_no_padding(bits):
    a, b, bias, plain, mixed = _experts(bits, "per_channel")
    # (6, 10) per channel: 60 values at b bits + 6 units × (scale + zero) at 32 bits.
    assert eq8_cost([a], D, 32) == (60 * bits + 6 * 2 * 32) / (32 * D)
    # Per Eq. 8 term by term: Σ_u b·d_u/(b⁺·d) + 2/d.
    assert eq8_cost([a], D, 32) == pytest.approx(6 * (bits * 10 / (32 * D) + 2 / D))
    # Mixed: 2 quantised rows of 6 values + 2 full rows of 6 values.
    assert eq8_cost([mixed], D, 32) == (12 * bits + 2 * 2 * 32 + 12 * 32) / (32 * D)
    # Unquantised tensors and the bias.
    assert eq8_cost([plain], D, 32) == storage_cost(12 * 32, d=D, base_bits=32) == 12 / D
    assert eq8_cost([bias], D, 32) == (7 * bits + 2 * 32) / (32 * D)
    # b·n multiple of 8 → storage equals Eq. 8 exactly (60·b, 12·b, and the plain tensor).
    for qts in ([a], [mixed], [plain], [a, mixed, plain]):
        assert cost_of(qts, D, 32) == eq8_cost(qts, D, 32)
    # Otherwise storage adds the padding of the packed stream to a whole byte.
    padding = 8 * ((35 * bits + 7) // 8) - 35 * bits
    assert cost_of([b], D, 32) == eq8_cost([b], D, 32) + padding / (32 * D)


def test_all_singleton_quantised_costs_t_times_b_over_bplus():
    # A toy model with one component (W: 16×32, bias: 16), T = 3 tasks, each its own group.
    n_tasks, bits, bplus = 3, 4, 32
    d = 16 * 32 + 16
    spec = QuantSpec(bits, "per_tensor", "conditional")
    qts = [
        quantize(t, spec)  # a singleton group is its own source → quantised
        for task in range(n_tasks)
        for t in (_rand(16, 32, seed=10 + task), _rand(16, seed=20 + task))
    ]
    assert all(qt.quantized for qt in qts)
    metadata = n_tasks * 2 * 2 / d  # 2 tensors per expert, scale + zero each
    assert eq8_cost(qts, d, bplus) == pytest.approx(n_tasks * bits / bplus + metadata)
    assert cost_of(qts, d, bplus) == eq8_cost(qts, d, bplus)
    unquantised = [quantize(t, QuantSpec(32)) for t in (_rand(16, 32), _rand(16))]
    assert cost_of(unquantised, d, bplus) == storage_cost(d * bplus, d=d, base_bits=bplus) == 1.0


def test_width_must_match_base_bits():
    qt = quantize(_rand(4, 4, dtype=torch.bfloat16), QuantSpec(4, "per_tensor", "always"))
    with pytest.raises(ValueError, match="b⁺"):
        tensor_data_bits(qt, 32)
    assert tensor_data_bits(qt, 16) == 8 * 8 + 2 * 16
