"""The evaluation engine: P_G (Eq. 7) and C_G (Eq. 8) for a grouping G, never recomputing what it knows.

A configuration is G and (with a recipe's codec menu) the menu's codec per component; without `codecs`
every component takes the menu's first entry. A task's chain is its (members, codec) per component.

Three caches, all counted:
  (a) experts by (component, members, codec) — in ExpertStore (LRU, memory-bounded);
  (b) per-task scores by the task's chain    — a task whose chain was seen is not re-evaluated;
  (c) hidden states by (task, chain prefix)  — a chain that differs only in later layers runs only
      the layers after the first changed one (encoder classifiers; others run whole).
With `caches=False` every expert is rebuilt and every task runs a full forward: the naive baseline.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections import OrderedDict
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch

from mergetool.core.grouping import members
from mergetool.core.results import PRECISIONS, EvalResult
from mergetool.evaluation.choice import choice_score
from mergetool.evaluation.metrics import custom_score, score
from mergetool.evaluation.racing import (
    PER_ROW_METRICS,
    batch_len,
    draw_subset,
    predictions,
    standard_error,
    subset_view,
)
from mergetool.evaluation.runner import TaskModel, adapter_config, pick_device
from mergetool.evaluation.tasks import TaskData, task_data
from mergetool.merge.experts import ExpertStore

SUBSET_MEMO = 4096  # raced (task, chain)s whose subset outputs are kept for completion (logits: small)


def _subset_summary(subs: dict[str, dict]) -> dict:
    """The racing subset's P (mean over tasks), its standard error, per-task scores and standard errors,
    rows, and (tasks scored by accuracy) each row's 0/1 score, which racing compares pairwise."""
    T = len(subs)
    return {"performance": float(np.mean([s["score"] for s in subs.values()])),
            "se": math.sqrt(sum(s["se"] ** 2 for s in subs.values())) / T,
            "per_task": {k: float(s["score"]) for k, s in subs.items()},
            "per_task_se": {k: float(s["se"]) for k, s in subs.items()},
            "items": {k: s["items"] for k, s in subs.items() if s.get("items") is not None},
            "rows": int(sum(s["rows"] for s in subs.values()))}


class ChainedConfiguration(NamedTuple):
    """G with a menu codec per component; a task's chain is its expert (members, codec) per component."""

    G: np.ndarray
    codecs: tuple[int, ...]

    @classmethod
    def of(cls, G, codecs: Optional[Sequence[int]] = None) -> "ChainedConfiguration":
        G = np.asarray(G)
        return cls(G, tuple(int(c) for c in codecs) if codecs is not None else (0,) * G.shape[1])

    def expert(self, t: int, l: int) -> tuple[tuple[int, ...], int]:
        return members(self.G, t, l), self.codecs[l]

    def chain(self, t: int) -> tuple:
        return tuple(self.expert(t, l) for l in range(self.G.shape[1]))


