"""Sanity of the manifest's tensors: its structure, and every stored tensor against its shard's header.

`check_structure`: every expert belongs to a component in range, every solution gives every task a
chain whose l-th expert is of component l, full fine-tune experts hold the component's tensors with
its shapes, and adapter slots name stored factors or vectors whose shapes fit their frozen base weight.

`check_stored`: the header holds every part the manifest lists with the dtype and shape it implies:
the tensor itself in the manifest's dtype, or for a quantised tensor uint8 codes of the right size,
floating scales and zero points, a uint8 row mask and full-precision rows that add up to its units.
Weights (experts, the frozen base, the stored base) must be floating point. Format v2's codec entries
(delta experts, the stored base) are checked by sanity_codecs. Messages never quote tensor names.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Optional

from mergetool.core.errors import LibraryError
from mergetool.library.manifest import MANIFEST, Manifest, StoredExpert, StoredTensor
from mergetool.library.safetensors_io import DTYPE_NAMES
from mergetool.library.sanity_codecs import check_codec_structure, codec_problem

Fail = Callable[..., LibraryError]
CODES = {str(d).removeprefix("torch."): name for d, name in DTYPE_NAMES.items()}  # "float32" -> "F32"
FLOATING = {name for d, name in DTYPE_NAMES.items() if d.is_floating_point}
QUANT_PARTS = {".q", ".scale", ".zero", ".mask", ".full"}


def is_floating(dtype: str) -> bool:
    """A manifest dtype ("float32", "int64", ...) that is floating point."""
    return CODES.get(dtype) in FLOATING


def stored_entries(m: Manifest) -> Iterator[tuple[str, StoredTensor, bool]]:
    """(where, stored tensor, must be floating) for every tensor the manifest stores."""
    for e in m.experts:
        for j, st in enumerate(e.tensors.values()):
            yield f"tensor {j + 1} of expert {e.id}", st, True
    for t in m.tasks:
        for j, st in enumerate(t.heads.values()):
            yield f"head tensor {j + 1} of task {t.name!r}", st, False
    for j, st in enumerate(m.buffers.values()):
        yield f"buffer {j + 1}", st, False
    for j, st in enumerate(m.adapter.tensors.values() if m.adapter else ()):
        yield f"frozen base tensor {j + 1}", st, True
    for j, st in enumerate(m.stored_base.values()):
        yield f"stored base tensor {j + 1}", st, True


def check_stored(m: Manifest, headers: dict[str, dict], fail: Fail) -> None:
    for where, st, weight in stored_entries(m):
        header = headers.get(st.shard)
        if header is None:
            raise fail(f"{where} is stored in {st.shard}, which is not a safetensors file", MANIFEST)
        code = CODES.get(st.dtype)
        if code is None or any(d < 0 for d in st.shape):
            raise fail(f"{where} has an unknown dtype or a negative dimension", MANIFEST)
        if weight and code not in FLOATING:
            raise fail(f"{where} is not floating point; weights must be", MANIFEST)
        problem = codec_problem(st, header) if st.codec is not None else _layout_problem(st, code, header)
        if problem:
            raise fail(f"{where} does not match its shard's header: {problem}", st.shard)


def _numel(entry: dict) -> int:
    return math.prod(entry["shape"])


def _layout_problem(st: StoredTensor, code: str, header: dict) -> Optional[str]:
    """What is wrong with the header entries of one stored tensor, or None."""
    if len(set(st.keys)) != len(st.keys):
        return "its parts are listed twice"
    parts = {k: header.get(st.prefix + k) if st.prefix + k != "__metadata__" else None for k in st.keys}
    if any(not isinstance(p, dict) for p in parts.values()):
        return "a stored part is missing"
    if set(parts) == {""}:
        ok = parts[""]["dtype"] == code and parts[""]["shape"] == list(st.shape)
        return None if ok else "the stored dtype or shape differs from the manifest's"
    if not {".q", ".scale", ".zero"} <= set(parts) <= QUANT_PARTS:
        return "unexpected stored parts"
    if st.granularity not in ("per_tensor", "per_channel") or not 2 <= st.bits <= 8 or code not in FLOATING:
        return "a quantised tensor needs 2..8 bits, a known granularity and a floating dtype"
    return _quantised_problem(st, code, parts)


def _quantised_problem(st: StoredTensor, code: str, parts: dict[str, dict]) -> Optional[str]:
    per_channel = st.granularity == "per_channel" and len(st.shape) >= 1
    n_units = st.shape[0] if per_channel else 1
    numel = math.prod(st.shape)
    if n_units == 0 or numel % n_units:
        return "its shape has no units to quantise"
    unit = numel // n_units
    q, scale, zero, full, mask = (parts.get(k) for k in (".q", ".scale", ".zero", ".full", ".mask"))
    if q["dtype"] != "U8" or (mask is not None and mask["dtype"] != "U8"):
        return "quantised codes and row masks must be stored as U8"
    if scale["dtype"] not in FLOATING or zero["dtype"] not in FLOATING:
        return "scales and zero points must be floating point"
    if full is not None and full["dtype"] != code:
        return "the full-precision rows' dtype differs from the manifest's"
    n_q = _numel(scale)
    n_full_values = _numel(full) if full is not None else 0
    if _numel(zero) != n_q or n_full_values % unit or n_q + n_full_values // unit != n_units:
        return "quantised and full-precision rows do not add up to the tensor"
    if mask is None and full is not None:
        return "full-precision rows without a row mask"
    if mask is not None and _numel(mask) != (n_units + 7) // 8:
        return "the row mask has the wrong size"
    if _numel(q) != (n_q * unit * st.bits + 7) // 8:
        return "the packed codes have the wrong size"
    return None


def check_structure(m: Manifest, fail: Fail) -> None:
    """Components, chains and adapter slots of the manifest fit together."""
    names = {t.name for t in m.tasks}
    n = len(m.components)
    for e in m.experts:
        if not 0 <= e.component < n:
            raise fail(f"expert {e.id} names a component that does not exist", MANIFEST)
        if not set(e.group_members) <= names:
            raise fail(f"expert {e.id} names a task that is not in the library", MANIFEST)
        if e.adapter:
            _check_slots(m, e, fail)
        elif m.adapter is None:
            shapes = m.components[e.component].tensors
            if any(list(st.shape) != shapes.get(k) for k, st in e.tensors.items()):
                raise fail(f"expert {e.id}'s tensors are not its component's (names or shapes differ)", MANIFEST)
    check_codec_structure(m, fail)
    experts = m.expert_map()
    if len(experts) != len(m.experts) or len(names) != len(m.tasks):
        raise fail("the manifest lists an expert or a task twice", MANIFEST)
    for i, s in enumerate(m.solutions):
        if set(s.chains) != names:
            raise fail(f"solution {i + 1} does not give every task of the library a chain", MANIFEST)
        for task, chain in s.chains.items():
            if any(experts[eid].component != l for l, eid in enumerate(chain)):
                raise fail(f"the chain of task {task!r} (solution {i + 1}) has an expert of the wrong component",
                           MANIFEST)
    if m.chains != m.solutions[m.default_solution].chains:
        raise fail("the manifest's chains are not those of its default solution", MANIFEST)


def _check_slots(m: Manifest, e: StoredExpert, fail: Fail) -> None:
    """Adapter slots: stored factors or vectors whose shapes fit their frozen base weight."""
    frozen = m.adapter.tensors if m.adapter else {}
    for i, (w, slot) in enumerate(e.adapter.items()):
        base = frozen.get(w)
        where = f"adapter slot {i + 1} of expert {e.id}"
        if base is None:
            raise fail(f"{where} scales a weight the library does not store", MANIFEST)
        shape = list(base.shape)
        if slot.a is not None or slot.b is not None:
            a, b = e.tensors.get(slot.a or ""), e.tensors.get(slot.b or "")
            ok = (a is not None and b is not None and slot.vector is None and math.isfinite(slot.scaling)
                  and len(a.shape) == len(b.shape) == len(shape) == 2 and b.shape[1] == a.shape[0]
                  and [b.shape[0], a.shape[1]] == shape)
        else:
            v = e.tensors.get(slot.vector or "")
            ok = (v is not None and slot.dim in (0, 1) and slot.dim < len(shape)
                  and math.prod(v.shape) == shape[slot.dim])
        if not ok:
            raise fail(f"{where} does not fit its frozen base weight (missing factors or shapes that differ)",
                       MANIFEST)

