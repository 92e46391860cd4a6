"""`mergetool evaluate`: per-task metric of the routed library and of the oracle-routed library.

The routed run is one mixed stream over every task's split (as in production); the oracle run gives
each input its own task. An input the router sends to another task counts as a wrong prediction.
"""

from __future__ import annotations

import numpy as np

from mergetool.core.errors import MergetoolError
from mergetool.evaluation.data import read_split
from mergetool.evaluation.metrics import METRICS, REGRESSION
from mergetool.evaluation.tasks import label_names, map_labels
from mergetool.recipe.schema import Recipe


def _preds(results: list[dict], task: str, y: np.ndarray, regression: bool, n_classes: int) -> np.ndarray:
    out = np.empty(len(results), dtype=np.float64 if regression else np.int64)
    for i, r in enumerate(results):
        if regression:
            out[i] = r["logits"][0]
        elif r["task"] == task:
            out[i] = r["label_id"]
        else:
            out[i] = (y[i] + 1) % max(2, n_classes)  # misrouted: certainly wrong
    return out


def evaluate_library(lib, recipe: Recipe, split: str = "test", batch_size: int = 64) -> dict:
    """{split, routing_accuracy, tasks: {name: {metric, n, routed, oracle, routing_accuracy}}, mean}."""
    items, truth, refs = [], [], {}
    for name in lib.tasks:
        cfg = recipe.tasks.get(name)
        if cfg is None:
            raise MergetoolError(f"task {name!r} of the library is not in the recipe", key="--recipe",
                                 fix="pass the recipe the library was exported from")
        if cfg.kind != "sequence_classification":
            raise MergetoolError(f"task {name!r} is {cfg.kind}; evaluate scores sequence classification",
                                 key=f"tasks.{name}.kind")
        spec = getattr(cfg, split)
        if spec is None:
            raise MergetoolError(f"task {name!r} has no {split} split", key=f"tasks.{name}.{split}",
                                 fix=f"add `{split}:` to the task or use --split")
        key = f"tasks.{name}.{split}"
        records = read_split(spec, key=key)
        names = label_names(lib.store.config(name))
        y = map_labels([r[spec.label] for r in records], names, cfg.metric in REGRESSION, file=spec.path, key=key)
        refs[name] = (y, len(names), cfg.metric)
        items += [(str(r[spec.text]), str(r[spec.text_pair]) if spec.text_pair else None) for r in records]
        truth += [name] * len(records)
    routed = lib.predict(items, batch_size, return_logits=True) if lib.manifest.router else None
    oracle = lib.predict(items, batch_size, task=truth, return_logits=True)
    tasks, start = {}, 0
    for name, (y, n_classes, metric) in refs.items():
        part = slice(start, start + len(y))
        start += len(y)
        reg = metric in REGRESSION
        row = {"metric": metric, "n": len(y),
               "oracle": METRICS[metric](_preds(oracle[part], name, y, reg, n_classes), y)}
        if routed is not None:
            rs = routed[part]
            row["routed"] = METRICS[metric](_preds(rs, name, y, reg, n_classes), y)
            row["routing_accuracy"] = sum(r["task"] == name for r in rs) / max(1, len(rs))
        tasks[name] = row
    hits = sum(r["task"] == t for r, t in zip(routed, truth)) if routed is not None else None
    mean = {k: float(np.mean([v[k] for v in tasks.values()])) for k in ("routed", "oracle")
            if all(k in v for v in tasks.values())}
    return {"library": str(lib.path), "split": split, "solution": lib.store.solution.id,
            "router": None if lib.manifest.router is None else {
                "features": lib.manifest.router.features,
                "recorded_routing_accuracy": lib.manifest.router.routing_accuracy},
            "routing_accuracy": None if hits is None else hits / max(1, len(truth)),
            "tasks": tasks, "mean": mean}
