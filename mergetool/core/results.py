"""What evaluating one grouping G returns: the contract between the evaluation engine, which computes
it, and the search, which only ranks it (the search knows nothing about models)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

PRECISIONS = ("fp32", "bf16")  # what the search may ask the engine to evaluate at


@dataclass
class EvalResult:
    """One real evaluation of a grouping G."""

    performance: float  # P_G (Eq. 7), higher is better
    per_task: dict[str, float]
    storage_cost: float  # C_G (Eq. 8), lower is better
    seconds: float = 0.0
    cache: dict[str, Any] = field(default_factory=dict)  # counters; keys ending in "hits"/"misses" feed the hit rate
    # racing: P on the fixed validation subset, its standard error "se", "per_task" and "rows" (None when off)
    subset: Optional[dict[str, Any]] = None
