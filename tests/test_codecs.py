"""Delta expert codecs (mergetool.merge.codecs): exact stored bits, storage round trips, error bounds,
hand-worked literal tensors, refusal of tampered parts and validation of specs."""

import math
import struct

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from mergetool.core.errors import LibraryError, MergetoolError
from mergetool.merge.codecs import (
    DeltaQuantSpec,
    DeltaSwitchSpec,
    LowRankSpec,
    base_stored_bits,
    decode,
    decode_base,
    encode,
    encode_base,
    from_tensors,
    stored_bits,
    switch_k,
    tensor_bytes,
    to_tensors,
)
from mergetool.merge.quantize import bits_of_dtype


def _rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * 0.1 + 0.01


def _cases():
    """(name, delta): 0-D, 1-D, 2-D, 3-D, odd sizes, a row of zeros, a constant tensor, empty tensors."""
    zero_row = _rand(4, 9, seed=3)
    zero_row[1] = 0
    return [
        ("0-D", torch.tensor(0.37)), ("1-D odd", _rand(7, seed=1)), ("2-D odd", _rand(3, 5, seed=2)),
        ("3-D", _rand(2, 3, 5, seed=4)), ("zero row", zero_row), ("constant", torch.full((3, 5), 0.25)),
        ("1x1", torch.tensor([[-0.5]])), ("tall", _rand(11, 2, seed=5)), ("empty 1-D", torch.zeros(0)),
        ("empty rows", torch.zeros(0, 4)), ("empty cols", torch.zeros(3, 0)),
    ]


SPECS = ([DeltaQuantSpec(b) for b in range(1, 9)]
         + [DeltaSwitchSpec(0.3), DeltaSwitchSpec(0.3, "row"), DeltaSwitchSpec(1.0, "row"), DeltaSwitchSpec(0.01)]
         + [LowRankSpec(1), LowRankSpec(2), LowRankSpec(64)])
METAS = [torch.float32, torch.float16]


def _disk_data_bytes(tensors):
    """Tensor-data bytes of the safetensors file holding `tensors` (file minus its 8-byte length and header)."""
    blob = st_save(tensors)
    (header,) = struct.unpack("<Q", blob[:8])
    return len(blob) - 8 - header, blob


# ---------------------------------------------------------------- (a) exact bits, (b) round trip

@pytest.mark.parametrize("meta", METAS + [torch.bfloat16], ids=str)
@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_stored_bits_equal_disk_bytes_and_round_trip_is_bitwise(spec, meta):
    for name, delta in _cases():
        enc = encode(delta, spec, meta)
        tensors = to_tensors(enc, "layer.w")
        disk, blob = _disk_data_bytes(tensors)
        assert stored_bits(spec, tuple(delta.shape), bits_of_dtype(meta)) == 8 * tensor_bytes(tensors) == 8 * disk, name
        back = from_tensors(st_load(blob), "layer.w", enc.info())
        out = decode(enc)
        assert out.dtype == torch.float32 and out.shape == delta.shape, name
        assert torch.equal(decode(back), out), name


