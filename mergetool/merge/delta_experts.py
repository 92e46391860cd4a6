"""Delta experts (issue #13): an expert stored as a codec of its delta from the stored base.

For a component whose codec is not `full`, the library stores the base component once, at the recipe's
`base_storage` precision (fp32, fp16 or int8 per row), and each expert of that component as
encode(θ_expert − decode(stored base)): the delta is taken from the base *as stored and decoded*, so the
base's error and the delta's error do not compound, and decode(stored base) + decode(delta) is exactly what
the runtime assembles. θ_expert is the group's merge F (a singleton's own weights), in the base dtype.

Costs are closed-form (`codec_kernels.stored_bits`, `base_stored_bits`): from shapes, bits, densities and
ranks only, with nothing merged or built."""

from __future__ import annotations

import threading
from typing import Mapping, Optional

import torch

from mergetool.merge.codec_kernels import (
    CodecSpec,
    DeltaQuantSpec,
    DeltaSwitchSpec,
    Encoded,
    LowRankSpec,
    StoredBase,
    base_stored_bits,
    decode,
    decode_base,
    encode,
    encode_base,
    stored_bits,
)
from mergetool.merge.quantize import bits_of_dtype
from mergetool.models.source import ModelSource
from mergetool.recipe.schema import CodecChoice


def codec_spec(choice: CodecChoice) -> Optional[CodecSpec]:
    """The kernel spec of a menu entry; None for `full` (the paper's quantiser, quantize.py)."""
    if choice.kind == "delta_quant":
        return DeltaQuantSpec(bits=choice.bits)
    if choice.kind == "delta_switch":
        return DeltaSwitchSpec(density=choice.density, scale=choice.scale)
    if choice.kind == "low_rank":
        return LowRankSpec(rank=choice.rank)
    return None


class StoredBaseComponents:
    """The base's components as a library stores them for delta experts: encoded once per component,
    decoded once, kept (a component is at most one layer's worth of tensors)."""

    def __init__(self, base: ModelSource, storage: str, components: list):
        self.base, self.storage, self.components = base, storage, components
        self._stored: dict[int, dict[str, StoredBase]] = {}
        self._decoded: dict[int, dict[str, torch.Tensor]] = {}
        self._lock = threading.Lock()

    def stored(self, component: int) -> dict[str, StoredBase]:
        with self._lock:
            if component not in self._stored:
                self._stored[component] = {n: encode_base(self.base.get(n), self.storage)
                                           for n in self.components[component].tensors}
            return self._stored[component]

    def decoded(self, component: int) -> dict[str, torch.Tensor]:
        """decode(stored base) per tensor, in float32 (the reference every delta is taken from)."""
        stored = self.stored(component)
        with self._lock:
            if component not in self._decoded:
                self._decoded[component] = {n: decode_base(s) for n, s in stored.items()}
            return self._decoded[component]

    def bits(self, component: int) -> int:
        """Stored bits of the base component, closed form (shapes and dtypes only)."""
        return sum(base_stored_bits(self.base.meta(n).shape, self.storage, bits_of_dtype(self.base.meta(n).dtype))
                   for n in self.components[component].tensors)


def delta_bits(spec: CodecSpec, shapes: Mapping[str, tuple], meta_bits: int) -> int:
    """Stored bits of one delta expert: the sum over its tensors, closed form."""
    return sum(stored_bits(spec, shape, meta_bits) for shape in shapes.values())


def encode_delta(merged: torch.Tensor, reference: torch.Tensor, spec: CodecSpec) -> Encoded:
    """The codec of (merged − reference), its metadata in the merged tensor's dtype (b⁺)."""
    return encode(merged.float() - reference, spec, meta_dtype=merged.dtype)


def dense_from_delta(reference: torch.Tensor, encoded: Encoded, dtype: torch.dtype) -> torch.Tensor:
    """decode(stored base) + decode(delta), in the base dtype: the weights the runtime assembles."""
    return (reference + decode(encoded)).to(dtype)
