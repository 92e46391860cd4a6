"""Format v2's parts of an export (issue #13): delta experts' codec tensors and the stored base.

Both are written with `codecs.to_tensors` from the very encodings the search scored (the ExpertStore's
experts and its StoredBaseComponents), and both must take exactly the bits C counts: a delta expert its
closed-form `bits`, a stored base component `StoredBaseComponents.bits` (counted once per component that
some delta expert uses, in every solution using it)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from mergetool.core.errors import LibraryError
from mergetool.library.manifest import StoredTensor
from mergetool.library.safetensors_io import ShardSet
from mergetool.merge.codecs import tensor_bytes, to_tensors
from mergetool.merge.delta_experts import StoredBaseComponents

BUG = "this is a bug in mergetool's cost accounting; please report it"


def _entry(parts: dict, idx: int, prefix: str, encoded, dtype: str) -> dict:
    return dict(shard=idx, prefix=prefix, shape=list(encoded.shape), dtype=dtype, bits=8 * tensor_bytes(parts),
                granularity="codec", keys=[k[len(prefix):] for k in parts], codec=encoded.info())


def delta_entries(e, eid: str, shards: ShardSet) -> tuple[dict[str, dict], int]:
    """A delta expert's tensors into the expert shards: (manifest entries with the shard index, bytes written)."""
    tensors, written = {}, 0
    for name, enc in e.delta.items():
        prefix = f"{eid}/{name}"
        parts = to_tensors(enc, prefix)
        idx = shards.add_group(parts)
        written += tensor_bytes(parts)
        tensors[name] = _entry(parts, idx, prefix, enc, _dt(e.dtypes[name]))
    return tensors, written


def write_stored_base(stored_base: StoredBaseComponents, components: Iterable[int], folder: Path,
                      shard_size: int) -> tuple[dict[str, StoredTensor], dict[int, int]]:
    """The base components the delta experts need, as stored (`base-*.safetensors`): their manifest entries
    and their bits per component (checked against the bytes written)."""
    shards = ShardSet(folder, "base", shard_size)
    entries, bits = {}, {}
    for l in sorted(set(components)):
        written = 0
        for name, sb in stored_base.stored(l).items():
            parts = to_tensors(sb, name)
            idx = shards.add_group(parts)
            written += tensor_bytes(parts)
            entries[name] = _entry(parts, idx, name, sb, _dt(sb.dtype))
        bits[l] = stored_base.bits(l)
        if 8 * written != bits[l]:
            raise LibraryError(f"stored base component {l}: {written} bytes written, {bits[l] / 8} counted",
                               key="stored_base", fix=BUG)
    names = shards.close()
    return {n: StoredTensor(**dict(e, shard=names[e["shard"]])) for n, e in entries.items()}, bits


def _dt(dtype) -> str:
    return str(dtype).removeprefix("torch.")
