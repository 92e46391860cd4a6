"""Search core: MERGE's surrogate-assisted NSGA-II over grouping matrices (Algorithm 1).

The search treats the problem as a black box. The package exports the light types (types.py); the
loop (pymoo, scikit-learn) is imported on first use of `run_search`.
"""

from __future__ import annotations

from mergetool.search.loop import run_search as _run
from mergetool.search.types import EvalResult, SearchProblem, SearchResult, SearchSettings


def run_search(problem, settings: SearchSettings, journal_path, *, progress=None, executor=None) -> SearchResult:
    """Run (or resume) Algorithm 1; see mergetool.search.loop.run_search."""
    return _run(problem, settings, journal_path, progress=progress, executor=executor)


__all__ = ["EvalResult", "SearchProblem", "SearchSettings", "SearchResult", "run_search"]
