"""The storage cost C of MERGE (paper Sec. III-C, Eq. 8).

    C = Σ_experts Σ_tensors Σ_units  b·d_unit / (b⁺·d)  +  2·𝟙(b < b⁺) / d

d is the number of float parameters in the base model's mergeable components and b⁺ its
full-precision width. An unquantised unit costs b⁺·d_unit/(b⁺·d); a quantised one b bits per
value plus scale and zero-point (b⁺ bits each, hence 2/d after normalising by b⁺·d).

C itself is `core.storage.storage_cost(bits, d=..., base_bits=...)` = bits / (b⁺·d) (plus 1 for an adapter
zoo's frozen base, stored once); this module counts the bits. `bits` is exact on disk: `tensor_data_bits` counts the
padding of each packed code stream to a whole byte (once per tensor), so C can differ from Eq. 8 as
written by that padding (tests/test_cost.py checks Eq. 8 as written against it). The per-channel row
mask (only stored when a tensor mixes quantised and full rows) is not part of Eq. 8; `mask_bytes`
reports it separately, so bytes on disk = C·d·b⁺/8 + Σ mask_bytes.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from mergetool.merge.quantize import QuantizedTensor, QuantSpec, bits_of_dtype, unit_flags


def _check_width(qt: QuantizedTensor, base_bits: int) -> None:
    """Eq. 8 charges b⁺ bits for full-precision values and for each scale/zero-point."""
    for part in (qt.full, qt.scale, qt.zero):
        if part is not None and part.is_floating_point() and bits_of_dtype(part.dtype) != base_bits:
            raise ValueError(
                f"a tensor part is stored as {part.dtype} but b⁺ = {base_bits} bits; "
                "store full-precision data and quantisation metadata in the base dtype"
            )


def data_bits(*, quantized_values: int, quantized_units: int, bits: int, full_values: int, full_bits: int,
              base_bits: int) -> int:
    """Exact stored bits of one tensor from counts: the packed codes (padded once to a whole byte),
    scale + zero-point per quantised unit (b⁺ bits each) and the full-precision values."""
    packed = 8 * ((quantized_values * bits + 7) // 8) if quantized_units else 0
    return packed + 2 * base_bits * quantized_units + full_bits * full_values


def tensor_data_bits(qt: QuantizedTensor, base_bits: int) -> int:
    """Exact bits of qt's stored data, the row mask excluded: packed codes (whole bytes),
    scale + zero-point, and full-precision values (base_bits each, which is checked)."""
    _check_width(qt, base_bits)
    n_q = qt.n_quantized_units
    return data_bits(quantized_values=n_q * qt.unit_size, quantized_units=n_q, bits=qt.bits,
                     full_values=0 if qt.full is None else qt.full.numel(),
                     full_bits=bits_of_dtype(qt.full.dtype if qt.full is not None else qt.dtype), base_bits=base_bits)


def counted_bits(tensor: Tensor, spec: QuantSpec, *, base_bits: int, source_range: Optional[Tensor] = None) -> int:
    """The bits `tensor_data_bits(quantize(tensor, spec, ...))` gives, from Q's decision alone: nothing is
    quantised, packed or held (the search's exact C without building experts)."""
    full_bits = bits_of_dtype(tensor.dtype)
    decided = unit_flags(tensor, spec, meta_dtype=tensor.dtype, source_range=source_range)
    if decided is None:
        return data_bits(quantized_values=0, quantized_units=0, bits=spec.bits, full_values=tensor.numel(),
                         full_bits=full_bits, base_bits=base_bits)
    _, units, _, _, flags = decided
    n_q = int(flags.sum())
    return data_bits(quantized_values=n_q * units.shape[1], quantized_units=n_q, bits=spec.bits,
                     full_values=(units.shape[0] - n_q) * units.shape[1], full_bits=full_bits, base_bits=base_bits)


def mask_bytes(qt: QuantizedTensor) -> int:
    """Bytes of the packed row mask (0 when the tensor does not mix quantised and full rows)."""
    return 0 if qt.row_mask is None else (qt.row_mask.numel() + 7) // 8
