"""The conditional quantiser Q of MERGE (paper Sec. III-B, Eq. 6), with exact b-bit packing.

A unit is the whole tensor (per_tensor) or one output row (per_channel: dim 0, dims 1.. are
flattened). 1-D and 0-D tensors (norms, biases) are always one unit. A unit with min m and
max M gets scale s = (M − m)/(2^b − 1) and a (fractional) zero-point z; its values become
codes q ∈ [0, 2^b − 1] and dequantise to s·(q − z): the nearest point of the grid B (Eq. 6).
s and z are stored in the base model's float dtype (b⁺ bits each, as Eq. 8 counts), and the
codes are computed against the *stored* s and z, so the round trip error is ≤ s/2 up to float
rounding of the stored metadata (for 16-bit metadata about half an ulp of the unit's largest
magnitude). A constant unit is stored exactly (s = 1, z = −value); a unit whose s or z
overflows the metadata dtype stays unquantised.

In `conditional` mode a unit is quantised only when its dynamic range (max − min) is ≤ the
mean range of the same unit over the group's source tensors (the members before merging).

Storage of one tensor (see `to_tensors`): packed codes of the quantised units, concatenated
and padded to a whole byte once; scale and zero per quantised unit; the unquantised rows in
the original dtype; and, only when rows are mixed, a packed row bitmask (1 = quantised).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import Tensor

from mergetool.core.errors import LibraryError, MergetoolError

Granularity = Literal["per_tensor", "per_channel"]
Mode = Literal["conditional", "always", "never"]
OFF_BITS = (32,)  # QuantSpec.bits meaning "quantisation off" (full precision); 16 is refused, not "off"


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 8
    granularity: Granularity = "per_channel"
    mode: Mode = "conditional"

    def __post_init__(self) -> None:
        if self.bits not in OFF_BITS and not 2 <= self.bits <= 8:
            raise MergetoolError(
                f"quantisation bits must be 2..8, or 32 (off), got {self.bits}",
                key="bits", fix="use e.g. bits: 4 or bits: 8",
            )
        if self.granularity not in ("per_tensor", "per_channel"):
            raise MergetoolError(
                f"unknown granularity {self.granularity!r}", key="granularity",
                fix="use per_tensor or per_channel",
            )
        if self.mode not in ("conditional", "always", "never"):
            raise MergetoolError(
                f"unknown quantisation mode {self.mode!r}", key="mode",
                fix="use conditional, always or never",
            )

    @property
    def enabled(self) -> bool:
        return self.bits <= 8 and self.mode != "never"


def bits_of_dtype(dtype: torch.dtype) -> int:
    """Bits per element of a dtype (b⁺: 32 for float32, 16 for bfloat16/float16)."""
    return torch.empty((), dtype=dtype).element_size() * 8


# ---------------------------------------------------------------- bit packing

def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack uint8 codes < 2^bits into a little-endian bit stream of ceil(n·bits/8) bytes.

    Code i occupies stream bits [i·bits, (i+1)·bits); stream bit j is bit j % 8 of byte j // 8.
    Eight codes fill exactly `bits` bytes, so whole groups of 8 are packed through one int64.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")
    codes = codes.reshape(-1)
    n = codes.numel()
    n_bytes = (n * bits + 7) // 8
    if bits == 8:
        return codes.to(torch.uint8).clone()
    if 8 % bits == 0:  # 1, 2, 4 bits: whole codes per byte, plain uint8 arithmetic
        per = 8 // bits
        padded = torch.zeros(n_bytes * per, dtype=torch.uint8, device=codes.device)
        padded[:n] = codes
        padded = padded.view(n_bytes, per)
        out = padded[:, 0].clone()
        for k in range(1, per):
            out |= padded[:, k] << (k * bits)
        return out
    groups = (n + 7) // 8
    padded = torch.zeros(groups * 8, dtype=torch.int64, device=codes.device)
    padded[:n] = codes
    padded = padded.view(groups, 8)
    word = torch.zeros(groups, dtype=torch.int64, device=codes.device)
    for k in range(8):  # loop over the 8 code slots of a group, not over elements
        word |= padded[:, k] << (k * bits)
    shifts = torch.arange(0, 8 * bits, 8, device=codes.device)
    out = ((word[:, None] >> shifts) & 0xFF).to(torch.uint8).reshape(-1)
    return out[:n_bytes].clone()


def unpack_bits(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of pack_bits: the first n codes of the stream, as uint8."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")
    packed = packed.reshape(-1)
    if packed.numel() != (n * bits + 7) // 8:
        raise ValueError(f"{packed.numel()} bytes cannot hold exactly {n} codes of {bits} bits")
    if bits == 8:
        return packed.to(torch.uint8).clone()
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        codes = (packed[:, None] >> shifts) & ((1 << bits) - 1)
        return codes.reshape(-1)[:n].clone()
    groups = (n + 7) // 8
    padded = torch.zeros(groups * bits, dtype=torch.int64, device=packed.device)
    padded[: packed.numel()] = packed
    padded = padded.view(groups, bits)
    word = torch.zeros(groups, dtype=torch.int64, device=packed.device)
    for j in range(bits):
        word |= padded[:, j] << (8 * j)
    shifts = torch.arange(0, 8 * bits, bits, device=packed.device)
    codes = ((word[:, None] >> shifts) & ((1 << bits) - 1)).to(torch.uint8).reshape(-1)
    return codes[:n].clone()


# ---------------------------------------------------------------- the quantised tensor

@dataclass
class QuantizedTensor:
    """One tensor after Q. `full` alone (packed None) means nothing was quantised."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    bits: int
    granularity: Granularity  # effective: 1-D tensors are always per_tensor
    packed: Optional[Tensor] = None  # uint8 codes of the quantised units, concatenated
    scale: Optional[Tensor] = None  # one per quantised unit, metadata dtype
    zero: Optional[Tensor] = None
    row_mask: Optional[Tensor] = None  # bool per row (True = quantised), only when mixed
    full: Optional[Tensor] = None  # unquantised rows (or the whole tensor), original dtype

    @property
    def n_units(self) -> int:
        return self.shape[0] if self.granularity == "per_channel" else 1

    @property
    def unit_size(self) -> int:
        numel = math.prod(self.shape)
        return numel // self.n_units if self.n_units else 0

    @property
    def n_quantized_units(self) -> int:
        return 0 if self.scale is None else self.scale.numel()

    @property
    def quantized(self) -> bool:
        """True when at least one unit is quantised."""
        return self.packed is not None

    def unit_flags(self) -> Tensor:
        """Bool per unit: True where the unit is quantised."""
        if self.row_mask is not None:
            return self.row_mask
        return torch.full((self.n_units,), self.quantized, dtype=torch.bool)

    def info(self) -> dict:
        """JSON-serialisable description; `keys` are suffixes appended to the prefix."""
        return {
            "shape": list(self.shape),
            "dtype": str(self.dtype).removeprefix("torch."),
            "bits": self.bits,
            "granularity": self.granularity,
            "keys": sorted(_parts(self)),
        }


