"""Delta expert codecs (issue #13): what each codec stores, as named tensors, and the checks on reading.

The kernels (specs, encode, decode, closed-form `stored_bits`) are in `codec_kernels` and re-exported
here. Stored tensors, keyed f"{prefix}{suffix}" (U units, n values, k kept, r rank, meta = the
metadata dtype named in `info()["meta_dtype"]`; packed bits are uint8, LSB-first, padded once):

    delta_quant  .codes  uint8 ⌈n·b/8⌉   .scale meta (U,)   .zero meta (U,) (b ≥ 2 only)
    delta_switch .mask   uint8 ⌈n/8⌉     .sign uint8 ⌈k/8⌉  .scale meta (1,) or (U,) for scale="row"
    low_rank     .u meta (U, r)  .v meta (r, n/U)   (≥2-D)   or   .full meta, original shape (0-D/1-D)
    base         "" (the prefix itself): float32/float16 cast, or own dtype for 0-D/1-D under int8;
                 int8 ≥2-D: .codes int8 (original shape, values −127..127)  .scale float32 (U,)

`from_tensors` rebuilds an encoded tensor from these and its `info()`, and refuses (LibraryError)
any missing or stray part, wrong dtype, shape or packed length, set padding bits, a mask that does
not keep exactly k entries, non-finite or negative metadata, and an info that is not a valid spec.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Union

import torch
from torch import Tensor

from mergetool.core.errors import LibraryError, MergetoolError
from mergetool.merge.codec_kernels import (
    BASE_STORAGES,
    INT8_SCALE_DTYPE,
    META_DTYPES,
    BaseStorage,
    CodecSpec,
    DeltaQuantSpec,
    DeltaSwitchSpec,
    Encoded,
    LowRankDelta,
    LowRankSpec,
    QuantDelta,
    StoredBase,
    SwitchDelta,
    base_stored_bits,
    check_base_storage,
    decode,
    decode_base,
    encode,
    encode_base,
    encode_low_rank,
    encode_quant,
    encode_switch,
    stored_bits,
    switch_k,
    top_k_mask,
    unit_shape,
)
from mergetool.merge.quantize import unpack_bits

__all__ = [
    "BASE_STORAGES", "BaseStorage", "CodecSpec", "DeltaQuantSpec", "DeltaSwitchSpec", "Encoded", "LowRankDelta",
    "LowRankSpec", "QuantDelta", "StoredBase", "SwitchDelta", "base_stored_bits", "check_base_storage", "decode",
    "decode_base", "encode", "encode_base", "encode_low_rank", "encode_quant", "encode_switch", "from_tensors",
    "stored_bits", "stored_layout", "switch_k", "tensor_bytes", "to_tensors", "top_k_mask", "unit_shape",
]

_SUFFIXES = (".codes", ".scale", ".zero", ".mask", ".sign", ".u", ".v", ".full")
_FLOATS = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}
_METAS = {str(d).removeprefix("torch."): d for d in META_DTYPES}


def _parts(encoded: Union[Encoded, StoredBase]) -> dict[str, Tensor]:
    if isinstance(encoded, QuantDelta):
        parts = {".codes": encoded.codes, ".scale": encoded.scale}
        return parts if encoded.zero is None else {**parts, ".zero": encoded.zero}
    if isinstance(encoded, SwitchDelta):
        return {".mask": encoded.mask, ".sign": encoded.sign, ".scale": encoded.scale}
    if isinstance(encoded, LowRankDelta):
        return {".full": encoded.full} if encoded.full is not None else {".u": encoded.u, ".v": encoded.v}
    if isinstance(encoded, StoredBase):
        return {"": encoded.data} if encoded.scale is None else {".codes": encoded.data, ".scale": encoded.scale}
    raise TypeError(f"not an encoded tensor: {type(encoded).__name__}")


def to_tensors(encoded: Union[Encoded, StoredBase], prefix: str) -> dict[str, Tensor]:
    """The tensors to store, keyed f"{prefix}{suffix}" (table in the module docstring)."""
    return {prefix + k: v.contiguous() for k, v in _parts(encoded).items()}


def tensor_bytes(tensors: Mapping[str, Tensor]) -> int:
    """Total tensor-data bytes (what safetensors writes for them, header excluded)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


# ---------------------------------------------------------------- the layout an info implies

_INFO_KEYS = {"delta_quant": {"codec", "shape", "bits", "meta_dtype"},
              "delta_switch": {"codec", "shape", "density", "scale", "meta_dtype"},
              "low_rank": {"codec", "shape", "rank", "meta_dtype"},
              "base": {"codec", "shape", "storage", "dtype"}}


