"""`mergetool evaluate`: per-task metric of the library with the task given and under two routed protocols.

All inputs of every task's split form one mixed stream (as in production).
- oracle: each input runs its own task's chain and head (the task is given).
- backbone_routed: the router picks the chain; the input's own (true) task head runs on that chain's
  features. The protocol of the Twin-Merging, EMR-Merging and WEMoE papers.
- end_to_end: the router picks the task, hence the chain and the head; a misrouted input counts as wrong.
  What `predict` does in production (`routed` is kept as its alias).
An input routed to its own task runs the same chain and head under both routed protocols, so only the
misrouted ones are run again, with the routed chain and their own head.
"""

from __future__ import annotations

import time
from typing import Optional

import numpy as np

from mergetool.core.errors import MergetoolError
from mergetool.evaluation.data import read_split
from mergetool.evaluation.metrics import METRICS, REGRESSION
from mergetool.evaluation.tasks import label_names, map_labels
from mergetool.recipe.schema import Recipe
from mergetool.routing.router import SECOND_OPINION_RULE


def _preds(results: list[dict], task: str, y: np.ndarray, regression: bool, n_classes: int,
           strict: bool = True) -> np.ndarray:
    """Predictions for the metric; strict: an answer in another task's label space is certainly wrong."""
    out = np.empty(len(results), dtype=np.float64 if regression else np.int64)
    for i, r in enumerate(results):
        if regression:
            out[i] = r["logits"][0]
        elif r["task"] == task or not strict:
            out[i] = r["label_id"]
        else:
            out[i] = (y[i] + 1) % max(2, n_classes)  # misrouted: certainly wrong
    return out


def _read(lib, recipe: Recipe, split: str) -> tuple[list, list, dict]:
    """(inputs, true task per input, {task: (labels, n classes, metric)}) of every task's split."""
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
    return items, truth, refs


def _timed(fn, n: int) -> tuple[list, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, n / max(time.perf_counter() - t0, 1e-9)


def _routed(lib, items: list, truth: list, batch_size: int, second_opinion) -> tuple[list, list, float]:
    """(end-to-end results, backbone-routed results, end-to-end inputs/s)."""
    routed, speed = _timed(lambda: lib.predict(items, batch_size, return_logits=True,
                                               second_opinion=second_opinion), len(items))
    wrong = [i for i, (r, t) in enumerate(zip(routed, truth)) if r["task"] != t]
    backbone = list(routed)
    if wrong:
        again = lib.predict([items[i] for i in wrong], batch_size, task=[routed[i]["task"] for i in wrong],
                            head=[truth[i] for i in wrong], return_logits=True)
        for i, r in zip(wrong, again):
            backbone[i] = r
    return routed, backbone, speed


PROTOCOLS = ("oracle", "backbone_routed", "end_to_end")


def evaluate_library(lib, recipe: Recipe, split: str = "test", batch_size: int = 64,
                     second_opinion: Optional[float] = None) -> dict:
    """{split, routing_accuracy, tasks: {name: {metric, n, oracle, backbone_routed, end_to_end, routed,
    routing_accuracy, *_minus_oracle}}, mean, throughput}; the routed keys only for a library with a router."""
    items, truth, refs = _read(lib, recipe, split)
    has_router = lib.manifest.router is not None
    if items:  # assemble every chain and load the router first: the throughput is that of a warm library
        lib.predict(items[:1], 1, task=[truth[0]])
        for t in lib.tasks:
            lib.assemble(t)
    oracle, oracle_speed = _timed(lambda: lib.predict(items, batch_size, task=truth, return_logits=True), len(items))
    runs = {"oracle": oracle}
    speed = {"oracle_inputs_per_s": oracle_speed}
    asked = (lib.stats["second_opinion"], lib.stats["second_opinion_changed"])
    if has_router:
        runs["end_to_end"], runs["backbone_routed"], speed["end_to_end_inputs_per_s"] = _routed(
            lib, items, truth, batch_size, second_opinion)
    asked = (lib.stats["second_opinion"] - asked[0], lib.stats["second_opinion_changed"] - asked[1])
    tasks, start = {}, 0
    for name, (y, n_classes, metric) in refs.items():
        part = slice(start, start + len(y))
        start += len(y)
        reg = metric in REGRESSION
        row = {"metric": metric, "n": len(y)}
        for k, res in runs.items():
            head = name if k != "end_to_end" else None  # backbone-routed: the true head, whatever the chain
            row[k] = METRICS[metric](_preds(res[part], head or name, y, reg, n_classes, strict=head is None), y)
        if has_router:
            row["routed"] = row["end_to_end"]
            row["routing_accuracy"] = sum(r["task"] == name for r in runs["end_to_end"][part]) / max(1, len(y))
            for k in ("backbone_routed", "end_to_end"):
                row[f"{k}_minus_oracle"] = row[k] - row["oracle"]
        tasks[name] = row
    hits = sum(r["task"] == t for r, t in zip(runs["end_to_end"], truth)) if has_router else None
    mean = {k: float(np.mean([v[k] for v in tasks.values()])) for k in (*PROTOCOLS, "routed")
            if tasks and all(k in v for v in tasks.values())}
    info = lib.manifest.router
    return {"library": str(lib.path), "split": split, "solution": lib.store.solution.id,
            "router": None if info is None else {
                "features": info.features, "pooling": info.pooling,
                "recorded_routing_accuracy": info.routing_accuracy},
            "protocols": {"oracle": "the task given: its chain and its head",
                          "backbone_routed": "the router picks the chain; the input's own task head runs on it",
                          "end_to_end": "the router picks the chain and the head; a misroute counts as wrong"},
            "second_opinion": None if second_opinion is None or not has_router else {
                "threshold": second_opinion, "rule": SECOND_OPINION_RULE, "inputs": int(asked[0]),
                "changed": int(asked[1])},
            "routing_accuracy": None if hits is None else hits / max(1, len(truth)),
            "tasks": tasks, "mean": mean, "throughput": speed}
