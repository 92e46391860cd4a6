"""Delta expert codecs, the kernels: specs, encode, decode and the exact closed-form stored bits.

Plain functions over torch tensors, no I/O (storage as named tensors is `mergetool.merge.codecs`).
A unit is one output row (dim 0, dims 1.. flattened) of a ≥2-D tensor; a 0-D or 1-D tensor is one
unit. U is the number of units, n the number of values, m the metadata width in bits (the metadata
dtype: normally the base dtype, b⁺). Every codec always stores the same layout for a given shape and
spec, so `stored_bits` is exact without building anything:

- delta_quant, b ≥ 2: per-unit asymmetric min–max grid as in quantize.py (s = (max − min)/(2^b − 1),
  centred zero-point z, both rounded to the metadata dtype, codes computed against the *stored* s, z;
  a constant unit gets s = 1, z = −value). Decoded value s·(q − z). A unit whose z overflows the
  metadata dtype (a tiny range far from 0) gets the zero-centred grid s = 2·max|x|/(2^b − 1) instead,
  so the layout never changes; the error is still ≤ s/2 of the stored s.
  Bits: 8·⌈n·b/8⌉ + 2·U·m.
- delta_quant, b = 1 (BitDelta): one sign bit per value (1 = negative, so 0 decodes to +scale) and a
  per-unit scale mean|x| (the L2-optimal scale of a sign code). Bits: 8·⌈n/8⌉ + U·m.
- delta_switch (T-Switch-like): k = ⌈ρ·n⌉ (see `switch_k`) entries of largest |x|, ties broken by
  the lower flat index; a mask of n bits, the sign bits of the k kept entries in flat-index order,
  and S scales (S = 1 for scale="tensor", U for "row"): the mean |x| of the kept entries (of that
  row; 0 when none). Decoded value mask·sign·scale (a kept exact zero decodes to +scale).
  Bits: 8·⌈n/8⌉ + 8·⌈k/8⌉ + S·m.
- low_rank: ≥2-D tensors as the (U × n/U) matrix's truncated SVD at r = min(rank, U, n/U):
  u = U_r·diag(σ_r) (U × r) and v = V_rᵀ (r × n/U) in the metadata dtype; 0-D/1-D tensors stored
  whole in the metadata dtype. Bits: (U + n/U)·r·m, or n·m.
- base (`encode_base`): fp32/fp16 plain casts (n·32, n·16 bits); int8 = per-row *symmetric* 8-bit
  (q = round(x/s) ∈ [−127, 127], s = max|row|/127 in float32, codes against the stored s):
  8·n + 32·U bits; 0-D/1-D tensors (norms, biases) stay in their own dtype under int8.
Non-finite inputs, and values that overflow the metadata dtype, raise MergetoolError.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch
from torch import Tensor

from mergetool.core.errors import MergetoolError
from mergetool.merge.quantize import pack_bits, unpack_bits

BaseStorage = Literal["fp32", "fp16", "int8"]
BASE_STORAGES: tuple[str, ...] = ("fp32", "fp16", "int8")
SwitchScale = Literal["tensor", "row"]
META_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT8_SCALE_DTYPE = torch.float32  # int8 base: one float32 scale per row
_CAST = {"fp32": torch.float32, "fp16": torch.float16}


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ---------------------------------------------------------------- specs

@dataclass(frozen=True)
class DeltaQuantSpec:
    """b-bit per-row delta (b = 1..8); b = 1 is BitDelta."""

    bits: int

    def __post_init__(self) -> None:
        if not _is_int(self.bits) or not 1 <= self.bits <= 8:
            raise MergetoolError(f"delta_quant bits must be an integer 1..8, got {self.bits!r}", key="bits",
                                 fix="use e.g. bits: 1 (BitDelta), 2, 4 or 8")


@dataclass(frozen=True)
class DeltaSwitchSpec:
    """Top-k magnitude mask at density ρ ∈ (0, 1], sign bits, one scale per tensor or per row."""

    density: float
    scale: SwitchScale = "tensor"

    def __post_init__(self) -> None:
        d = self.density
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 < d <= 1:  # NaN fails too
            raise MergetoolError(f"delta_switch density must be a number in (0, 1], got {d!r}", key="density",
                                 fix="use e.g. density: 0.1")
        object.__setattr__(self, "density", float(d))
        if self.scale not in ("tensor", "row"):
            raise MergetoolError(f"unknown delta_switch scale {self.scale!r}", key="scale", fix="use tensor or row")


@dataclass(frozen=True)
class LowRankSpec:
    """Truncated SVD of the delta at rank r ≥ 1 (clamped to the matrix's smaller side)."""

    rank: int

    def __post_init__(self) -> None:
        if not _is_int(self.rank) or self.rank < 1:
            raise MergetoolError(f"low_rank rank must be an integer >= 1, got {self.rank!r}", key="rank",
                                 fix="use e.g. rank: 16")


CodecSpec = Union[DeltaQuantSpec, DeltaSwitchSpec, LowRankSpec]


def check_base_storage(storage: object) -> str:
    """`storage` if it is one of BASE_STORAGES, else MergetoolError."""
    if storage not in BASE_STORAGES:
        raise MergetoolError(f"unknown base storage {storage!r}", key="base_storage", fix="use fp32, fp16 or int8")
    return str(storage)


def check_meta_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype not in META_DTYPES:
        raise MergetoolError(f"codec metadata dtype must be float32, float16 or bfloat16, got {dtype}",
                             key="meta_dtype", fix="store codec metadata in the base model's float dtype")
    return dtype


# ---------------------------------------------------------------- units and counts

def unit_shape(shape: Sequence[int]) -> tuple[int, int]:
    """(U, values per unit): rows × the rest for ≥2-D shapes, one unit for 0-D/1-D."""
    shape = tuple(shape)
    if len(shape) >= 2:
        return shape[0], math.prod(shape[1:])
    return 1, math.prod(shape)


def _units(t: Tensor) -> Tensor:
    return t.reshape(*unit_shape(t.shape))


def switch_k(density: float, n: int) -> int:
    """k = ⌈ρ·n⌉, where a float product within 1e-9 (relative) of an integer counts as that integer
    (0.07·100 = 7.000000000000001 gives 7, not 8), at least 1 and at most n for n ≥ 1; 0 for n = 0."""
    if n == 0:
        return 0
    x = density * n
    near = round(x)
    k = near if abs(x - near) <= 1e-9 * x else math.ceil(x)
    return min(n, max(1, k))


def _packed_bits(count: int, bits: int = 1) -> int:
    return 8 * ((count * bits + 7) // 8)


def stored_bits(spec: CodecSpec, shape: Sequence[int], meta_bits: int) -> int:
    """Exact bits the codec writes for a tensor of `shape` (8 × its stored bytes), metadata at meta_bits."""
    n_units, size = unit_shape(shape)
    n = n_units * size
    if isinstance(spec, DeltaQuantSpec):
        return _packed_bits(n, spec.bits) + (1 if spec.bits == 1 else 2) * n_units * meta_bits
    if isinstance(spec, DeltaSwitchSpec):
        scales = n_units if spec.scale == "row" else 1
        return _packed_bits(n) + _packed_bits(switch_k(spec.density, n)) + scales * meta_bits
    if isinstance(spec, LowRankSpec):
        if len(tuple(shape)) < 2:
            return n * meta_bits
        return (n_units + size) * min(spec.rank, n_units, size) * meta_bits
    raise TypeError(f"not a codec spec: {spec!r}")


def base_stored_bits(shape: Sequence[int], storage: str, own_bits: int) -> int:
    """Exact bits of a base tensor stored as `storage`; own_bits is its own dtype's width (kept 0-D/1-D int8)."""
    storage = check_base_storage(storage)
    n_units, size = unit_shape(shape)
    n = n_units * size
    if storage == "int8":
        return 8 * n + 32 * n_units if len(tuple(shape)) >= 2 else own_bits * n
    return n * (32 if storage == "fp32" else 16)


# ---------------------------------------------------------------- encoded tensors

def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class QuantDelta:
    shape: tuple[int, ...]
    spec: DeltaQuantSpec
    codes: Tensor  # uint8, ⌈n·b/8⌉ bytes
    scale: Tensor  # (U,) metadata dtype
    zero: Optional[Tensor] = None  # (U,) metadata dtype; None at b = 1

    def info(self) -> dict:
        return {"codec": "delta_quant", "shape": list(self.shape), "bits": self.spec.bits,
                "meta_dtype": _dtype_name(self.scale.dtype)}


@dataclass
class SwitchDelta:
    shape: tuple[int, ...]
    spec: DeltaSwitchSpec
    mask: Tensor  # uint8, ⌈n/8⌉ bytes
    sign: Tensor  # uint8, ⌈k/8⌉ bytes (1 = negative), kept entries in flat-index order
    scale: Tensor  # (1,) or (U,) metadata dtype

    def info(self) -> dict:
        return {"codec": "delta_switch", "shape": list(self.shape), "density": self.spec.density,
                "scale": self.spec.scale, "meta_dtype": _dtype_name(self.scale.dtype)}


@dataclass
class LowRankDelta:
    shape: tuple[int, ...]
    spec: LowRankSpec
    u: Optional[Tensor] = None  # (U, r) metadata dtype, ≥2-D tensors
    v: Optional[Tensor] = None  # (r, n/U) metadata dtype
    full: Optional[Tensor] = None  # the 0-D/1-D delta in the metadata dtype

    def info(self) -> dict:
        meta = self.full if self.full is not None else self.u
        return {"codec": "low_rank", "shape": list(self.shape), "rank": self.spec.rank,
                "meta_dtype": _dtype_name(meta.dtype)}


@dataclass
class StoredBase:
    shape: tuple[int, ...]
    storage: str
    dtype: torch.dtype  # the tensor's own dtype
    data: Tensor  # cast tensor, own-dtype 0-D/1-D tensor, or int8 codes (original shape)
    scale: Optional[Tensor] = None  # (U,) float32, int8 ≥2-D only

    def info(self) -> dict:
        return {"codec": "base", "shape": list(self.shape), "storage": self.storage,
                "dtype": _dtype_name(self.dtype)}


Encoded = Union[QuantDelta, SwitchDelta, LowRankDelta]


# ---------------------------------------------------------------- encoders

def _check_delta(delta: Tensor, meta_dtype: torch.dtype) -> None:
    check_meta_dtype(meta_dtype)
    if not delta.is_floating_point():
        raise MergetoolError(f"a delta must be a float tensor, got {delta.dtype}", key="delta",
                             fix="encode only the float (mergeable) tensors")
    if not bool(torch.isfinite(delta).all()):
        raise MergetoolError("cannot encode a delta holding inf or NaN", key="delta",
                             fix="check the models for non-finite weights")


def _to_meta(x: Tensor, meta_dtype: torch.dtype, what: str) -> Tensor:
    y = x.to(meta_dtype)
    if not bool(torch.isfinite(y).all()):
        raise MergetoolError(f"{what} overflows {_dtype_name(meta_dtype)}", key="meta_dtype",
                             fix="store the base at fp32, or choose another codec for this group")
    return y


def _row_abs_mean(units: Tensor) -> Tensor:
    if units.shape[1] == 0:
        return torch.zeros(units.shape[0], dtype=torch.float64, device=units.device)
    return units.double().abs().mean(dim=1)


def _quant_grid(units: Tensor, qmax: int, meta_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """quantize.py's grid (scale, centred zero-point, rounded to meta_dtype; float64), with the
    zero-centred grid for units whose zero-point overflows."""
    if units.shape[1] == 0:
        lo = hi = torch.zeros(units.shape[0], dtype=torch.float64, device=units.device)
    else:
        lo, hi = units.amin(dim=1).double(), units.amax(dim=1).double()
    s = ((hi - lo) / qmax).to(meta_dtype).double()
    flat = s == 0
    s = torch.where(flat, torch.ones_like(s), s)
    z = torch.where(flat, -lo, qmax / 2 - (lo + hi) / (2 * s)).to(meta_dtype).double()
    bad = ~(torch.isfinite(s) & torch.isfinite(z))
    if bool(bad.any()):
        wide = (2 * torch.maximum(lo.abs(), hi.abs()) / qmax).to(meta_dtype).double()
        s = torch.where(bad, wide, s)
        z = torch.where(bad, (qmax / 2 - (lo + hi) / (2 * s)).to(meta_dtype).double(), z)
    return _to_meta(s, meta_dtype, "a delta_quant scale").double(), _to_meta(z, meta_dtype, "a zero-point").double()


def encode_quant(delta: Tensor, spec: DeltaQuantSpec, meta_dtype: torch.dtype) -> QuantDelta:
    """b-bit per-unit delta; scale (and zero at b ≥ 2) in meta_dtype, codes against the stored values."""
    _check_delta(delta, meta_dtype)
    units = _units(delta)
    shape = tuple(delta.shape)
    if spec.bits == 1:
        scale = _to_meta(_row_abs_mean(units), meta_dtype, "a BitDelta scale")
        return QuantDelta(shape, spec, pack_bits((units < 0).to(torch.uint8), 1), scale)
    qmax = (1 << spec.bits) - 1
    s, z = _quant_grid(units, qmax, meta_dtype)
    codes = torch.round(units.float() / s.float()[:, None] + z.float()[:, None]).clamp_(0, qmax)
    return QuantDelta(shape, spec, pack_bits(codes.to(torch.uint8), spec.bits), s.to(meta_dtype), z.to(meta_dtype))


def top_k_mask(values: Tensor, k: int) -> Tensor:
    """Bool mask of the k largest of a flat tensor, ties broken by the lower index (= a stable
    descending sort's first k); O(n): the k-th largest value, then the lowest-index ties."""
    n = values.numel()
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=values.device)
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=values.device)
    threshold = torch.topk(values, k, sorted=False).values.min()  # only the values are relied on
    mask = values > threshold
    ties = torch.nonzero(values == threshold).flatten()[: k - int(mask.sum())]
    mask[ties] = True
    return mask


def encode_switch(delta: Tensor, spec: DeltaSwitchSpec, meta_dtype: torch.dtype) -> SwitchDelta:
    """Top-k |delta| mask, signs of the kept entries and the mean kept magnitude per tensor or row."""
    _check_delta(delta, meta_dtype)
    flat = delta.reshape(-1)
    mag = flat.abs()
    mask = top_k_mask(mag, switch_k(spec.density, flat.numel()))
    sign = pack_bits((flat[mask] < 0).to(torch.uint8), 1)
    if spec.scale == "tensor":
        kept = mag[mask].double()
        scale = kept.mean().reshape(1) if kept.numel() else kept.new_zeros(1)
    else:
        rows, kept_rows = _units(delta).abs().double(), mask.reshape(*unit_shape(delta.shape))
        count = kept_rows.sum(dim=1)
        total = (rows * kept_rows).sum(dim=1)
        scale = torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))
    scale = _to_meta(scale, meta_dtype, "a delta_switch scale")
    return SwitchDelta(tuple(delta.shape), spec, pack_bits(mask.to(torch.uint8), 1), sign, scale)