def _units(t: Tensor, granularity: str) -> Tensor:
    """2-D (units × unit size) view."""
    if granularity == "per_channel":
        return t.reshape(t.shape[0], -1)
    return t.reshape(1, -1)


def _effective_granularity(t: Tensor, spec: QuantSpec) -> Granularity:
    return "per_channel" if spec.granularity == "per_channel" and t.ndim >= 2 else "per_tensor"


def _min_max(units: Tensor) -> tuple[Tensor, Tensor]:
    """Exact min and max per unit, in float64."""
    return units.amin(dim=1).double(), units.amax(dim=1).double()


def _grid(lo: Tensor, hi: Tensor, qmax: int, meta_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Scale and zero-point per unit, rounded to meta_dtype (returned in float64)."""
    s = ((hi - lo) / qmax).to(meta_dtype).double()
    flat = s == 0  # a constant unit (or a range below the metadata's resolution)
    s = torch.where(flat, torch.ones_like(s), s)
    # Centre the grid on [lo, hi]: z = qmax/2 − (lo + hi)/(2s), i.e. −lo/s when s is exact.
    z = torch.where(flat, -lo, qmax / 2 - (lo + hi) / (2 * s))
    return s, z.to(meta_dtype).double()


def unit_flags(tensor: Tensor, spec: QuantSpec, sources: Optional[Sequence[Tensor]] = None, *,
               meta_dtype: Optional[torch.dtype] = None, source_range: Optional[Tensor] = None):
    """Q's decision, the one rule `quantize` and the cost count share: (granularity, units, scale, zero,
    flags), flags True where a unit is quantised; None when nothing can be (not float, Q off, empty)."""
    gran = _effective_granularity(tensor, spec)
    if not tensor.is_floating_point() or not spec.enabled or tensor.numel() == 0:
        return None
    units = _units(tensor, gran)
    lo, hi = _min_max(units)
    if not bool(torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise MergetoolError(
            "cannot quantise a tensor holding inf or NaN",
            fix="check the models for non-finite weights, or disable quantisation",
        )
    flags = torch.ones_like(lo, dtype=torch.bool)
    if spec.mode == "conditional" and source_range is not None:
        flags = (hi - lo) <= source_range.to(hi)
    elif spec.mode == "conditional" and sources is not None:
        ranges = []
        for src in sources:
            if tuple(src.shape) != tuple(tensor.shape):
                raise ValueError(f"source shape {tuple(src.shape)} differs from {tuple(tensor.shape)}")
            s_lo, s_hi = _min_max(_units(src, gran))
            ranges.append(s_hi - s_lo)
        flags = (hi - lo) <= torch.stack(ranges).mean(dim=0)
    s, z = _grid(lo, hi, (1 << spec.bits) - 1, meta_dtype or tensor.dtype)
    return gran, units, s, z, flags & torch.isfinite(s) & torch.isfinite(z)


def quantize(
    tensor: Tensor,
    spec: QuantSpec,
    sources: Optional[Sequence[Tensor]] = None,
    *,
    meta_dtype: Optional[torch.dtype] = None,
    source_range: Optional[Tensor] = None,
) -> QuantizedTensor:
    """Q(tensor) under `spec`. `sources` are the group's members before merging (conditional
    mode); None means the tensor is its own source (a singleton group: always quantised).
    `source_range` may replace `sources`: the mean over the sources of each unit's max − min
    (float64), as `mergetool.models.streaming.unit_ranges` computes it without holding the sources.
    `meta_dtype` is the dtype of scale/zero, normally the base model's float dtype (default:
    the tensor's). A unit whose scale or zero-point overflows meta_dtype stays unquantised."""
    qt = QuantizedTensor(tuple(tensor.shape), tensor.dtype, spec.bits, _effective_granularity(tensor, spec))
    qt.full = tensor
    decided = unit_flags(tensor, spec, sources, meta_dtype=meta_dtype, source_range=source_range)
    if decided is None or not bool(decided[4].any()):
        return qt
    _, units, s, z, flags = decided
    qmax = (1 << spec.bits) - 1
    meta_dtype = meta_dtype or tensor.dtype
    s, z = s[flags], z[flags]
    rows = flags.to(units.device)
    picked = units if bool(flags.all()) else units[rows]
    codes = torch.round(picked.float() / s.float()[:, None] + z.float()[:, None])
    qt.packed = pack_bits(codes.clamp_(0, qmax).to(torch.uint8), spec.bits)
    qt.scale, qt.zero = s.to(meta_dtype), z.to(meta_dtype)
    qt.full = None
    if not bool(flags.all()):
        qt.row_mask = flags.cpu()
        rest = units[~rows]
        qt.full = rest.reshape(rest.shape[0], *tensor.shape[1:]).clone()
    return qt


