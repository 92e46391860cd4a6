"""Experts: θ̂_l^n = Q(F(θ_pre^l, Θ_l^n)) (Eq. 4), built once per (component, members) and cached.

The search and the library export both call `ExpertStore.expert`, so the search scores exactly the
experts that export writes. A task's chain of experts plus its own tensors gives its state dict.
Tensors are streamed from the models (`LazyTensor`), so building an expert holds about the
expert plus a few chunks, never whole models. For LoRA task models (mergetool.merge.adapters.lora) an expert
stores factors B', A' and `dense()` gives the effective weights W0 + ΔW under the base's names;
for IA3 task models (mergetool.merge.adapters.ia3) it stores the merged scaling vectors and `dense()` gives W0
scaled along the dim each vector scales (and the bias, for output scaling).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from mergetool.core.errors import MergetoolError
from mergetool.core.grouping import experts, set_partitions
from mergetool.core.grouping import members as group_members
from mergetool.core.storage import storage_cost
from mergetool.merge.adapters.ia3 import Ia3Slot, ia3_dense, ia3_targets, merge_ia3, scaled_dim
from mergetool.merge.adapters.lora import LoraPair, lora_dense, lora_pairs, merge_lora, scaling_for
from mergetool.merge.codecs import Encoded, tensor_bytes, to_tensors
from mergetool.merge.cost import counted_bits, mask_bytes, tensor_data_bits
from mergetool.merge.delta_experts import StoredBaseComponents, codec_spec, delta_bits, dense_from_delta, encode_delta
from mergetool.merge.methods import merge_group, resolve_method
from mergetool.merge.quantize import QuantizedTensor, QuantSpec, dequantize, quantize
from mergetool.models.plan import Plan
from mergetool.models.source import ModelSource
from mergetool.models.streaming import LazyTensor, unit_ranges
from mergetool.recipe.schema import Recipe


@dataclass
class Expert:
    component: int
    members: tuple[int, ...]
    tensors: dict[str, QuantizedTensor]
    bits: int  # data bits on disk (Eq. 8 numerator, exact with packing), row masks excluded
    mask_bytes: int
    # LoRA experts: base weight name -> (A name, B name, scaling); dense() gives W0 + scaling·B@A
    lora: dict[str, LoraPair] = field(default_factory=dict)
    # IA3 experts: base weight name -> (vector name, the dim of W0 it scales)
    ia3: dict[str, Ia3Slot] = field(default_factory=dict)
    base: Optional[ModelSource] = field(default=None, repr=False)
    # delta experts (codec other than `full`): name -> codec of (θ − decoded stored base), and that reference
    codec: str = "full"
    delta: dict[str, Encoded] = field(default_factory=dict, repr=False)
    reference: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    dtypes: dict[str, torch.dtype] = field(default_factory=dict, repr=False)
    _dense: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def dense(self) -> dict[str, torch.Tensor]:
        """Dequantised tensors (computed once). For LoRA experts: the effective weights W0 + ΔW
        under the base model's tensor names, ready to copy into a model built from the base."""
        if not self._dense and self.delta:
            self._dense = {n: dense_from_delta(self.reference[n], e, self.dtypes[n]) for n, e in self.delta.items()}
        if not self._dense:
            stored = {n: dequantize(q) for n, q in self.tensors.items()}
            if self.ia3:
                self._dense = ia3_dense(self.ia3, stored, self._base_get)
            elif not self.lora:
                self._dense = stored
            else:
                for target, (a, b, scaling) in self.lora.items():
                    self._dense[target] = lora_dense(self.base.get(target), stored[a], stored[b], scaling)
        return self._dense

    def _base_get(self, name: str) -> Optional[torch.Tensor]:
        return self.base.get(name) if name in self.base else None

    @property
    def nbytes(self) -> int:
        packed = sum(_qt_bytes(q) for q in self.tensors.values())
        packed += sum(tensor_bytes(to_tensors(e, "")) for e in self.delta.values())
        return packed + sum(t.numel() * t.element_size() for t in self._dense.values())


