"""Sanity of format v2's delta-coded experts and stored base (issue #13), against the manifest and the headers.

`check_codec_structure`: a delta expert (codec other than `full`) stores only codec entries of its codec's
kind, no row masks or adapter slots, `data_bits` equal to its tensors' bits, and every tensor it holds has a
stored base tensor of the same shape; the stored base holds exactly the tensors of the components some delta
expert needs, each a `base` codec at the manifest's `base_storage`, in its own (floating) dtype.

`codec_problem`: one codec entry against its shard's header: exactly the parts its codec's info implies
(mergetool.merge.codecs.stored_layout: the one place that knows them), each with that dtype and shape (so
that byte length: the header check ties shapes to data offsets), and `bits` = 8 × those bytes.
Messages never quote tensor names.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

from mergetool.core.errors import LibraryError
from mergetool.library.manifest import MANIFEST, Manifest, StoredTensor
from mergetool.library.safetensors_io import DTYPE_NAMES, DTYPE_SIZES
from mergetool.merge.codecs import stored_layout

Fail = Callable[..., LibraryError]
DELTA_KINDS = ("delta_quant", "delta_switch", "low_rank")


def codec_problem(st: StoredTensor, header: dict) -> Optional[str]:
    """What is wrong with the header entries of one codec entry, or None."""
    try:
        layout = stored_layout(st.codec)
    except ValueError:
        return "its codec metadata is not valid"
    if list(st.codec["shape"]) != list(st.shape):
        return "its codec's shape differs from the manifest's"
    if len(set(st.keys)) != len(st.keys) or set(st.keys) != set(layout):
        return "its parts are not those its codec stores"
    total = 0
    for suffix, (dtype, shape) in layout.items():
        part = header.get(st.prefix + suffix) if st.prefix + suffix != "__metadata__" else None
        if not isinstance(part, dict):
            return "a part its codec stores is missing"
        if part["dtype"] != DTYPE_NAMES[dtype] or part["shape"] != list(shape):
            return "a part's dtype or shape differs from what its codec implies"
        total += math.prod(shape) * DTYPE_SIZES[part["dtype"]]
    if st.bits != 8 * total:
        return "its bits differ from the bytes its codec stores"
    return None


def check_codec_structure(m: Manifest, fail: Fail) -> None:
    """Delta experts and the stored base fit together (see the module docstring)."""
    others = [st for t in m.tasks for st in t.heads.values()] + list(m.buffers.values())
    if any(st.codec is not None for st in others + (list(m.adapter.tensors.values()) if m.adapter else [])):
        raise fail("only delta experts and the stored base may hold codec-stored tensors", MANIFEST)
    needed: set[str] = set()
    for e in m.experts:
        coded = [st.codec is not None for st in e.tensors.values()]
        if e.codec == "full":
            if any(coded):
                raise fail(f"expert {e.id} is a full expert with codec-stored tensors", MANIFEST)
            continue
        kind = e.codec.split(":")[0]
        if kind not in DELTA_KINDS or not all(coded) or e.adapter or e.mask_bytes:
            raise fail(f"expert {e.id}'s codec does not fit its tensors (a delta codec, codec-stored tensors, "
                       "no adapter slots or row masks)", MANIFEST)
        if any(st.codec["codec"] != kind for st in e.tensors.values()):
            raise fail(f"expert {e.id} stores a tensor with another codec than its own", MANIFEST)
        if e.data_bits != sum(st.bits for st in e.tensors.values()):
            raise fail(f"expert {e.id}'s data_bits differ from its tensors' bits", MANIFEST)
        needed |= set(m.components[e.component].tensors)
        for st_name, st in e.tensors.items():
            base = m.stored_base.get(st_name)
            if base is None or base.shape != st.shape:
                raise fail(f"expert {e.id} has a delta tensor without a stored base tensor of its shape", MANIFEST)
    if set(m.stored_base) != needed:
        raise fail("the stored base does not hold exactly the components the delta experts need", MANIFEST)
    if needed and m.base_storage is None:
        raise fail("the manifest stores a base for delta experts but names no base_storage", MANIFEST)
    shapes = {n: shape for c in m.components for n, shape in c.tensors.items()}
    for j, (name, st) in enumerate(m.stored_base.items()):
        c = st.codec
        if (c is None or c["codec"] != "base" or c["storage"] != m.base_storage or c["dtype"] != st.dtype
                or list(st.shape) != shapes.get(name)):
            raise fail(f"stored base tensor {j + 1} is not a base codec at the manifest's base_storage and dtype, "
                       "of its component's shape", MANIFEST)
