"""Q (mergetool.merge.quantize): Eq. 6 grid, the conditional rule, bit packing and storage."""

import pytest
import torch

from mergetool.core.errors import LibraryError, MergetoolError
from mergetool.merge.quantize import (
    QuantSpec,
    bits_of_dtype,
    dequantize,
    from_tensors,
    pack_bits,
    quantize,
    to_tensors,
    unpack_bits,
)


def _rand(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 0.1 + 0.02).to(dtype)


def _max_unit_error(x, y, units):
    return (x.reshape(units, -1).double() - y.reshape(units, -1).double()).abs().amax(dim=1)


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    for n in (0, 1, 3, 7, 8, 9, 15, 17, 1001):
        codes = torch.randint(0, 1 << bits, (n,), generator=g, dtype=torch.uint8)
        packed = pack_bits(codes, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == (n * bits + 7) // 8
        assert torch.equal(unpack_bits(packed, bits, n), codes)


def test_pack_is_little_endian_bit_stream():
    # 3-bit codes 1, 2, 7: stream bits (LSB first) 100 010 111 → byte0 = 1 + 2<<3 + 3<<6, byte1 = 1
    assert pack_bits(torch.tensor([1, 2, 7], dtype=torch.uint8), 3).tolist() == [209, 1]
    assert pack_bits(torch.tensor([1, 0, 3, 2, 1], dtype=torch.uint8), 2).tolist() == [0b10110001, 1]


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_round_trip_error_at_most_half_a_step(bits, granularity):
    x = _rand(6, 5, 3, seed=bits)
    qt = quantize(x, QuantSpec(bits, granularity, "always"))
    y = dequantize(qt)
    assert y.shape == x.shape and y.dtype == x.dtype
    units = 6 if granularity == "per_channel" else 1
    assert qt.n_quantized_units == units and qt.row_mask is None and qt.full is None
    # Eq. 6: the nearest grid point, so the error is at most s/2 (plus float rounding).
    err = _max_unit_error(x, y, units)
    assert torch.all(err <= qt.scale.double() / 2 * (1 + 1e-5) + 1e-7)
    # The grid spans the unit: s = (max − min) / (2^b − 1).
    span = x.reshape(units, -1).amax(1) - x.reshape(units, -1).amin(1)
    assert torch.allclose(qt.scale, span / (2**bits - 1), rtol=1e-6)


def test_conditional_rule_row_by_row():
    # Row ranges of the merged tensor vs the mean range of the sources' rows:
    #   row 0: 2 vs (2 + 4)/2 = 3 → quantised      row 1: 5 vs (4 + 4)/2 = 4 → kept
    #   row 2: 3 vs (2 + 4)/2 = 3 → quantised (≤)  row 3: 1 vs (0 + 0)/2 = 0 → kept
    merged = torch.tensor([[0.0, 2.0, 1.0], [0.0, 5.0, 1.0], [0.0, 3.0, 1.0], [1.0, 2.0, 1.0]])
    s1 = torch.tensor([[0.0, 2.0, 0.0], [0.0, 4.0, 0.0], [0.0, 2.0, 0.0], [7.0, 7.0, 7.0]])
    s2 = torch.tensor([[0.0, 4.0, 0.0], [0.0, 4.0, 0.0], [0.0, 4.0, 0.0], [5.0, 5.0, 5.0]])
    qt = quantize(merged, QuantSpec(4, "per_channel", "conditional"), [s1, s2])
    assert qt.unit_flags().tolist() == [True, False, True, False]
    assert torch.equal(qt.full, merged[[1, 3]])
    assert qt.packed.numel() == (2 * 3 * 4 + 7) // 8
    y = dequantize(qt)
    assert torch.equal(y[[1, 3]], merged[[1, 3]])
    assert torch.all(_max_unit_error(merged[[0, 2]], y[[0, 2]], 2) <= qt.scale / 2 + 1e-6)
    # Per tensor: range 5 vs mean(7, 5) = 6 → quantised as one unit.
    qt = quantize(merged, QuantSpec(4, "per_tensor", "conditional"), [s1, s2])
    assert qt.n_quantized_units == 1 and qt.full is None
    # A singleton group is its own source: range == mean → quantised.
    assert quantize(merged, QuantSpec(4, "per_channel"), [merged]).unit_flags().all()
    assert quantize(merged, QuantSpec(4, "per_channel")).unit_flags().all()


def test_modes_and_bits32_off():
    x = _rand(4, 4)
    never = quantize(x, QuantSpec(4, "per_channel", "never"))
    off = quantize(x, QuantSpec(32, "per_channel", "always"))
    for qt in (never, off):
        assert not qt.quantized and qt.full is x and torch.equal(dequantize(qt), x)
    narrow = [x[:2] * 0.5, x[:2] * 0.25]  # the sources' ranges are smaller than the merged one
    assert not quantize(x[:2], QuantSpec(4, "per_channel", "conditional"), narrow).quantized
    assert quantize(x[:2], QuantSpec(4, "per_channel", "always"), narrow).quantized
    with pytest.raises(MergetoolError):
        QuantSpec(bits=1)
    with pytest.raises(MergetoolError):
        QuantSpec(bits=12)
    with pytest.raises(MergetoolError):  # 16 is not "off" (README: 2..8 or 32)
        QuantSpec(bits=16)
    with pytest.raises(MergetoolError):
        QuantSpec(granularity="per_row")


def test_one_dim_tensors_are_per_tensor_in_per_channel_mode():
    x = _rand(10)
    qt = quantize(x, QuantSpec(4, "per_channel", "always"))
    assert qt.granularity == "per_tensor" and qt.n_quantized_units == 1
    assert qt.scale.shape == (1,)


def test_constant_and_scalar_tensors_are_exact():
    for x in (torch.full((3, 5), 0.7), torch.zeros(4), torch.tensor(2.5), torch.full((2, 2), -3.0)):
        qt = quantize(x, QuantSpec(2, "per_channel", "always"))
        assert qt.quantized
        assert torch.equal(dequantize(qt), x)


def test_bf16_input_uses_bf16_metadata():
    x = _rand(8, 16, dtype=torch.bfloat16)
    qt = quantize(x, QuantSpec(4, "per_channel", "always"))
    assert qt.scale.dtype == torch.bfloat16 and qt.zero.dtype == torch.bfloat16
    y = dequantize(qt)
    assert y.dtype == torch.bfloat16
    # s/2 plus the rounding of bf16 metadata and output (~ 2^-8 of the values' magnitude).
    bound = qt.scale.double() / 2 + 2**-8 * x.double().abs().reshape(8, -1).amax(1)
    assert torch.all(_max_unit_error(x, y, 8) <= bound)
    assert bits_of_dtype(torch.bfloat16) == 16 and bits_of_dtype(torch.float32) == 32


def test_metadata_dtype_follows_base_model():
    qt = quantize(_rand(4, 4), QuantSpec(8, "per_tensor", "always"), meta_dtype=torch.float16)
    assert qt.scale.dtype == torch.float16 and qt.zero.dtype == torch.float16
    # Row 0's zero-point (≈ −1000/s ≈ −5e5) overflows float16: that row stays full precision.
    x = torch.stack([torch.linspace(1000.0, 1000.5, 8), torch.linspace(-1.0, 1.0, 8)])
    qt = quantize(x, QuantSpec(8, "per_channel", "always"), meta_dtype=torch.float16)
    assert qt.unit_flags().tolist() == [False, True] and torch.equal(dequantize(qt)[0], x[0])


def test_to_tensors_from_tensors_round_trip():
    merged = _rand(6, 4)
    sources = [merged * 1.5, merged * 1.5]
    sources[0][1] = 0.0  # rows 1 and 4: mean source range 0.75× the merged one → kept
    sources[0][4] = 0.0
    mixed = quantize(merged, QuantSpec(3, "per_channel", "conditional"), sources)
    assert mixed.unit_flags().tolist() == [True, False, True, True, False, True]
    cases = {
        "mixed": (mixed, {".q", ".scale", ".zero", ".mask", ".full"}),
        "all": (quantize(merged, QuantSpec(5, "per_channel", "always")), {".q", ".scale", ".zero"}),
        "tensor": (quantize(merged, QuantSpec(4, "per_tensor", "always")), {".q", ".scale", ".zero"}),
        "plain": (quantize(merged, QuantSpec(4, "per_tensor", "never")), {""}),
    }
    for prefix, (qt, keys) in cases.items():
        stored = to_tensors(qt, prefix)
        info = qt.info()
        assert set(info["keys"]) == keys and set(stored) == {prefix + k for k in keys}
        assert info == {"shape": [6, 4], "dtype": "float32", "bits": qt.bits,
                        "granularity": qt.granularity, "keys": sorted(keys)}
        back = from_tensors(stored, prefix, info)
        assert torch.equal(dequantize(back), dequantize(qt))
    stored = to_tensors(mixed, "m")
    assert stored["m.mask"].tolist() == [0b101101]
    with pytest.raises(LibraryError):
        from_tensors({**stored, "m.scale": stored["m.scale"][:1]}, "m", mixed.info())
    with pytest.raises(LibraryError):
        from_tensors({k: v for k, v in stored.items() if k != "m.full"}, "m", mixed.info())