def _qt_bytes(q: QuantizedTensor) -> int:
    return sum(t.numel() * t.element_size() for t in (q.packed, q.scale, q.zero, q.full, q.row_mask)
               if t is not None)


class ExpertStore:
    """Builds experts from lazily read models; an LRU cache bounded by `cache_bytes` holds them."""
    def __init__(self, recipe: Recipe, plan: Plan, base: ModelSource, tasks: Sequence[ModelSource], *,
                 quantization: Optional[QuantSpec] = None, cache_bytes: int = 2 << 30, full_only: bool = False):
        if plan.adapter and plan.adapter.get("type") not in ("LORA", "IA3"):
            raise MergetoolError(f"merging PEFT {plan.adapter.get('type')} adapters is not supported",
                                 key="models", fix="use LoRA or IA3 adapters, or full fine-tunes")
        self.recipe, self.plan, self.base, self.tasks = recipe, plan, base, list(tasks)
        q = recipe.quantization
        self.spec = quantization or QuantSpec(bits=q.bits if q.enabled else 32, granularity=q.granularity,
                                              mode=q.mode)
        self.method = resolve_method(recipe.merge.method)
        # the recipe's codec menu (None: `full`); full_only: the paper's Q alone (fp32 references)
        self.menu = [None] if full_only else [codec_spec(c) for c in recipe.codecs]
        self.codec_names = ["full"] if full_only else [c.label for c in recipe.codecs]
        self.stored_base = StoredBaseComponents(base, recipe.base_storage, plan.components)
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[tuple, Expert] = OrderedDict()
        self._lock = threading.Lock()
        self._bits: dict[tuple, int] = {}  # stored bits per (component, members, codec): never evicted
        self.count_cost = True  # False (ablation): C builds and holds every expert, as before exact counting
        self.hits = self.misses = self.counted = 0

    # --- experts --------------------------------------------------------------------------------
    def expert(self, component: int, members: Sequence[int], codec: int = 0) -> Expert:
        """The expert of `members` for `component`, stored with the menu's codec number `codec`."""
        key = (component, tuple(sorted(members)), codec)
        with self._lock:
            if key in self._cache:
                self.hits += 1
                self._cache.move_to_end(key)
                return self._cache[key]
            self.misses += 1
        expert = self._build(*key)
        with self._lock:
            self._bits[key] = expert.bits
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

    def _build(self, component: int, members: tuple[int, ...], codec: int = 0) -> Expert:
        if self.menu[codec] is not None:
            return self._build_delta(component, members, codec)
        if self.plan.adapter:
            if self.plan.adapter["type"] == "IA3":
                return self._build_ia3(component, members)
            return self._build_lora(component, members)
        out = {name: quantize(merged, self.spec, meta_dtype=merged.dtype, source_range=ranges)
               for name, merged, ranges in self._merged(component, members)}
        return self._expert(component, members, out)

    def _merged(self, component: int, members: tuple[int, ...]):
        """(name, F over the members in the base dtype, the members' mean unit ranges) per tensor."""
        comp = self.plan.components[component]
        params = self._params_for(members)
        for name in comp.tensors:
            dtype = self.base.meta(name).dtype
            sources = [LazyTensor(self.tasks[t], name) for t in members]  # streamed, never mapped
            base_t = LazyTensor(self.base, name) if len(members) > 1 else None
            merged = merge_group(base_t, sources, self.method, params,
                                 seed_key=f"{comp.name}|{','.join(map(str, members))}/{name}").to(dtype)
            yield name, merged, self._range(merged, sources)

    def _build_delta(self, component: int, members: tuple[int, ...], codec: int) -> Expert:
        """θ − decode(stored base) per tensor, stored with the menu's delta codec (delta_experts.py)."""
        spec, reference = self.menu[codec], self.stored_base.decoded(component)
        delta, dtypes = {}, {}
        for name, merged, _ in self._merged(component, members):
            delta[name], dtypes[name] = encode_delta(merged, reference[name], spec), merged.dtype
        bits = delta_bits(spec, {n: e.shape for n, e in delta.items()}, self.plan.base_bits)
        return Expert(component, members, {}, bits, 0, codec=self.codec_names[codec], delta=delta,
                      reference={n: reference[n] for n in delta}, dtypes=dtypes)

    def expert_bits(self, component: int, members: Sequence[int], codec: int = 0) -> int:
        """The stored bits of expert (component, members) under the menu's codec, exactly as built, without
        building it: delta codecs in closed form from shapes alone; `full` from the merge and Q's decision
        only (a singleton is not even merged). Kept for good (a few ints)."""
        key = (component, tuple(sorted(members)), codec)
        if key not in self._bits and self.menu[codec] is not None:
            shapes = {n: tuple(self.base.meta(n).shape) for n in self.plan.components[component].tensors}
            self._bits[key] = delta_bits(self.menu[codec], shapes, self.plan.base_bits)
            self.counted += 1
        if key not in self._bits:
            with self._lock:
                held = self._cache.get(key)
            if held is not None or self.plan.adapter or not self.count_cost:  # adapters: the SVD decides the shapes
                self._bits[key] = (held or self.expert(*key)).bits
            else:
                self._bits[key] = sum(counted_bits(merged, self.spec, base_bits=self.plan.base_bits,
                                                   source_range=ranges)
                                      for _, merged, ranges in self._merged(*key[:2]))
                self.counted += 1
        return self._bits[key]

    def _range(self, merged: torch.Tensor, sources) -> Optional[torch.Tensor]:
        """Mean source range per unit for the conditional rule; None for a singleton (own source)."""
        if len(sources) < 2 or not self.spec.enabled or self.spec.mode != "conditional":
            return None
        if not merged.is_floating_point() or merged.numel() == 0:
            return None
        per_channel = self.spec.granularity == "per_channel" and merged.ndim >= 2
        return torch.stack([unit_ranges(s, per_channel) for s in sources]).mean(dim=0)

    def _expert(self, component, members, out, **extra) -> Expert:
        bits = sum(tensor_data_bits(q, self.plan.base_bits) for q in out.values())
        return Expert(component, members, out, bits, sum(mask_bytes(q) for q in out.values()), **extra)

    def _build_lora(self, component: int, members: tuple[int, ...]) -> Expert:
        """A LoRA group: merge ΔW_t = s_t·B_t@A_t with F, re-factorise by truncated SVD at the members'
        largest rank, quantise B', A'. A singleton keeps the task's own B, A (and its scaling)."""
        comp = self.plan.components[component]
        params = self._params_for(members)
        out: dict[str, QuantizedTensor] = {}
        lora: dict[str, LoraPair] = {}
        for target, (a_name, b_name) in lora_pairs(comp.tensors).items():
            dtype = self.base.meta(target).dtype  # b⁺: factors are stored in the base's width
            A = [self.tasks[t].get(a_name) for t in members]
            B = [self.tasks[t].get(b_name) for t in members]
            scales = [scaling_for(self.tasks[t], target, A_t.shape[0]) for t, A_t in zip(members, A)]
            if len(members) == 1:
                out[a_name] = quantize(A[0].to(dtype), self.spec, meta_dtype=dtype)
                out[b_name] = quantize(B[0].to(dtype), self.spec, meta_dtype=dtype)
                lora[target] = (a_name, b_name, scales[0])
                continue
            key = f"{comp.name}|{','.join(map(str, members))}/{target}"
            (B2, A2), (src_B, src_A) = merge_lora(A, B, scales, self.method, params, seed_key=key)
            B2, A2 = B2.to(dtype), A2.to(dtype)
            out[b_name] = quantize(B2, self.spec, sources=[t.to(dtype) for t in src_B], meta_dtype=dtype)
            out[a_name] = quantize(A2, self.spec, sources=[t.to(dtype) for t in src_A], meta_dtype=dtype)
            lora[target] = (a_name, b_name, 1.0)  # the merge's ΔW is B'@A' itself
        return self._expert(component, members, out, lora=lora, base=self.base)

    def _build_ia3(self, component: int, members: tuple[int, ...]) -> Expert:
        """An IA3 group: F over the members' vectors with a base of ones (mergetool.merge.adapters.ia3), stored flat
        in the base's width and quantised against the members' vectors. A singleton keeps its own."""
        comp = self.plan.components[component]
        params = self._params_for(members)
        fifo = bool(getattr(self.tasks[members[0]].peft_config, "fan_in_fan_out", False))
        out: dict[str, QuantizedTensor] = {}
        slots: dict[str, Ia3Slot] = {}
        for target, vec in ia3_targets(comp.tensors).items():
            dtype = self.base.meta(target).dtype
            vectors = [self.tasks[t].get(vec) for t in members]
            slots[target] = (vec, scaled_dim(vectors[0].shape, self.base.meta(target).shape, fifo))
            flat = [v.reshape(-1).to(dtype) for v in vectors]
            if len(members) == 1:
                out[vec] = quantize(flat[0], self.spec, meta_dtype=dtype)
                continue
            key = f"{comp.name}|{','.join(map(str, members))}/{vec}"
            merged = merge_ia3(vectors, self.method, params, seed_key=key).to(dtype)
            out[vec] = quantize(merged, self.spec, sources=flat, meta_dtype=dtype)
        return self._expert(component, members, out, ia3=slots, base=self.base)

    # --- chains ---------------------------------------------------------------------------------
    def storage_cost(self, G, codecs: Optional[Sequence[int]] = None) -> float:
        """C(G, codecs), Eq. 8, exact to the bytes export writes (experts only; heads are reported apart).
        `codecs` gives the menu's codec per component (default: the first). A component under a delta codec
        adds its stored base once. For adapter zoos the frozen base is one shared component stored once: it
        adds 1 (as in `Plan.individual_cost`)."""
        codecs = self._codecs(codecs)
        bits = sum(self.expert_bits(l, m, codecs[l]) for l, m in experts(G))
        bits += sum(self.stored_base.bits(l) for l in range(self.plan.L) if self.menu[codecs[l]] is not None)
        return storage_cost(bits, d=self.plan.d, base_bits=self.plan.base_bits, frozen_base=bool(self.plan.adapter))

    def _codecs(self, codecs: Optional[Sequence[int]]) -> list[int]:
        if codecs is None:
            return [0] * self.plan.L
        codecs = [int(c) for c in codecs]
        if len(codecs) != self.plan.L or not all(0 <= c < len(self.menu) for c in codecs):
            raise MergetoolError(f"a codec choice needs one menu index (0..{len(self.menu) - 1}) per component "
                                 f"({self.plan.L})", key="codecs")
        return codecs

    def cheapest_grouping(self):
        """The grouping of least C: per component, the partition of the tasks whose experts take the
        fewest bits. Exhaustive (B(T) partitions, 2^T - 1 experts per component), so for T <= 8."""
        T, L = self.plan.T, self.plan.L
        if T > 8:
            raise ValueError(f"cheapest_grouping enumerates B(T) partitions; T = {T} is too many")

        def bits(l: int, rgs: tuple) -> int:
            return sum(self.expert_bits(l, tuple(t for t in range(T) if rgs[t] == g)) for g in set(rgs))

        parts = set_partitions(T)
        return np.array([min(parts, key=lambda rgs: bits(l, rgs)) for l in range(L)], dtype=int).T

    def task_state(self, G, task: int, components: Optional[Sequence[int]] = None,
                   codecs: Optional[Sequence[int]] = None) -> dict[str, torch.Tensor]:
        """Normalised-name state dict of `task`'s chain (decoded experts) for some components."""
        state: dict[str, torch.Tensor] = {}
        codecs = self._codecs(codecs)
        for l in components if components is not None else range(self.plan.L):
            state.update(self.expert(l, group_members(G, task, l), codecs[l]).dense())
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
        return {"expert_hits": self.hits, "expert_misses": self.misses, "experts_cached": len(self._cache),
                "experts_counted": self.counted}