def dequantize(qt: QuantizedTensor) -> Tensor:
    """The tensor with quantised units replaced by s·(q − z), in the original dtype/shape."""
    if not qt.quantized:
        return qt.full
    n_q, size = qt.n_quantized_units, qt.unit_size
    codes = unpack_bits(qt.packed, qt.bits, n_q * size).reshape(n_q, size).float()
    values = (codes - qt.zero.float()[:, None]) * qt.scale.float()[:, None]
    if qt.row_mask is None:
        return values.to(qt.dtype).reshape(qt.shape)
    out = torch.empty(qt.n_units, size, dtype=qt.dtype, device=values.device)
    out[qt.row_mask] = values.to(qt.dtype)
    out[~qt.row_mask] = qt.full.reshape(-1, size)
    return out.reshape(qt.shape)


# ---------------------------------------------------------------- storage (safetensors)

def _parts(qt: QuantizedTensor) -> dict[str, Tensor]:
    """Stored tensors by key suffix ("" = the tensor stored as-is)."""
    if not qt.quantized:
        return {"": qt.full}
    parts = {".q": qt.packed, ".scale": qt.scale, ".zero": qt.zero}
    if qt.row_mask is not None:
        parts[".mask"] = pack_bits(qt.row_mask.to(torch.uint8), 1)
    if qt.full is not None:
        parts[".full"] = qt.full
    return parts