def top_subspace(matrix: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """(u, v) with u @ v the best rank-`rank` approximation of `matrix` (Eckart–Young), from the eigenvectors
    of the smaller Gram matrix: the subspace W (n x rank, orthonormal, float64 eigh) of the top eigenvalues,
    then u = M W, v = Wᵀ (or u = W, v = Wᵀ M on the other side). Exactly the truncated SVD's product, 5-20x
    faster than a full SVD of a tall matrix (a 30522 x 384 embedding: 0.5 s instead of 8 s on 2 cores)."""
    tall = matrix.shape[0] >= matrix.shape[1]
    gram = matrix.T @ matrix if tall else matrix @ matrix.T
    _, vectors = torch.linalg.eigh(gram.double())  # ascending eigenvalues
    w = vectors[:, -rank:].flip(1).to(matrix.dtype).contiguous()
    return (matrix @ w, w.T.contiguous()) if tall else (w, (w.T @ matrix).contiguous())


def encode_low_rank(delta: Tensor, spec: LowRankSpec, meta_dtype: torch.dtype) -> LowRankDelta:
    """Truncated SVD (top_subspace; float32, float64 for float64 input) of the unit matrix."""
    _check_delta(delta, meta_dtype)
    shape = tuple(delta.shape)
    if delta.ndim < 2:
        return LowRankDelta(shape, spec, full=_to_meta(delta, meta_dtype, "a low_rank 1-D delta"))
    rows, cols = unit_shape(shape)
    rank = min(spec.rank, rows, cols)
    work = torch.float64 if delta.dtype == torch.float64 else torch.float32
    matrix = delta.reshape(rows, cols).to(work)
    if rank == 0:
        u, v = matrix.new_zeros(rows, 0), matrix.new_zeros(0, cols)
    else:
        u, v = top_subspace(matrix, rank)
    return LowRankDelta(shape, spec, _to_meta(u, meta_dtype, "a low_rank factor"),
                        _to_meta(v, meta_dtype, "a low_rank factor"))


def encode(delta: Tensor, spec: CodecSpec, meta_dtype: torch.dtype) -> Encoded:
    """Encode a float delta with any codec spec."""
    if isinstance(spec, DeltaQuantSpec):
        return encode_quant(delta, spec, meta_dtype)
    if isinstance(spec, DeltaSwitchSpec):
        return encode_switch(delta, spec, meta_dtype)
    if isinstance(spec, LowRankSpec):
        return encode_low_rank(delta, spec, meta_dtype)
    raise TypeError(f"not a codec spec: {spec!r}")


# ---------------------------------------------------------------- decoders

def decode(encoded: Encoded) -> Tensor:
    """The decoded delta, float32, original shape."""
    rows, size = unit_shape(encoded.shape)
    n = rows * size
    if isinstance(encoded, QuantDelta):
        codes = unpack_bits(encoded.codes, encoded.spec.bits, n).reshape(rows, size).float()
        scale = encoded.scale.float()[:, None]
        if encoded.spec.bits == 1:
            return ((1 - 2 * codes) * scale).reshape(encoded.shape)
        return ((codes - encoded.zero.float()[:, None]) * scale).reshape(encoded.shape)
    if isinstance(encoded, SwitchDelta):
        mask = unpack_bits(encoded.mask, 1, n).bool()
        k = int(mask.sum())
        sign = 1 - 2 * unpack_bits(encoded.sign, 1, k).float()
        scale = encoded.scale.float()
        per_value = scale.repeat_interleave(size)[mask] if encoded.spec.scale == "row" else scale
        out = torch.zeros(n, dtype=torch.float32, device=mask.device)
        out[mask] = sign * per_value
        return out.reshape(encoded.shape)
    if isinstance(encoded, LowRankDelta):
        if encoded.full is not None:
            return encoded.full.float().reshape(encoded.shape)
        return (encoded.u.float() @ encoded.v.float()).reshape(encoded.shape)
    raise TypeError(f"not an encoded delta: {type(encoded).__name__}")


# ---------------------------------------------------------------- base storage

def encode_base(tensor: Tensor, storage: str) -> StoredBase:
    """The base tensor as stored: fp32/fp16 casts, or per-row symmetric int8 (0-D/1-D kept as is)."""
    storage = check_base_storage(storage)
    if not tensor.is_floating_point():
        raise MergetoolError(f"base storage applies to float tensors, got {tensor.dtype}", key="base_storage",
                             fix="store only the float (mergeable) tensors with base_storage")
    shape = tuple(tensor.shape)
    if storage in _CAST:
        data = tensor.to(_CAST[storage])
        if bool((~torch.isfinite(data) & torch.isfinite(tensor)).any()):
            raise MergetoolError(f"base weights overflow {storage}", key="base_storage", fix="use base_storage: fp32")
        return StoredBase(shape, storage, tensor.dtype, data)
    if tensor.ndim < 2:
        return StoredBase(shape, storage, tensor.dtype, tensor.clone())
    if not bool(torch.isfinite(tensor).all()):
        raise MergetoolError("cannot store base weights holding inf or NaN as int8", key="base_storage",
                             fix="use base_storage: fp32 or fp16")
    units = _units(tensor).float()
    amax = units.abs().amax(dim=1) if units.shape[1] else units.new_zeros(units.shape[0])
    scale = (amax / 127).to(INT8_SCALE_DTYPE)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    codes = torch.round(units / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return StoredBase(shape, storage, tensor.dtype, codes.reshape(shape), scale)


def decode_base(stored: StoredBase) -> Tensor:
    """The base tensor as the experts see it, float32, original shape."""
    if stored.scale is None:
        return stored.data.float()
    return (_units(stored.data).float() * stored.scale.float()[:, None]).reshape(stored.shape)