class Evaluator:
    def __init__(self, store: ExpertStore, *, split: str = "validation", device: str = "auto",
                 caches: bool = True, memo: Optional[bool] = None, prefix: Optional[bool] = None,
                 experts: Optional[bool] = None, prefix_cache_bytes: Optional[int] = None,
                 batch_size: Optional[int] = None, precision: str = "fp32"):
        """`caches` switches all three caches; `memo`, `prefix`, `experts` override one each.
        `precision="bf16"` runs the forward under bf16 autocast (screening; scores differ slightly)."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.precision = precision
        self.store, self.plan, self.recipe = store, store.plan, store.recipe
        self.device = pick_device(device)
        self.use_memo = caches if memo is None else memo
        self.use_prefix = caches if prefix is None else prefix
        self.use_experts = caches if experts is None else experts
        self.split = split
        self.data: list[TaskData] = []
        prep_cache: dict = {}  # tokenizers and image processors, by folder
        for t, name in enumerate(self.plan.tasks):
            src, kind = store.tasks[t], self.recipe.tasks[name].kind
            config = adapter_config(src, store.base, kind) if src.is_adapter else None  # no config.json
            self.data.append(task_data(self.recipe, name, src, store.base.path, split=split,
                                       batch_size=batch_size, cache=prep_cache, config=config))
        self._models: dict[int, TaskModel] = {}
        self._memo: dict[tuple, float] = {}
        self._prefix: OrderedDict[tuple, list] = OrderedDict()
        self._prefix_bytes = 0
        self.prefix_cache_bytes = prefix_cache_bytes if prefix_cache_bytes is not None else default_prefix_budget()
        self.counts = {"memo_hits": 0, "memo_misses": 0, "prefix_hits": 0, "prefix_misses": 0,
                       "stage_calls": 0, "forward_calls": 0, "examples": 0}
        self.subsets: Optional[list[tuple[int, ...]]] = None  # racing: per task, its subset's batch ids
        self._subset_memo: OrderedDict[tuple, tuple[dict, list]] = OrderedDict()  # (stats, outputs) per chain

    # --- public ---------------------------------------------------------------------------------
    def evaluate(self, G, codecs: Optional[Sequence[int]] = None) -> EvalResult:
        """P and C of G (with the menu's codec per component) on the whole split; with racing on, also its
        scores on the racing subset."""
        start = time.perf_counter()
        cfg = ChainedConfiguration.of(G, codecs)
        if not self.use_experts:
            self.store.clear()  # naive: every expert of G is merged (once) for this configuration
        before = dict(self.counts, **self.store.stats())
        scored = {name: self._full_task(cfg, t) for t, name in enumerate(self.plan.tasks)}
        per_task = {name: v for name, (v, _) in scored.items()}
        subset = _subset_summary({name: sub for name, (_, sub) in scored.items()}) if self.subsets else None
        return self._result(per_task, cfg, start, before, subset)

    def evaluate_subset(self, G, codecs: Optional[Sequence[int]] = None) -> EvalResult:
        """P of G on the racing subset only (see `use_subset`); C is exact. Its outputs are kept, so
        completing G later (`evaluate`) runs only the other batches."""
        if not self.subsets:
            raise ValueError("evaluate_subset needs use_subset(fraction, seed) first")
        start = time.perf_counter()
        cfg = ChainedConfiguration.of(G, codecs)
        before = dict(self.counts, **self.store.stats())
        summary = _subset_summary({name: self._subset_task(cfg, t) for t, name in enumerate(self.plan.tasks)})
        return self._result(summary["per_task"], cfg, start, before, summary)

    def use_subset(self, fraction: float, seed: int) -> None:
        """Fix each task's racing subset: whole batches, stratified by label (evaluation/racing.py)."""
        self.subsets = [draw_subset(d, fraction, seed) for d in self.data]
        self._memo.clear()
        self._subset_memo.clear()

    def score_task(self, G, t: int, codecs: Optional[Sequence[int]] = None) -> float:
        return self._full_task(ChainedConfiguration.of(G, codecs), t)[0]

    def use_store(self, store: ExpertStore) -> None:
        """Score another store's experts (same plan and data: the baselines' variants) on the data and
        modules already prepared; every cache keyed by chain is dropped."""
        if store.plan is not self.plan:
            raise ValueError("use_store needs a store over the same plan")
        self.store = store
        self.clear_caches()
        for model in self._models.values():
            model.loaded.clear()

    def clear_caches(self) -> None:
        """Drop the score memo and the prefix activations (memory back; results unchanged)."""
        self._memo.clear()
        self._subset_memo.clear()
        self._prefix.clear()
        self._prefix_bytes = 0

    def outputs(self, G, t: int, codecs: Optional[Sequence[int]] = None) -> np.ndarray:
        """Raw outputs of task t's assembled chain on its split (batch order)."""
        return np.concatenate(self._run(ChainedConfiguration.of(G, codecs), t, range(len(self.data[t].batches))))

    # --- internals -----------------------------------------------------------------------------
    def _model(self, t: int) -> TaskModel:
        if t not in self._models:
            self._models[t] = TaskModel(self.plan, self.store.tasks[t], self.store.own_tensors(t), self.device,
                                        base=self.store.base, kind=self.recipe.tasks[self.plan.tasks[t]].kind)
        return self._models[t]

    def _load(self, model: TaskModel, cfg: ChainedConfiguration, t: int, components) -> None:
        for l in components:
            m, c = expert = cfg.expert(t, l)
            if model.loaded.get(l) != expert or not self.use_experts:
                model.loaded.pop(l, None)
                model.load(l, expert, self.store.expert(l, m, c).dense())

    def _result(self, per_task: dict, cfg: ChainedConfiguration, start: float, before: dict,
                subset: Optional[dict]) -> EvalResult:
        cost = self.store.storage_cost(cfg.G, cfg.codecs)
        after = dict(self.counts, **self.store.stats())
        delta = {k: after[k] - before.get(k, 0) for k in after if k != "experts_cached"}
        return EvalResult(float(np.mean(list(per_task.values()))), per_task, cost,
                          time.perf_counter() - start, delta, subset)

    def _full_task(self, G: ChainedConfiguration, t: int) -> tuple[float, Optional[dict]]:
        """(task t's score on the whole split, its subset stats or None), memoised by chain."""
        key = (t, G.chain(t))
        if self.use_memo and key in self._memo:
            self.counts["memo_hits"] += 1
            return self._memo[key]
        self.counts["memo_misses"] += 1
        n = len(self.data[t].batches)
        if self.subsets:  # the subset's batches (kept from a raced run when there was one), then the rest
            ids = self.subsets[t]
            sub, sub_outputs = self._subset_memo.pop(key, None) or self._subset_run(G, t)
            rest = [b for b in range(n) if b not in ids]
            by_batch = dict(zip(ids, sub_outputs)) | dict(zip(rest, self._run(G, t, rest)))
            outputs = [by_batch[b] for b in range(n)]
        else:
            outputs, sub = self._run(G, t, range(n)), None
        value = (self.score_outputs(t, np.concatenate(outputs)), sub)
        if self.use_memo:
            self._memo[key] = value
        return value

    def _subset_task(self, G: ChainedConfiguration, t: int) -> dict:
        key = (t, G.chain(t))
        if self.use_memo and key in self._memo:  # scored whole already: its subset stats came with it
            self.counts["memo_hits"] += 1
            return self._memo[key][1]
        if key in self._subset_memo:
            self.counts["memo_hits"] += 1
        else:
            self.counts["memo_misses"] += 1
            self._subset_memo[key] = self._subset_run(G, t)
            while len(self._subset_memo) > SUBSET_MEMO:
                self._subset_memo.popitem(last=False)
        return self._subset_memo[key][0]

    def _subset_run(self, G: ChainedConfiguration, t: int) -> tuple[dict, list[np.ndarray]]:
        """(task t's stats on its racing subset, the subset's outputs per batch)."""
        outputs = self._run(G, t, self.subsets[t])
        return self._subset_stats(t, self.subsets[t], outputs), outputs

    def _subset_stats(self, t: int, ids, outputs: list) -> dict:
        """Task t's score on the racing subset, its standard error (inf for a custom evaluator), rows, and
        (per-row metrics) each row's 0/1 score."""
        data = self.data[t]
        view = subset_view(data, ids)
        flat = np.concatenate(outputs)[view.outputs_index]
        value = self.score_outputs(t, flat, view)
        items = None
        if self.recipe.tasks[data.name].kind == "custom":
            se = math.inf
        else:
            pred = predictions(data.metric, flat, view)
            se = standard_error(data.metric, pred, view.labels, seed=t)
            if data.metric in PER_ROW_METRICS:  # a mean of per-row scores: compared row by row
                items = (pred == np.asarray(view.labels)).astype(int).tolist()
        return {"score": float(value), "se": float(se), "rows": len(view.labels), "items": items}

    def _run(self, G: ChainedConfiguration, t: int, ids) -> list[np.ndarray]:
        """Outputs of task t's assembled chain on batches `ids` (in that order), one array per batch."""
        ids = tuple(ids)
        if not ids:
            return []
        model = self._model(t)
        data = self.data[t]
        self.counts["examples"] += sum(batch_len(data.batches[b]) for b in ids)
        with torch.inference_mode(), self._precision():
            if not (self.use_prefix and model.layerable):
                self._load(model, G, t, range(self.plan.L))
                outs = []
                for b in ids:
                    self.counts["forward_calls"] += 1
                    outs.append(model.forward(_to(data.batches[b], self.device)).float().cpu().numpy())
                return outs
            return self._run_staged(model, G, t, data, ids)

    def _run_staged(self, model: TaskModel, G: ChainedConfiguration, t: int, data: TaskData,
                    ids: tuple) -> list[np.ndarray]:
        stages = model.stages
        prefix: list = []
        keys = []
        for comps in stages[:-1]:
            prefix.extend((l, G.expert(t, l)) for l in comps)
            keys.append((t, ids, tuple(prefix)))
        start, states = 0, None
        for s in range(len(keys) - 1, -1, -1):
            if keys[s] in self._prefix:
                self._prefix.move_to_end(keys[s])
                start, states = s + 1, self._prefix[keys[s]]
                self.counts["prefix_hits"] += 1
                break
        else:
            self.counts["prefix_misses"] += 1
        for s in range(start, len(stages)):
            self._load(model, G, t, stages[s])
            fn = model.stage_fn(s)
            inputs = [_to(data.batches[b], self.device) for b in ids] if s == 0 else states
            states = [fn(x) for x in inputs]
            self.counts["stage_calls"] += len(inputs)
            if s < len(stages) - 1:
                self._remember(keys[s], states)
        return [o.float().cpu().numpy() for o in states]

    def _precision(self):
        """bf16 autocast when asked (screening); a no-op at fp32."""
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _remember(self, key: tuple, states: list) -> None:
        """Keep `states` under the budget, evicting the oldest. States in host memory also yield to
        memory pressure (other processes, other caches): evict further, or keep nothing, rather than
        push the machine into the OOM killer."""
        size = _nbytes(states)
        if size > self.prefix_cache_bytes:
            return
        host = self.device.type == "cpu"
        while self._prefix and (self._prefix_bytes + size > self.prefix_cache_bytes
                                or (host and memory_is_short(size))):
            _, old = self._prefix.popitem(last=False)
            self._prefix_bytes -= _nbytes(old)
        if host and memory_is_short(size):
            return
        self._prefix[key] = states
        self._prefix_bytes += size

    def score_outputs(self, t: int, outputs: np.ndarray, view=None) -> float:
        """Task t's metric on the model outputs for its split (or a racing subset's `view`), in batch order."""
        data = view if view is not None else self.data[t]
        cfg = self.recipe.tasks[data.name]
        if cfg.kind == "custom":
            return custom_score(cfg.evaluator, f"tasks.{data.name}.evaluator", outputs, data.labels, data.records)
        if data.pairs is not None:  # choice kinds: outputs are per (row, choice) log-likelihoods
            return choice_score(data.metric, outputs, data.pairs, data.labels, data.norms)
        return score(data.metric, outputs, data.labels)


def default_prefix_budget() -> int:
    """Half the memory available now, at most 12 GiB: one MiniLM evaluation's states are ~0.5 GB.
    $MERGETOOL_PREFIX_CACHE_BYTES sets it; $MERGETOOL_PREFIX_CACHE_SHARE divides it (Ray workers on one host)."""
    if os.environ.get("MERGETOOL_PREFIX_CACHE_BYTES", "").isdigit():
        return int(os.environ["MERGETOOL_PREFIX_CACHE_BYTES"])
    share = os.environ.get("MERGETOOL_PREFIX_CACHE_SHARE", "1")
    return _free_half() // max(1, int(share) if share.isdigit() else 1)


def _nbytes(states: list) -> int:
    return sum(h.numel() * h.element_size() for h, _ in states)


def _meminfo() -> dict:
    with open("/proc/meminfo") as f:
        return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if ":" in line}


def memory_is_short(extra: int) -> bool:
    """Would holding `extra` more bytes leave less than max(1 GiB, 10% of RAM) available? (False off Linux.)"""
    try:
        info = _meminfo()
        return info["MemAvailable"] - extra < max(1 << 30, info["MemTotal"] // 10)
    except (OSError, KeyError, ValueError, IndexError):
        return False


def _free_half() -> int:
    try:
        info = _meminfo()
        avail = info.get("MemAvailable", info["MemTotal"] // 2)
    except (OSError, KeyError, ValueError, IndexError):
        try:
            avail = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
        except (ValueError, OSError, AttributeError):
            avail = 4 << 30
    return int(min(12 << 30, avail // 2))


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}
