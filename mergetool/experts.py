"""Experts: θ̂_l^n = Q(F(θ_pre^l, Θ_l^n)) (Eq. 4), built once per (component, members) and cached.

The search and the library export both call `ExpertStore.expert`, so the search scores exactly the
experts that export writes. A task's chain of experts plus its own tensors gives its state dict.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from mergetool.cost import mask_bytes, tensor_data_bits
from mergetool.errors import MergetoolError
from mergetool.merging import merge_group, resolve_method
from mergetool.models import ModelSource
from mergetool.plan import Plan
from mergetool.quantize import QuantizedTensor, QuantSpec, dequantize, quantize
from mergetool.recipe.schema import Recipe


@dataclass
class Expert:
    component: int
    members: tuple[int, ...]
    tensors: dict[str, QuantizedTensor]
    bits: int  # data bits on disk (Eq. 8 numerator, exact with packing), row masks excluded
    mask_bytes: int
    _dense: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def dense(self) -> dict[str, torch.Tensor]:
        """Dequantised tensors (computed once)."""
        if not self._dense:
            self._dense = {n: dequantize(q) for n, q in self.tensors.items()}
        return self._dense

    @property
    def nbytes(self) -> int:
        packed = sum(_qt_bytes(q) for q in self.tensors.values())
        return packed + sum(t.numel() * t.element_size() for t in self._dense.values())


def _qt_bytes(q: QuantizedTensor) -> int:
    return sum(t.numel() * t.element_size() for t in (q.packed, q.scale, q.zero, q.full, q.row_mask)
               if t is not None)


class ExpertStore:
    """Builds experts from lazily read models; an LRU cache bounded by `cache_bytes` holds them."""

    def __init__(self, recipe: Recipe, plan: Plan, base: ModelSource, tasks: Sequence[ModelSource], *,
                 quantization: Optional[QuantSpec] = None, cache_bytes: int = 2 << 30):
        if plan.adapter:
            raise MergetoolError("merging PEFT adapters is not supported by the expert builder yet",
                                 key="models", fix="use full fine-tunes for now")
        self.recipe, self.plan, self.base, self.tasks = recipe, plan, base, list(tasks)
        q = recipe.quantization
        self.spec = quantization or QuantSpec(bits=q.bits if q.enabled else 32, granularity=q.granularity,
                                              mode=q.mode)
        self.method = resolve_method(recipe.merge.method)
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[tuple, Expert] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    # --- experts --------------------------------------------------------------------------------
    def expert(self, component: int, members: Sequence[int]) -> Expert:
        key = (component, tuple(sorted(members)))
        with self._lock:
            if key in self._cache:
                self.hits += 1
                self._cache.move_to_end(key)
                return self._cache[key]
            self.misses += 1
        expert = self._build(*key)
        with self._lock:
            self._cache[key] = expert
            self._evict()
        return expert

    def _evict(self) -> None:
        total = sum(e.nbytes for e in self._cache.values())
        while len(self._cache) > 1 and total > self.cache_bytes:
            _, old = self._cache.popitem(last=False)
            total -= old.nbytes

    def _params_for(self, members: tuple[int, ...]) -> dict:
        params = dict(self.recipe.merge.parameters)
        if self.method == "task_arithmetic":
            params.setdefault("normalize", False)  # Eq. 5: λ scales the plain sum of task vectors
        weights = [self.recipe.models[t].parameters.get("weight", 1.0) for t in members]
        params["weight"] = weights
        for name, value in list(params.items()):
            if isinstance(value, (list, tuple)) and len(value) == self.plan.T and name != "weight":
                params[name] = [value[t] for t in members]  # per-model lists are cut to the group
        return params

    def _build(self, component: int, members: tuple[int, ...]) -> Expert:
        comp = self.plan.components[component]
        params = self._params_for(members)
        out: dict[str, QuantizedTensor] = {}
        for name in comp.tensors:
            base_t = self.base.get(name)
            sources = [self.tasks[t].get(name) for t in members]
            merged = merge_group(base_t, sources, self.method, params,
                                 seed_key=f"{comp.name}|{','.join(map(str, members))}/{name}")
            merged = merged.to(base_t.dtype)
            out[name] = quantize(merged, self.spec, sources=sources, meta_dtype=base_t.dtype)
        bits = sum(tensor_data_bits(q, self.plan.base_bits) for q in out.values())
        return Expert(component, members, out, bits, sum(mask_bytes(q) for q in out.values()))

    # --- chains ---------------------------------------------------------------------------------
    def storage_cost(self, G) -> float:
        """C(G), Eq. 8, exact to the bytes export writes (experts only; heads are reported apart)."""
        from mergetool.grouping import experts

        return sum(self.expert(l, m).bits for l, m in experts(G)) / (self.plan.base_bits * self.plan.d)

    def task_state(self, G, task: int, components: Optional[Sequence[int]] = None) -> dict[str, torch.Tensor]:
        """Normalised-name state dict of `task`'s chain (dequantised experts) for some components."""
        from mergetool.grouping import members as group_members

        state: dict[str, torch.Tensor] = {}
        for l in components if components is not None else range(self.plan.L):
            state.update(self.expert(l, group_members(G, task, l)).dense())
        return state

    def own_tensors(self, task: int) -> dict[str, torch.Tensor]:
        """The task's task-specific tensors and buffers, never merged."""
        src = self.tasks[task]
        names = list(self.plan.task_specific[self.plan.tasks[task]]) + list(self.plan.buffers)
        return {n: src.get(n) for n in names if n in src}

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()

    def stats(self) -> dict:
        return {"expert_hits": self.hits, "expert_misses": self.misses, "experts_cached": len(self._cache)}
