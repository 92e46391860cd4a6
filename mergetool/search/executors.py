"""Executors run a generation's real evaluations: sequentially, or in parallel on Ray.

`map(problem, items, part)` takes [(i, G), ...] and yields (i, result) as evaluations finish, in any
order; the loop keys everything by i, so the search does not depend on completion order.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from mergetool.core.errors import MergetoolError


def evaluate_part(problem, G: np.ndarray, part: str):
    """One evaluation: "full" (all validation inputs) or "subset" (racing: the fixed subset only)."""
    if part == "full":
        return problem.evaluate(G)
    if part == "subset":
        return problem.evaluate_subset(G)
    raise ValueError(f"unknown evaluation part {part!r}")


class LocalExecutor:
    """Evaluate one after another in this process."""

    name = "local"

    def map(self, problem, items: Sequence[tuple[int, np.ndarray]], part: str = "full") -> Iterator[tuple[int, Any]]:
        for i, G in items:
            yield i, evaluate_part(problem, G, part)

    def connect(self) -> None:
        """Nothing to reach (the Ray executor connects here, before a run writes anything)."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _import_ray():
    try:
        import ray
    except ImportError:
        raise MergetoolError(
            "the ray executor needs the 'ray' package, which is not installed",
            key="search.executor",
            fix="pip install 'mergetool[ray]' or use the local executor",
        ) from None
    return ray


class RayExecutor:
    """Evaluate in parallel on Ray workers (actors), each holding one copy of the problem.

    The problem must be picklable; each worker keeps its own caches warm across generations.
    Connects to `address` (e.g. "auto" or "ray://host:10001"), or starts a local Ray when None
    and Ray is not initialised yet.
    """

    name = "ray"

    def __init__(self, address: Optional[str] = None, num_workers: int = 2, num_cpus_per_worker: float = 1,
                 num_gpus_per_worker: float = 0):
        if num_workers < 1:
            raise MergetoolError("num_workers must be at least 1", key="search.executor.num_workers")
        self.ray = _import_ray()
        self.address = address
        self.num_workers = num_workers
        self.options = {"num_cpus": num_cpus_per_worker, "num_gpus": num_gpus_per_worker}
        self._actors: list = []
        self._problem_id: Optional[int] = None
        self._started_ray = False

    def connect(self) -> None:
        """Start or reach Ray; one line when it cannot (called before a run writes anything)."""
        ray = self.ray
        if not ray.is_initialized():
            try:
                ray.init(address=self.address, include_dashboard=False, log_to_driver=False)
            except Exception as e:  # noqa: BLE001 - Ray's connection errors come in many types
                raise MergetoolError(
                    f"cannot start or reach Ray at {self.address or 'a local instance'}: "
                    f"{' '.join(str(e).split())[:200]}",
                    key="search.ray.address",
                    fix="check the address (ray status) or use executor: local",
                ) from None
            self._started_ray = True

    def _ensure(self, problem) -> None:
        ray = self.ray
        self.connect()
        if self._actors and self._problem_id == id(problem):
            return
        self._kill_actors()
        worker = ray.remote(**self.options)(_Worker)
        ref = ray.put(problem)
        self._actors = [worker.remote(ref, self.num_workers + 1) for _ in range(self.num_workers)]
        self._problem_id = id(problem)

    def map(self, problem, items: Sequence[tuple[int, np.ndarray]], part: str = "full") -> Iterator[tuple[int, Any]]:
        items = list(items)
        if not items:
            return
        self._ensure(problem)
        ray = self.ray
        queue = list(items)
        pending: dict = {}
        free = list(self._actors)
        while queue or pending:
            while queue and free:  # one task per worker at a time
                actor = free.pop()
                i, G = queue.pop(0)
                pending[actor.evaluate.remote(i, np.asarray(G), part)] = actor
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                free.append(pending.pop(ref))
                yield ray.get(ref)

    def _kill_actors(self) -> None:
        for a in self._actors:
            try:
                self.ray.kill(a)
            except Exception:  # noqa: BLE001 - an actor that already died cannot be killed; nothing to do
                continue
        self._actors = []
        self._problem_id = None

    def close(self) -> None:
        """Stop the workers (and Ray, if this executor started it)."""
        self._kill_actors()
        if self._started_ray and self.ray.is_initialized():
            self.ray.shutdown()
            self._started_ray = False

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Worker:
    """Ray actor body: one problem per worker process."""

    def __init__(self, problem, share: int = 1):
        # evaluators size their prefix-activation cache from free memory: workers on one host share it
        os.environ["MERGETOOL_PREFIX_CACHE_SHARE"] = str(share)
        self.problem = problem

    def evaluate(self, i: int, G: np.ndarray, part: str = "full"):
        return i, evaluate_part(self.problem, G, part)


def make_executor(kind: str = "local", address: Optional[str] = None, num_workers: int = 2):
    """Executor by name: "local" or "ray"."""
    if kind == "local":
        return LocalExecutor()
    if kind == "ray":
        return RayExecutor(address=address, num_workers=num_workers)
    raise MergetoolError(f"unknown executor {kind!r}", key="search.executor", fix="use local or ray")
