"""The storage cost C of MERGE (paper Sec. III-C, Eq. 8).

    C = Σ_experts Σ_tensors Σ_units  b·d_unit / (b⁺·d)  +  2·𝟙(b < b⁺) / d

d is the number of float parameters in the base model's mergeable components and b⁺ its
full-precision width. An unquantised unit costs b⁺·d_unit/(b⁺·d); a quantised one b bits per
value plus scale and zero-point (b⁺ bits each, hence 2/d after normalising by b⁺·d).

Two versions:
- `eq8_cost` is Eq. 8 as written.
- `storage_cost` is bit-exact on disk: it also counts the padding of each packed code
  stream to a whole byte (once per tensor). When b·n is a multiple of 8 for every packed
  tensor (n = its number of quantised values) the two are equal. The per-channel row mask
  (only stored when a tensor mixes quantised and full rows) is not part of Eq. 8;
  `mask_bytes` reports it separately, so bytes on disk = storage_cost·d·b⁺/8 + Σ mask_bytes.
"""

from __future__ import annotations

from collections.abc import Iterable

from mergetool.merge.quantize import QuantizedTensor, bits_of_dtype


def _check_width(qt: QuantizedTensor, base_bits: int) -> None:
    """Eq. 8 charges b⁺ bits for full-precision values and for each scale/zero-point."""
    for part in (qt.full, qt.scale, qt.zero):
        if part is not None and part.is_floating_point() and bits_of_dtype(part.dtype) != base_bits:
            raise ValueError(
                f"a tensor part is stored as {part.dtype} but b⁺ = {base_bits} bits; "
                "store full-precision data and quantisation metadata in the base dtype"
            )


def tensor_data_bits(qt: QuantizedTensor, base_bits: int) -> int:
    """Exact bits of qt's stored data, the row mask excluded: packed codes (whole bytes),
    scale + zero-point, and full-precision values (base_bits each, which is checked)."""
    _check_width(qt, base_bits)
    bits = 0
    if qt.packed is not None:
        bits += 8 * qt.packed.numel()
        bits += base_bits * (qt.scale.numel() + qt.zero.numel())
    if qt.full is not None:
        bits += bits_of_dtype(qt.full.dtype) * qt.full.numel()
    return bits


def mask_bytes(qt: QuantizedTensor) -> int:
    """Bytes of the packed row mask (0 when the tensor does not mix quantised and full rows)."""
    return 0 if qt.row_mask is None else (qt.row_mask.numel() + 7) // 8


def _eq8_bits(qt: QuantizedTensor, base_bits: int) -> int:
    """Eq. 8's numerator for one tensor, in bits (cost = bits / (b⁺·d))."""
    n_q = qt.n_quantized_units
    q_values = n_q * qt.unit_size
    full_values = qt.n_units * qt.unit_size - q_values
    # Non-float tensors (rare buffers) are not parameters of Eq. 8; count their real width.
    full_bits = base_bits if qt.dtype.is_floating_point else bits_of_dtype(qt.dtype)
    return qt.bits * q_values + 2 * base_bits * n_q + full_bits * full_values


def eq8_cost(qts: Iterable[QuantizedTensor], d: int, base_bits: int) -> float:
    """C of Eq. 8 over every tensor of every stored expert."""
    return sum(_eq8_bits(qt, base_bits) for qt in qts) / (base_bits * d)


def storage_cost(qts: Iterable[QuantizedTensor], d: int, base_bits: int) -> float:
    """Bit-exact C: Σ tensor_data_bits / (b⁺·d). Used everywhere a cost is reported."""
    return sum(tensor_data_bits(qt, base_bits) for qt in qts) / (base_bits * d)


def plain_cost(n_params: int, d: int) -> float:
    """C of n_params unquantised parameters (each costs b⁺ bits)."""
    return n_params / d