def _layout(info: Mapping) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    shape, kind = _shape(info), info["codec"]
    units, size = unit_shape(shape)
    n = units * size
    if kind == "base":
        storage, dtype = check_base_storage(info["storage"]), _FLOATS[info["dtype"]]
        if storage != "int8" or len(shape) < 2:
            return {"": ({"fp32": torch.float32, "fp16": torch.float16}.get(storage, dtype), shape)}
        return {".codes": (torch.int8, shape), ".scale": (INT8_SCALE_DTYPE, (shape[0],))}
    meta = _meta(info)
    if kind == "delta_quant":
        spec = DeltaQuantSpec(info["bits"])
        parts = {".codes": (torch.uint8, ((n * spec.bits + 7) // 8,)), ".scale": (meta, (units,))}
        return parts if spec.bits == 1 else {**parts, ".zero": (meta, (units,))}
    if kind == "delta_switch":
        spec = DeltaSwitchSpec(info["density"], info["scale"])
        k = switch_k(spec.density, n)
        return {".mask": (torch.uint8, ((n + 7) // 8,)), ".sign": (torch.uint8, ((k + 7) // 8,)),
                ".scale": (meta, (units if spec.scale == "row" else 1,))}
    spec = LowRankSpec(info["rank"])
    if len(shape) < 2:
        return {".full": (meta, shape)}
    rank = min(spec.rank, units, size)
    return {".u": (meta, (units, rank)), ".v": (meta, (rank, size))}


def stored_layout(info: object) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """suffix -> (dtype, shape) of every part `to_tensors` writes for an encoded tensor with this `info()`
    (the table in the module docstring), from the info alone; ValueError saying why for an info that is not
    exactly a valid one (unknown codec, stray or missing keys, a spec the kernels refuse, bad shape or dtype)."""
    if not isinstance(info, Mapping) or not isinstance(info.get("codec"), str) or info["codec"] not in _INFO_KEYS:
        raise ValueError("a codec must be one of " + ", ".join(_INFO_KEYS))
    wanted = _INFO_KEYS[info["codec"]]
    if set(info) != wanted:
        raise ValueError(f"a {info['codec']} codec has exactly the keys {sorted(wanted)}")
    if not isinstance(info["shape"], (list, tuple)):
        raise ValueError("a codec's shape must be a list of dimensions")
    try:
        return _layout(info)
    except MergetoolError as e:
        raise ValueError(e.message) from None
    except (KeyError, TypeError) as e:
        raise ValueError(f"a {info['codec']} codec has an invalid value ({type(e).__name__})") from None


# ---------------------------------------------------------------- reading back

def _fail(prefix: str, what: str) -> LibraryError:
    return LibraryError(f"stored codec tensor {prefix!r} is malformed: {what}", key=prefix,
                        fix="re-export the library; it may be corrupt or tampered with")


def _take(tensors: Mapping[str, Tensor], prefix: str, suffix: str, dtype: torch.dtype, shape: tuple) -> Tensor:
    name = prefix + suffix
    if name not in tensors:
        raise _fail(prefix, f"missing {name!r}")
    t = tensors[name]
    if not isinstance(t, Tensor) or t.dtype != dtype or tuple(t.shape) != tuple(shape):
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
        raise _fail(prefix, f"{name!r} should be {dtype} {tuple(shape)}, got {got}")
    return t


def _packed(tensors, prefix: str, suffix: str, count: int, bits: int = 1) -> Tensor:
    """A packed stream of `count` codes of `bits` bits, with its padding bits clear."""
    n_bits = count * bits
    t = _take(tensors, prefix, suffix, torch.uint8, ((n_bits + 7) // 8,))
    if n_bits % 8 and int(t[-1]) >> (n_bits % 8):
        raise _fail(prefix, f"{prefix + suffix!r} has padding bits set")
    return t


def _metadata(tensors, prefix: str, suffix: str, dtype: torch.dtype, shape: tuple, *, minimum=None) -> Tensor:
    """A float part that must be finite (and ≥ minimum, or > 0 for minimum='positive')."""
    t = _take(tensors, prefix, suffix, dtype, shape)
    if not bool(torch.isfinite(t).all()):
        raise _fail(prefix, f"{prefix + suffix!r} holds inf or NaN")
    if minimum is not None and bool((t <= 0 if minimum == "positive" else t < minimum).any()):
        raise _fail(prefix, f"{prefix + suffix!r} holds out-of-range scales")
    return t


def _no_stray(tensors, prefix: str, expected: set[str], vocabulary=_SUFFIXES) -> None:
    stray = [prefix + s for s in vocabulary if s not in expected and prefix + s in tensors]
    if stray:
        raise _fail(prefix, f"unexpected parts {stray}")


def _shape(info: Mapping) -> tuple[int, ...]:
    shape = tuple(info["shape"])
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise ValueError(f"bad shape {list(shape)}")
    return shape


def _meta(info: Mapping) -> torch.dtype:
    return _METAS[info["meta_dtype"]]


def _read_quant(tensors, prefix: str, info: Mapping) -> QuantDelta:
    shape, meta, spec = _shape(info), _meta(info), DeltaQuantSpec(info["bits"])
    units, size = unit_shape(shape)
    keys = {".codes", ".scale"} | ({".zero"} if spec.bits > 1 else set())
    _no_stray(tensors, prefix, keys)
    codes = _packed(tensors, prefix, ".codes", units * size, spec.bits)
    if spec.bits == 1:
        return QuantDelta(shape, spec, codes, _metadata(tensors, prefix, ".scale", meta, (units,), minimum=0))
    scale = _metadata(tensors, prefix, ".scale", meta, (units,), minimum="positive")
    return QuantDelta(shape, spec, codes, scale, _metadata(tensors, prefix, ".zero", meta, (units,)))


def _read_switch(tensors, prefix: str, info: Mapping) -> SwitchDelta:
    shape, meta, spec = _shape(info), _meta(info), DeltaSwitchSpec(info["density"], info["scale"])
    units, size = unit_shape(shape)
    n = units * size
    k = switch_k(spec.density, n)
    _no_stray(tensors, prefix, {".mask", ".sign", ".scale"})
    mask = _packed(tensors, prefix, ".mask", n)
    kept = int(unpack_bits(mask, 1, n).sum())
    if kept != k:
        raise _fail(prefix, f"the mask keeps {kept} entries, density {spec.density} keeps {k}")
    sign = _packed(tensors, prefix, ".sign", k)
    scales = (units if spec.scale == "row" else 1,)
    return SwitchDelta(shape, spec, mask, sign, _metadata(tensors, prefix, ".scale", meta, scales, minimum=0))


def _read_low_rank(tensors, prefix: str, info: Mapping) -> LowRankDelta:
    shape, meta, spec = _shape(info), _meta(info), LowRankSpec(info["rank"])
    if len(shape) < 2:
        _no_stray(tensors, prefix, {".full"})
        return LowRankDelta(shape, spec, full=_metadata(tensors, prefix, ".full", meta, shape))
    rows, cols = unit_shape(shape)
    rank = min(spec.rank, rows, cols)
    _no_stray(tensors, prefix, {".u", ".v"})
    return LowRankDelta(shape, spec, _metadata(tensors, prefix, ".u", meta, (rows, rank)),
                        _metadata(tensors, prefix, ".v", meta, (rank, cols)))


def _read_base(tensors, prefix: str, info: Mapping) -> StoredBase:
    shape, storage, dtype = _shape(info), check_base_storage(info["storage"]), _FLOATS[info["dtype"]]
    if storage != "int8" or len(shape) < 2:
        _no_stray(tensors, prefix, set(), (".codes", ".scale"))
        stored = {"fp32": torch.float32, "fp16": torch.float16}.get(storage, dtype)
        return StoredBase(shape, storage, dtype, _take(tensors, prefix, "", stored, shape))
    if prefix in tensors:
        raise _fail(prefix, "unexpected plain tensor next to int8 codes")
    codes = _take(tensors, prefix, ".codes", torch.int8, shape)
    if codes.numel() and int(codes.min()) < -127:
        raise _fail(prefix, "int8 codes hold -128")
    scale = _metadata(tensors, prefix, ".scale", INT8_SCALE_DTYPE, (shape[0],), minimum=0)
    return StoredBase(shape, storage, dtype, codes, scale)


_READERS = {"delta_quant": _read_quant, "delta_switch": _read_switch, "low_rank": _read_low_rank, "base": _read_base}


def from_tensors(tensors: Mapping[str, Tensor], prefix: str, info: Mapping) -> Union[Encoded, StoredBase]:
    """Rebuild an encoded tensor (any codec, or the base) from stored tensors and its `info()`;
    every part is checked against the info, and any mismatch raises LibraryError."""
    try:
        reader = _READERS[info["codec"]]
        return reader(tensors, prefix, info)
    except LibraryError:
        raise
    except MergetoolError as e:  # the info names an invalid spec
        raise _fail(prefix, f"bad info ({e.message})") from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise _fail(prefix, f"bad info {info!r} ({type(e).__name__}: {e})") from None
