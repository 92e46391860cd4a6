"""Non-merging and static whole-model baselines, scored by the search's own ExpertStore + Evaluator.

- individual: all-singletons G, full precision (C = T) and quantised to the recipe's bits (the
  search's own store, so C ≈ T·b/32 plus metadata, exact to the bytes);
- pre-trained: the base's tensors in every component, each task with its own head (C = 1);
- static WA / TA / TIES / BC / PCB: all-shared G, quantisation off, the recipe's method swapped for the
  baseline's, its hyperparameters tuned on validation over GRIDS (C = 1).

mergekit defaults are overridden on purpose: TIES density defaults to 1.0 (no trimming) and
Breadcrumbs with density 1 is plain TA, so density is always given (and gamma 0.01 for BC).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Optional

from mergetool.core.grouping import all_shared
from mergetool.merge.cost import tensor_data_bits
from mergetool.merge.experts import Expert, ExpertStore
from mergetool.merge.quantize import QuantSpec, quantize
from mergetool.recipe import MergeConfig, QuantizationConfig
from mergetool.search.racing import could_beat
from mergetool.search.types import RacingSettings

FULL = QuantSpec(bits=32)

# name, method, fixed parameters, tuned grid (parameter -> values)
STATIC = {
    "wa": ("Weight Averaging", "linear", {}, {}),
    "ta": ("Task Arithmetic", "task_arithmetic", {}, {"lambda": [0.3, 0.5, 0.7, 1.0]}),
    "ties": ("Ties-Merging", "ties", {"lambda": 1.0}, {"density": [0.2, 0.5, 0.8]}),
    "bc": ("Breadcrumbs", "breadcrumbs", {"gamma": 0.01},
           {"lambda": [0.3, 0.5, 0.7, 1.0], "density": [0.2, 0.5, 0.8]}),
    # PCB's ratio is the share of each task vector kept (merge/native_methods.py); its merge is a weighted mean
    # of the task vectors, so λ ≈ 1 (the paper's search bounds are 0.8..1.3)
    "pcb": ("PCB-Merging", "pcb", {}, {"ratio": [0.05, 0.1, 0.2], "lambda": [0.7, 1.0, 1.3]}),
}


@dataclass
class Scored:
    """One configuration's validation score (and the store that built it)."""

    params: dict
    performance: float
    per_task: dict
    storage_cost: float
    store: ExpertStore


def variant(recipe, method: str, params: dict):
    """The recipe with another merge method/parameters and quantisation off (private attrs kept)."""
    return recipe.model_copy(update={"merge": MergeConfig(method=method, parameters=dict(params)),
                                     "quantization": QuantizationConfig(bits=32)})


class FixedModelStore(ExpertStore):
    """Every expert is one fixed model's tensors, unquantised: `state`'s (a static merge computed whole, as Fisher
    merging and RegMean are), or the pre-trained base's when `state` is None."""

    state: Optional[dict] = None

    def _build(self, component: int, members: tuple[int, ...], codec: int = 0) -> Expert:
        comp = self.plan.components[component]
        out = {n: quantize(self.state[n] if self.state is not None else self.base.get(n), FULL)
               for n in comp.tensors}
        bits = sum(tensor_data_bits(q, self.plan.base_bits) for q in out.values())
        return Expert(component, members, out, bits, 0)

    def expert_bits(self, component: int, members, codec: int = 0) -> int:
        """C of the fixed tensors: counted from the expert (the count path would merge the tasks)."""
        return self.expert(component, members, codec).bits


def score(session, store: ExpertStore, G, split: str) -> tuple[float, dict, float]:
    r = session.score_store(store, G, split)
    return r.performance, r.per_task, r.storage_cost


def fixed_store(session, state: Optional[dict] = None) -> ExpertStore:
    """The store of one fixed model (FixedModelStore): `state`, or the pre-trained base."""
    s = session
    store = FixedModelStore(variant(s.recipe, "linear", {}), s.plan, s.base, s.tasks, quantization=FULL,
                            full_only=True)
    store.state = state
    return store


def merged_store(session, method: str, params: dict) -> ExpertStore:
    """The all-shared static merge `method` with `params`, unquantised (experts built on demand)."""
    return ExpertStore(variant(session.recipe, method, params), session.plan, session.base, session.tasks,
                       quantization=FULL, full_only=True)


def grid_points(grid: dict) -> list[dict]:
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))] or [{}]


def tune(session, key: str, progress: Optional[Callable[[str], None]] = None,
         racing: Optional[RacingSettings] = None) -> tuple[Scored, list[dict]]:
    """Every grid point of a static method on validation; the best (first on ties) and the grid.

    With `racing`, a point is scored on the racing subset first and completed only if it could beat the
    best point so far on the same rows (`search.racing.could_beat`, the search's comparison); a point raced out keeps its subset P in the grid rows ("raced_out")."""
    _, method, fixed, grid = STATIC[key]
    G = all_shared(session.plan.T, session.plan.L)
    subset = None if racing is None else (racing.fraction, session.recipe.search.seed)
    best, best_subset, rows = None, None, []
    for point in grid_points(grid):
        params = {**fixed, **point}
        if progress:
            progress(f"{key} {params}")
        store = merged_store(session, method, params)
        if racing is not None and best is not None:
            sub = session.score_store(store, G, "validation", subset=subset, part="subset").subset
            if not could_beat(sub, best_subset, racing):
                rows.append({**point, "performance": None, "subset_performance": sub["performance"],
                             "raced_out": True})
                store.clear()
                continue
        r = session.score_store(store, G, "validation", subset=subset)
        rows.append({**point, "performance": r.performance})
        if best is None or r.performance > best.performance:
            best = Scored(params, r.performance, r.per_task, r.storage_cost, store)
            best_subset = r.subset
        else:
            store.clear()
    return best, rows