@pytest.mark.parametrize("storage", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("own", [torch.float32, torch.bfloat16], ids=str)
def test_base_stored_bits_equal_disk_bytes_and_round_trip(storage, own):
    for name, tensor in _cases():
        tensor = tensor.to(own)
        stored = encode_base(tensor, storage)
        tensors = to_tensors(stored, "base.w")
        disk, blob = _disk_data_bytes(tensors)
        assert base_stored_bits(tuple(tensor.shape), storage, bits_of_dtype(own)) == 8 * disk, name
        back = from_tensors(st_load(blob), "base.w", stored.info())
        out = decode_base(stored)
        assert out.dtype == torch.float32 and out.shape == tensor.shape
        assert torch.equal(decode_base(back), out), name
        if storage != "int8" or tensor.ndim < 2:
            assert torch.equal(out, tensor.to({"fp16": torch.float16}.get(storage, tensor.dtype)).float())


def test_closed_form_cost_by_hand():
    shape = (3, 5)  # n = 15, U = 3
    assert stored_bits(DeltaQuantSpec(1), shape, 16) == 8 * 2 + 3 * 16
    assert stored_bits(DeltaQuantSpec(3), shape, 16) == 8 * 6 + 2 * 3 * 16  # ⌈45/8⌉ = 6 bytes
    assert stored_bits(DeltaSwitchSpec(0.3), shape, 32) == 8 * 2 + 8 * 1 + 32  # k = ⌈4.5⌉ = 5
    assert stored_bits(DeltaSwitchSpec(0.3, "row"), shape, 32) == 8 * 2 + 8 * 1 + 3 * 32
    assert stored_bits(LowRankSpec(2), shape, 16) == (3 + 5) * 2 * 16
    assert stored_bits(LowRankSpec(9), shape, 16) == (3 + 5) * 3 * 16
    assert stored_bits(LowRankSpec(9), (7,), 16) == 7 * 16
    assert base_stored_bits(shape, "int8", 16) == 15 * 8 + 3 * 32
    assert base_stored_bits((7,), "int8", 16) == 7 * 16
    assert base_stored_bits((7,), "fp16", 32) == 7 * 16


def test_switch_k_is_ceil_with_float_products_snapped():
    assert 0.07 * 100 > 7 and switch_k(0.07, 100) == 7  # not ⌈7.000000000000001⌉ = 8
    assert switch_k(0.3, 10) == 3 and switch_k(0.1, 10) == 1 and switch_k(0.7, 100) == 70
    assert switch_k(0.15, 10) == 2 and switch_k(1e-9, 10) == 1 and switch_k(1.0, 13) == 13
    assert switch_k(0.5, 0) == 0 and switch_k(0.3, 4500) == 1350


# ---------------------------------------------------------------- (c) error bounds

@pytest.mark.parametrize("meta", METAS, ids=str)
@pytest.mark.parametrize("bits", range(2, 9))
def test_delta_quant_error_at_most_half_a_step(bits, meta):
    for name, delta in _cases():
        if delta.numel() == 0:
            continue
        enc = encode(delta, DeltaQuantSpec(bits), meta)
        rows = enc.scale.numel()
        err = (decode(enc) - delta).reshape(rows, -1).double().abs().amax(dim=1)
        amax = delta.reshape(rows, -1).double().abs().amax(dim=1)
        slack = amax * (2**-9 if meta == torch.float16 else 1e-6)  # rounding of the stored scale/zero
        assert torch.all(err <= enc.scale.double() / 2 * (1 + 1e-5) + slack), name


def test_delta_quant_zero_point_overflow_uses_zero_centred_grid():
    delta = torch.tensor([[1000.0, 1000.001, 1000.0005], [0.1, -0.2, 0.3]])
    enc = encode(delta, DeltaQuantSpec(8), torch.float16)  # centred z ≈ −2.5e8 overflows fp16
    assert torch.isfinite(enc.zero).all() and float(enc.scale[0]) == pytest.approx(2000 / 255, rel=1e-3)
    err = (decode(enc) - delta).abs().amax(dim=1).double()
    assert torch.all(err <= enc.scale.double() / 2 + 2**-9 * delta.abs().amax(dim=1).double())
    assert 8 * tensor_bytes(to_tensors(enc, "w")) == stored_bits(DeltaQuantSpec(8), (2, 3), 16)


def test_overflowing_metadata_is_refused():
    with pytest.raises(MergetoolError, match="overflows float16"):
        encode(torch.tensor([[-1e6, 1e6]]), DeltaQuantSpec(2), torch.float16)
    with pytest.raises(MergetoolError, match="overflows float16"):
        encode(torch.tensor([1e5, -1e5]), DeltaQuantSpec(1), torch.float16)
    with pytest.raises(MergetoolError, match="base_storage"):
        encode_base(torch.tensor([[1e6, 1.0]]), "fp16")
    with pytest.raises(MergetoolError, match="inf or NaN"):
        encode(torch.tensor([1.0, float("nan")]), LowRankSpec(1), torch.float32)


@pytest.mark.parametrize("spec", [DeltaSwitchSpec(0.3), DeltaSwitchSpec(0.05, "row"), DeltaSwitchSpec(0.5)], ids=repr)
def test_switch_keeps_exactly_the_k_largest_magnitudes(spec):
    delta = _rand(6, 7, seed=9)
    delta[2, :4] = 0.05  # ties
    delta[4, 1:5] = -0.05
    out = decode(encode(delta, spec, torch.float32))
    k = switch_k(spec.density, delta.numel())
    kept = torch.nonzero(out.flatten()).flatten()
    order = torch.sort(delta.abs().flatten(), descending=True, stable=True).indices
    assert kept.numel() == k and torch.equal(kept, order[:k].sort().values)
    assert torch.equal(torch.sign(out.flatten()[kept]), torch.sign(delta.flatten()[kept]))


@pytest.mark.parametrize("shape", [(3, 5), (5, 3), (2, 3, 5), (4, 4)])
def test_low_rank_at_full_rank_reconstructs(shape):
    delta = _rand(*shape, seed=11)
    out = decode(encode(delta, LowRankSpec(max(shape)), torch.float32))
    assert (out - delta).abs().max() <= 1e-5


def test_low_rank_truncation_is_optimal_and_small_tensors_are_whole():
    delta = _rand(6, 5, seed=12)
    enc = encode(delta, LowRankSpec(2), torch.float32)
    assert enc.u.shape == (6, 2) and enc.v.shape == (2, 5)
    tail = torch.linalg.svdvals(delta)[2:].square().sum().sqrt()  # Eckart–Young
    assert float((decode(enc) - delta).norm()) == pytest.approx(float(tail), rel=1e-4)
    vec = _rand(7, seed=13)
    assert torch.equal(decode(encode(vec, LowRankSpec(1), torch.float32)), vec)
    assert torch.equal(decode(encode(vec, LowRankSpec(1), torch.float16)), vec.half().float())


def test_int8_base_error_at_most_half_a_step():
    base = _rand(5, 9, seed=14)
    stored = encode_base(base, "int8")
    err = (decode_base(stored) - base).abs().amax(dim=1)
    assert torch.all(err <= stored.scale / 2 * (1 + 1e-5) + 1e-7)


# ---------------------------------------------------------------- (d) literal tensors by hand

def test_bitdelta_literal():
    delta = torch.tensor([[0.5, -0.25, 1.0, -0.25], [0.0, 0.0, 0.0, 0.0]])
    enc = encode(delta, DeltaQuantSpec(1), torch.float32)
    assert enc.codes.tolist() == [0b00001010] and enc.scale.tolist() == [0.5, 0.0] and enc.zero is None
    assert decode(enc).tolist() == [[0.5, -0.5, 0.5, -0.5], [0.0, 0.0, 0.0, 0.0]]  # sign · mean|row|
    row = torch.tensor([0.3, -0.1, 0.2])  # 1-D: one unit, scale = mean|x| = 0.2
    assert torch.equal(decode(encode(row, DeltaQuantSpec(1), torch.float32)),
                       torch.tensor([1.0, -1.0, 1.0]) * row.abs().mean())


def test_delta_quant_two_bit_literal():
    delta = torch.tensor([[0.0, 1.0, 2.0, 3.0], [-3.0, -1.0, 1.0, 3.0]])
    enc = encode(delta, DeltaQuantSpec(2), torch.float16)
    # row 0: s = 1, z = 0, codes 0 1 2 3; row 1: s = 2, z = 1.5, codes 0 1 2 3 → bytes 0b11100100 twice
    assert enc.scale.tolist() == [1.0, 2.0] and enc.zero.tolist() == [0.0, 1.5]
    assert enc.codes.tolist() == [228, 228]
    assert torch.equal(decode(enc), delta)
    const = encode(torch.full((2, 3), 0.25), DeltaQuantSpec(3), torch.float32)  # s = 1, z = −value
    assert const.scale.tolist() == [1.0, 1.0] and const.zero.tolist() == [-0.25, -0.25]
    assert torch.equal(decode(const), torch.full((2, 3), 0.25))


def test_switch_literal():
    delta = torch.tensor([[4.0, -2.0, 0.5, 0.0], [0.1, 0.0, 0.0, -6.0]])
    enc = encode(delta, DeltaSwitchSpec(0.375), torch.float32)  # k = 3: |−6|, 4, |−2|
    assert enc.mask.tolist() == [0b10000011] and enc.sign.tolist() == [0b110] and enc.scale.tolist() == [4.0]
    assert decode(enc).tolist() == [[4.0, -4.0, 0.0, 0.0], [0.0, 0.0, 0.0, -4.0]]
    rows = encode(delta, DeltaSwitchSpec(0.375, "row"), torch.float32)
    assert rows.scale.tolist() == [3.0, 6.0]
    assert decode(rows).tolist() == [[3.0, -3.0, 0.0, 0.0], [0.0, 0.0, 0.0, -6.0]]
    ties = encode(torch.tensor([1.0, -1.0, 1.0, -1.0, 0.5]), DeltaSwitchSpec(0.4), torch.float32)
    assert ties.mask.tolist() == [0b11] and ties.sign.tolist() == [0b10]  # the lower-index ties win
    empty_row = encode(torch.tensor([[0.0, 0.0], [1.0, 2.0]]), DeltaSwitchSpec(0.5, "row"), torch.float32)
    assert empty_row.scale.tolist() == [0.0, 1.5]


def test_int8_base_literal():
    base = torch.tensor([[-254.0, 128.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    stored = encode_base(base, "int8")
    assert stored.data.dtype == torch.int8 and stored.data.tolist() == [[-127, 64, 0, 1], [0, 0, 0, 0]]
    assert stored.scale.tolist() == [2.0, 0.0] and torch.equal(decode_base(stored), base)
    norm = encode_base(torch.tensor([1.5, 2.5], dtype=torch.bfloat16), "int8")
    assert norm.scale is None and norm.data.dtype == torch.bfloat16  # 1-D stays in its own dtype


# ---------------------------------------------------------------- (e) tampered libraries

def _stored(spec, delta=None, meta=torch.float16):
    enc = encode(_rand(3, 5, seed=21) if delta is None else delta, spec, meta)
    return dict(to_tensors(enc, "w")), enc.info()


def _refused(tensors, info, match=None):
    with pytest.raises(LibraryError, match=match):
        from_tensors(tensors, "w", info)


def test_tampered_delta_quant_is_refused():
    t, info = _stored(DeltaQuantSpec(3))
    _refused({**t, "w.codes": t["w.codes"][:-1]}, info, "w.codes")  # wrong packed length
    _refused({**t, "w.codes": t["w.codes"].to(torch.int8)}, info, "w.codes")  # wrong dtype
    _refused({**t, "w.scale": t["w.scale"][:-1]}, info, "w.scale")  # wrong scale count
    _refused({**t, "w.scale": t["w.scale"].float()}, info, "w.scale")  # metadata in another dtype
    _refused({k: v for k, v in t.items() if k != "w.zero"}, info, "missing")
    _refused({**t, "w.scale": torch.full_like(t["w.scale"], float("nan"))}, info, "inf or NaN")
    _refused({**t, "w.scale": -t["w.scale"]}, info, "out-of-range")
    _refused(t, {**info, "bits": 4}, "w.codes")
    _refused(t, {**info, "shape": [5, 3]}, "w.scale")
    b1, info1 = _stored(DeltaQuantSpec(1))
    _refused({**b1, "w.zero": t["w.zero"]}, info1, "unexpected parts")
    padded = b1["w.codes"].clone()
    padded[-1] |= 0x80  # 15 bits in 2 bytes: bit 15 is padding
    _refused({**b1, "w.codes": padded}, info1, "padding")


def test_tampered_switch_and_low_rank_are_refused():
    t, info = _stored(DeltaSwitchSpec(0.3, "row"))
    mask = t["w.mask"].clone()
    mask[0] ^= 0xFF  # keeps a different number of entries
    _refused({**t, "w.mask": mask}, info, "keeps")
    _refused({**t, "w.mask": torch.cat([t["w.mask"], t["w.mask"][:1]])}, info, "w.mask")
    _refused({**t, "w.sign": t["w.sign"][:0]}, info, "w.sign")
    _refused({**t, "w.scale": t["w.scale"][:1]}, info, "w.scale")  # a tensor scale where rows are due
    _refused(t, {**info, "density": 0.5}, "keeps")
    lr, lr_info = _stored(LowRankSpec(2))
    _refused({**lr, "w.u": lr["w.u"][:, :1]}, lr_info, "w.u")
    _refused({**lr, "w.full": lr["w.u"]}, lr_info, "unexpected parts")
    _refused(lr, {**lr_info, "rank": 3}, "w.u")


def test_tampered_base_is_refused():
    stored = encode_base(_rand(3, 5, seed=22), "int8")
    t, info = to_tensors(stored, "w"), stored.info()
    codes = t["w.codes"].clone()
    codes[0, 0] = -128
    _refused({**t, "w.codes": codes}, info, "-128")
    _refused({**t, "w.codes": codes.to(torch.uint8)}, info, "w.codes")
    _refused({**t, "w.scale": t["w.scale"][:2]}, info, "w.scale")
    _refused({**t, "w": torch.zeros(3, 5)}, info, "plain")
    half = to_tensors(encode_base(_rand(3, 5), "fp16"), "w")
    _refused({"w": half["w"].float()}, {**info, "storage": "fp16"}, "float16")


@pytest.mark.parametrize("bad", [
    {"codec": "zip"}, {"bits": 9}, {"bits": 0}, {"shape": [-3, 5]}, {"shape": "3x5"}, {"meta_dtype": "int8"},
    {"bits": None},
], ids=repr)
def test_bad_info_is_refused(bad):
    t, info = _stored(DeltaQuantSpec(3))
    _refused(t, {**info, **bad})
    _refused(t, {k: v for k, v in info.items() if k != "meta_dtype"})
    _refused(t, None)


# ---------------------------------------------------------------- (f) bad specs

@pytest.mark.parametrize("make", [
    lambda: DeltaQuantSpec(0), lambda: DeltaQuantSpec(9), lambda: DeltaQuantSpec(2.0), lambda: DeltaQuantSpec(True),
    lambda: DeltaSwitchSpec(0), lambda: DeltaSwitchSpec(1.5), lambda: DeltaSwitchSpec(math.nan),
    lambda: DeltaSwitchSpec(-0.1), lambda: DeltaSwitchSpec("0.5"), lambda: DeltaSwitchSpec(0.5, "col"),
    lambda: LowRankSpec(0), lambda: LowRankSpec(-1), lambda: LowRankSpec(2.0),
    lambda: encode_base(torch.zeros(2, 2), "int4"), lambda: base_stored_bits((2, 2), "bf16", 16),
    lambda: encode(torch.zeros(2, 2), DeltaQuantSpec(2), torch.int8),
    lambda: encode(torch.zeros(2, 2, dtype=torch.int32), DeltaQuantSpec(2), torch.float32),
])
def test_bad_specs_are_refused_in_one_line(make):
    with pytest.raises(MergetoolError) as err:
        make()
    assert not isinstance(err.value, LibraryError)
    line = err.value.one_line()
    assert "\n" not in line and "fix:" in line and err.value.key


def test_valid_specs():
    assert DeltaSwitchSpec(1).density == 1.0 and DeltaSwitchSpec(0.25, "row").scale == "row"
    assert DeltaQuantSpec(8).bits == 8 and LowRankSpec(1).rank == 1
