"""The storage cost C (paper Eq. 8), defined once for every method: stored bits / (b⁺·d).

b⁺ is the bit width of the base's own dtype and d the number of mergeable float parameters, so one
full-precision copy of the mergeable part costs 1. An adapter (LoRA/IA3) zoo stores its frozen base once;
it adds 1. Every C that mergetool reports comes from here: the search (ExpertStore.storage_cost), the
writer and `inspect` (a library's Storage), the plan (individual models) and the baselines (static,
Twin, EMR and their routers). What counts as stored bits (packing, padding, masks) is merge/cost.py's.
"""

from __future__ import annotations


def storage_cost(bits: float, *, d: int, base_bits: int, frozen_base: bool = False) -> float:
    """C of `bits` stored bits: bits / (b⁺·d), plus 1 when an adapter zoo's frozen base is stored once."""
    return (1.0 if frozen_base else 0.0) + bits / (base_bits * d)
