"""The model side of a server: one verified ExpertLibrary, run for a batch of inputs, and its description."""

from __future__ import annotations

import threading
from typing import Optional

from mergetool.inference.runtime import ExpertLibrary
from mergetool.library.card import test_split_scores


class LibraryEngine:
    """Runs batches on an ExpertLibrary (one thread at a time) and names its chains for the metrics."""

    def __init__(self, library: ExpertLibrary, batch_size: int):
        self.library, self.batch_size = library, batch_size
        self._lock = threading.Lock()
        by_chain: dict[tuple, list[str]] = {}
        for t in library.tasks:
            by_chain.setdefault(library.chain(t), []).append(t)
        self.chain_names = {t: "+".join(ts) for ts in by_chain.values() for t in ts}

    @property
    def tasks(self) -> list[str]:
        return self.library.tasks

    def run(self, items: list[tuple], tasks: list[Optional[str]], return_logits: bool) -> list[dict]:
        """Route the inputs without a task (all at once), group by chain, one forward per chain batch."""
        with self._lock:
            out = self.library.predict(items, batch_size=self.batch_size, task=tasks, return_logits=return_logits)
        for o in out:
            o.setdefault("truncated", False)
            if return_logits:
                o.setdefault("routing", None)
        return out

    def warm_up(self) -> None:
        """Assemble every chain once (and the router), so the first requests do not pay for it."""
        probe = [("warm up", None)] * len(self.tasks)
        self.run(probe, list(self.tasks), False)
        if self.library.manifest.router is not None:
            self.run(probe[:1], [None], False)

    def describe(self) -> dict:
        """GET /v1/library: tasks, chains, C, routing accuracy and the card's metadata."""
        m = self.library.manifest
        sol = m.solutions[m.default_solution]
        router = m.router
        return {
            "format_version": m.format_version, "mergetool_version": m.mergetool_version,
            "base": m.base.ref, "model_type": m.base.model_type,
            "tasks": [{"name": t.name, "labels": t.labels, "chain": list(self.library.chain(t.name))}
                      for t in m.tasks],
            "chains": len(set(self.chain_names.values())), "experts": len(m.experts),
            "storage_cost": m.storage_cost, "storage_cost_with_heads": m.storage.storage_cost_with_heads,
            "disk_bytes": m.disk_bytes,
            "solution": {"id": sol.id, "validation_performance": sol.performance, "validation_per_task":
                         sol.per_task, "test": test_split_scores(sol)},
            "merge": m.merge, "quantization": m.quantization,
            "router": None if router is None else {
                "features": router.features, "max_length": router.max_length,
                "routing_accuracy": router.routing_accuracy,
                "routing_accuracy_per_task": router.routing_accuracy_per_task},
            "max_length": self.library.max_length,
        }

    def resident(self) -> tuple[int, int]:
        """(assembled chains held, their bytes)."""
        return self.library.resident_chains, self.library.resident_bytes()