def to_tensors(qt: QuantizedTensor, prefix: str) -> dict[str, Tensor]:
    """The tensors to store for qt, keyed f"{prefix}{suffix}" (see QuantizedTensor.info)."""
    return {prefix + k: v.contiguous() for k, v in _parts(qt).items()}


_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
              torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)
}


def _fail(prefix: str, what: str) -> LibraryError:
    return LibraryError(
        f"stored tensor {prefix!r} is malformed: {what}", key=prefix,
        fix="re-export the library; it may be corrupt or tampered with",
    )


def from_tensors(tensors: Mapping[str, Tensor], prefix: str, info: dict) -> QuantizedTensor:
    """Rebuild a QuantizedTensor from stored tensors and its `info()`; checks consistency."""
    try:
        shape = tuple(int(s) for s in info["shape"])
        dtype = _DTYPES[info["dtype"]]
        bits = int(info["bits"])
        gran = info["granularity"]
        keys = set(info["keys"])
    except (KeyError, TypeError, ValueError) as e:
        raise _fail(prefix, f"bad info {info!r} ({e})") from None
    missing = [prefix + k for k in keys if prefix + k not in tensors]
    if missing:
        raise _fail(prefix, f"missing {missing}")
    qt = QuantizedTensor(shape, dtype, bits, gran)
    if keys == {""}:
        qt.full = tensors[prefix]
        if tuple(qt.full.shape) != shape or qt.full.dtype != dtype:
            raise _fail(prefix, f"expected {shape} {dtype}, got {tuple(qt.full.shape)} {qt.full.dtype}")
        return qt
    if not {".q", ".scale", ".zero"} <= keys or not keys <= {".q", ".scale", ".zero", ".mask", ".full"}:
        raise _fail(prefix, f"unexpected keys {sorted(keys)}")
    if gran not in ("per_tensor", "per_channel") or not 2 <= bits <= 8:
        raise _fail(prefix, f"bad granularity/bits {gran!r}/{bits}")
    qt.packed, qt.scale, qt.zero = (tensors[prefix + k] for k in (".q", ".scale", ".zero"))
    n_units = qt.n_units
    if ".mask" in keys:
        mask = tensors[prefix + ".mask"]
        if mask.dtype != torch.uint8 or mask.numel() != (n_units + 7) // 8:
            raise _fail(prefix, "row mask has the wrong size")
        qt.row_mask = unpack_bits(mask, 1, n_units).bool()
    if ".full" in keys:
        qt.full = tensors[prefix + ".full"]
    n_q = int(qt.row_mask.sum()) if qt.row_mask is not None else n_units
    n_full = n_units - n_q
    if qt.scale.numel() != n_q or qt.zero.numel() != n_q:
        raise _fail(prefix, f"expected {n_q} scales/zeros")
    if qt.packed.dtype != torch.uint8 or qt.packed.numel() != (n_q * qt.unit_size * bits + 7) // 8:
        raise _fail(prefix, "packed codes have the wrong size")
    if n_full and (qt.full is None or qt.full.numel() != n_full * qt.unit_size or qt.full.dtype != dtype):
        raise _fail(prefix, "full-precision rows do not match the mask")
    if not n_full and qt.full is not None:
        raise _fail(prefix, "full-precision rows stored but none expected")
    return qt
