"""The budget pick, in one place: the best-performing point whose storage cost C fits a budget.

Used by the search's front (`search.front.pick`), the library reader (`reader.select_solution`) and
`mergetool export` (its default solution among several). Ties go to the cheaper point, then to the
lower index; a point without a score ranks last."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, TypeVar

from mergetool.core.errors import MergetoolError

Point = TypeVar("Point")


def best_within(points: Sequence[Point], budget: Optional[float], *, cost: Callable[[Point], float],
                performance: Callable[[Point], Optional[float]], tie: Optional[Callable[[Point], Any]] = None,
                what: str = "configuration", error: type[MergetoolError] = MergetoolError) -> int:
    """Index of the best point with cost <= budget (no budget: the best of all); `tie` orders equal
    points after their cost (default: their index)."""
    if not points:
        raise error(f"there is no {what} to choose from", key="budget", fix="run the search first")
    fits = [i for i, p in enumerate(points) if budget is None or cost(points[i]) <= budget]
    if not fits:
        cheapest = min(cost(p) for p in points)
        raise error(f"no {what} fits storage budget {budget:g}; the smallest storage cost available is "
                    f"{cheapest:.6g}", key="budget", fix=f"raise the budget to at least {cheapest:.6g}")

    def rank(i: int) -> tuple:
        p = performance(points[i])
        return (float("inf") if p is None else -p, cost(points[i]), tie(points[i]) if tie else i)

    return min(fits, key=rank)
