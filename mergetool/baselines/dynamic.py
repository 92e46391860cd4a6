"""Dynamic merging baselines: Twin-Merging and EMR-Merging, merged per input from router weights.

Formulas (plain tensor functions, unit-tested on literal tensors):
- Twin-Merging (Lu et al. 2024): shared expert θ_s (a TIES merge); per task the delta θ_t − θ_s is
  compressed to its best rank-r approximation (truncated SVD of each ≥2-D tensor seen as
  rows × rest; 1-D tensors stay dense). Per input: θ(x) = θ_s + Σ_t w_t(x) · SVD_r(θ_t − θ_s).
- EMR-Merging (Huang et al. 2024): τ_t = θ_t − θ_pre; elect σ = sign(Σ_t τ_t); magnitude
  ε = max |τ_t| over the tasks with τ_t·σ > 0; τ_uni = σ·ε; masks M_t = (τ_t ⊙ τ_uni > 0);
  rescalers λ_t = Σ|τ_t| / Σ|M_t ⊙ τ_uni| (sums over every mergeable parameter). The input's
  model is θ_pre + λ_s · M_s ⊙ τ_uni for the task s its router weights select (argmax).

Router weights come from `route(t, batch) -> (n, T)`: `train_router` fits the project's router
(mergetool.routing) on each task's `router` split, over features of the method's own stored backbone;
`oracle_route` is one-hot on the true task (nothing trained or stored).
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from mergetool.baselines.storage import stored, stored_state
from mergetool.core.storage import storage_cost
from mergetool.evaluation.metrics import REGRESSION
from mergetool.evaluation.runner import TaskModel
from mergetool.evaluation.tasks import load_tokenizer, tokenizer_dir
from mergetool.merge.codecs import base_stored_bits
from mergetool.merge.quantize import bits_of_dtype
from mergetool.pipeline.router_training import fit, read_texts

Route = Callable[[int, dict], np.ndarray]


# --- formulas ---------------------------------------------------------------------------------
def svd_factors(delta: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """(P, Q) with P @ Q the best rank-`rank` approximation of delta viewed as (rows, rest)."""
    m = delta.reshape(delta.shape[0], -1).float()
    U, S, Vh = torch.linalg.svd(m, full_matrices=False)
    k = min(rank, S.numel())
    return U[:, :k] * S[:k], Vh[:k]


def twin_params(shape: Sequence[int], rank: int) -> int:
    """Stored parameters of one compressed delta: r·(m + n) factors, or the dense delta when that is
    no larger (and always for 1-D tensors)."""
    numel = int(np.prod(shape)) if len(shape) else 1
    if len(shape) < 2:
        return numel
    m = int(shape[0])
    n = numel // m
    return min(min(rank, m, n) * (m + n), numel)


def twin_merge(shared: Tensor, deltas: Sequence[Tensor] | Tensor, weights: Sequence[float]) -> Tensor:
    """θ_s + Σ_t w_t · Δ_t, as one matrix-vector product over the T deltas stacked on dim 0 (one allocation:
    a per-input merge of a whole backbone is memory-bound, and T axpys with their temporaries cost 10× more)."""
    stacked = deltas if isinstance(deltas, Tensor) else torch.stack([d.float() for d in deltas])
    w = torch.tensor(np.asarray(weights, dtype=np.float32))
    out = torch.addmv(shared.float().reshape(-1), stacked.float().reshape(len(w), -1).T, w)
    return out.view(shared.shape).to(shared.dtype)


def emr_unify(taus: Sequence[Tensor]) -> Tensor:
    """τ_uni: elected sign of Σ τ_t times the largest |τ_t| among tasks agreeing with it."""
    stack = torch.stack([t.float() for t in taus])
    sign = torch.sign(stack.sum(0))
    agree = stack * sign > 0
    mag = torch.where(agree, stack.abs(), torch.zeros_like(stack)).amax(0)
    return sign * mag


def emr_masks(taus: Sequence[Tensor], uni: Tensor) -> list[Tensor]:
    """M_t = (τ_t ⊙ τ_uni > 0), boolean."""
    return [t.float() * uni > 0 for t in taus]


def emr_sums(taus: Sequence[Tensor], uni: Tensor, masks: Sequence[Tensor]) -> list[tuple[float, float]]:
    """Per task, (Σ|τ_t|, Σ|M_t ⊙ τ_uni|) over one tensor."""
    return [(float(t.float().abs().sum()), float((m * uni).abs().sum())) for t, m in zip(taus, masks)]


def emr_rescalers(sums: Sequence[Sequence[tuple[float, float]]]) -> list[float]:
    """λ_t = Σ|τ_t| / Σ|M_t ⊙ τ_uni|, from emr_sums of every tensor (sums[i][t])."""
    out = []
    for t in range(len(sums[0]) if sums else 0):
        num, den = sum(s[t][0] for s in sums), sum(s[t][1] for s in sums)
        out.append(num / den if den > 0 else 0.0)
    return out


def emr_task(pre: Tensor, uni: Tensor, mask: Tensor, rescaler: float) -> Tensor:
    """θ_pre + λ_t · M_t ⊙ τ_uni."""
    return (pre.float() + rescaler * mask * uni).to(pre.dtype)


def oracle_route(T: int) -> Route:
    def route(t: int, batch: dict) -> np.ndarray:
        w = np.zeros((len(batch["input_ids"]), T))
        w[:, t] = 1.0
        return w
    return route


# --- models built from a session's tensors -------------------------------------------------------
def _names(plan) -> list[str]:
    return [n for c in plan.components for n in c.tensors]


def _packed_bits(numel: int) -> int:
    return 8 * ((numel + 7) // 8)


class TwinModel:
    """Shared expert + per-task compressed deltas. SVD factors are computed once at the largest rank
    of the grid and sliced for smaller ranks; tensors a rank keeps whole are stored dense. `storage`
    (fp32 | fp16 | int8, baselines/storage.py) is how the shared expert and the factors are stored: the
    deltas are taken from the shared expert as stored, and the model runs on the decoded factors."""
    def __init__(self, plan, shared: dict[str, Tensor], tasks: Sequence, ranks: Sequence[int], storage: str = "fp32"):
        self.plan, self.storage = plan, storage
        self.shared, self.shared_bits = stored_state(shared, storage)
        lo, hi = min(ranks), max(ranks)
        self._rank, self._flat = None, None
        self.parts: list[dict[str, dict]] = []
        for src in tasks:
            parts = {}
            for n, s in self.shared.items():
                delta = src.get(n).float() - s.float()
                e = {}
                if delta.ndim < 2 or twin_params(delta.shape, hi) == delta.numel():
                    e["dense"] = delta
                if delta.ndim >= 2 and twin_params(delta.shape, lo) < delta.numel():
                    e["factors"] = svd_factors(delta, hi)
                parts[n] = e
            self.parts.append(parts)

    def _stored_parts(self, t: int, name: str, rank: int) -> list[Tensor]:
        e = self.parts[t][name]
        if twin_params(self.shared[name].shape, rank) == self.shared[name].numel():
            return [e["dense"]]
        P, Q = e["factors"]
        return [P[:, :rank], Q[:rank]]

    def delta(self, t: int, name: str, rank: int) -> Tensor:
        parts = [stored(x, self.storage)[0] for x in self._stored_parts(t, name, rank)]
        return parts[0] if len(parts) == 1 else (parts[0] @ parts[1]).reshape(self.shared[name].shape)

    def state(self, weights: Sequence[float], rank: int) -> dict[str, Tensor]:
        """θ_s + Σ_t w_t · SVD_r(Δ_t) for every tensor: one flat merge (twin_merge), returned as views by name."""
        if self._rank != rank:  # the rank-r deltas, dense, flattened and stacked (T, P)
            self._flat, self._rank = None, rank
            flat = lambda ts: torch.cat([x.float().reshape(-1) for x in ts])  # noqa: E731
            self._flat = (flat(self.shared.values()),
                          torch.stack([flat(self.delta(t, n, rank) for n in self.shared) for t in range(len(self.parts))]))
        merged = twin_merge(*self._flat, weights)
        sizes = [s.numel() for s in self.shared.values()]
        return {n: v.view(s.shape).to(s.dtype) for (n, s), v in zip(self.shared.items(), merged.split(sizes))}

    def breakdown(self, rank: int) -> dict:
        """C of each stored part (merge/cost.py): the shared expert and the per-task rank-r deltas (dense or
        factors), at `storage` (fp32 on an fp32 zoo: r·(m+n)·b⁺ bits per factorised tensor)."""
        b, T = self.plan.base_bits, self.plan.T
        c = lambda bits: storage_cost(bits, d=self.plan.d, base_bits=b)  # noqa: E731
        own = {n: bits_of_dtype(s.dtype) for n, s in self.shared.items()}
        per_task = [sum(base_stored_bits(x.shape, self.storage, own[n]) for n in self.shared
                        for x in self._stored_parts(t, n, rank)) for t in range(T)]
        return {"shared": c(self.shared_bits), "per_task": c(sum(per_task)), "per_task_each": c(per_task[0]),
                "storage": self.storage}


class EMRModel:
    """Unified task vector, per-task masks and rescalers (θ_pre is kept to rebuild each task). θ_pre and
    τ_uni are stored at `storage` (baselines/storage.py); τ_t is taken from θ_pre as stored, and the masks
    and rescalers from τ_uni as stored."""
    def __init__(self, plan, base, tasks: Sequence, storage: str = "fp32"):
        self.plan, self.storage = plan, storage
        self.pre, self.pre_bits = stored_state({n: base.get(n) for n in _names(plan)}, storage)
        self.uni: dict[str, Tensor] = {}
        self.uni_bits = 0
        self.masks: list[dict[str, Tensor]] = [{} for _ in tasks]
        sums = []
        for n, pre in self.pre.items():
            taus = [src.get(n).float() - pre.float() for src in tasks]
            self.uni[n], bits = stored(emr_unify(taus), storage)
            self.uni_bits += bits
            masks = emr_masks(taus, self.uni[n])
            for t, m in enumerate(masks):
                self.masks[t][n] = m
            sums.append(emr_sums(taus, self.uni[n], masks))
        self.rescalers = emr_rescalers(sums)

    @staticmethod
    def key(weights: Sequence[float]) -> tuple:
        return (int(np.argmax(weights)),)

    def state(self, weights: Sequence[float]) -> dict[str, Tensor]:
        s = int(np.argmax(weights))
        return {n: emr_task(p, self.uni[n], self.masks[s][n], self.rescalers[s]) for n, p in self.pre.items()}

    def breakdown(self) -> dict:
        """C of each stored part (merge/cost.py): θ_pre and the unified vector at `storage`, T bit-packed
        masks, T rescalers at b⁺."""
        T, b = self.plan.T, self.plan.base_bits
        c = lambda bits: storage_cost(bits, d=self.plan.d, base_bits=b)  # noqa: E731
        masks = c(T * sum(_packed_bits(p.numel()) for p in self.pre.values()))
        return {"pretrained": c(self.pre_bits), "unified": c(self.uni_bits), "masks": masks, "rescalers": c(T * b),
                "paper_convention": c(self.uni_bits) + masks + c(T * b), "storage": self.storage}


# --- routing ------------------------------------------------------------------------------------
class Features:
    """h(x): the mean-pooled last hidden state of a backbone holding `state`, the method's own stored
    model (Twin: its shared expert; EMR: θ_pre), so the features cost no extra storage."""
    def __init__(self, session, state: dict[str, Tensor], device):
        p = session.plan
        self.model = TaskModel(p, session.tasks[0], session.full_precision_store.own_tensors(0), device)
        for l in range(p.L):
            self.model.load(l, ("features",), state)
        self.device = device

    def __call__(self, batch: dict) -> Tensor:
        keys = ("input_ids", "attention_mask", "token_type_ids")
        with torch.inference_mode():
            h = self.model.module.base_model(**{k: batch[k].to(self.device) for k in keys if k in batch})[0]
            m = batch["attention_mask"].to(self.device).unsqueeze(-1).to(h.dtype)
            return ((h * m).sum(1) / m.sum(1).clamp(min=1.0)).float().cpu()


def router_tokenizer(session):
    """The one tokenizer every task's router inputs are encoded with (the base's, else the first task's)."""
    return load_tokenizer(tokenizer_dir(session.base.path, session.tasks[0].path))


def router_batches(session, tok, t: int, limit: Optional[int], batch_size: int) -> Iterator[dict]:
    """Task t's `router` inputs (at most `limit`: the seeded subset the router trains on), tokenized in batches."""
    s, name = session, session.plan.tasks[t]
    rows = read_texts(s.recipe.tasks[name].router, f"tasks.{name}.router", limit, s.recipe.search.seed)
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        pairs = [b for _, b in chunk] if chunk[0][1] is not None else None
        yield dict(tok([a for a, _ in chunk], pairs, truncation=True, padding=True, return_tensors="pt",
                       max_length=s.recipe.tasks[name].max_length))


def train_router(session, features: Features) -> tuple[Route, dict]:
    """The project's router (mergetool.routing: 3-layer MLP, recipe.router settings, seeded) trained on
    each task's `router` split; weights = softmax of its logits."""
    s, cfg, seed = session, session.recipe.router, session.recipe.search.seed
    tok = router_tokenizer(s)
    X, y = [], []
    for t in range(len(s.plan.tasks)):
        for batch in router_batches(s, tok, t, cfg.max_per_task, 32):
            X.append(features(batch))
            y += [t] * len(batch["input_ids"])
    router = fit(torch.cat(X), torch.tensor(y), list(s.plan.tasks), cfg.hidden, cfg.epochs, cfg.lr, seed)

    def route(t: int, batch: dict) -> np.ndarray:
        with torch.inference_mode():
            return torch.softmax(router(features(batch)), -1).double().numpy()

    params = sum(v.numel() for v in router.state_dict().values())
    return route, {"kind": "router", "params": params, "train_examples": len(y),
                   "hidden": list(cfg.hidden), "epochs": cfg.epochs, "lr": cfg.lr}


def router_ready(session) -> bool:
    """True when the project's router can be trained: every task has a `router` split."""
    return session.has_split("router")


# --- per-input evaluation ----------------------------------------------------------------------
def misrouted_wrong(data, outputs: np.ndarray, chosen: np.ndarray, t: int) -> Optional[np.ndarray]:
    """The end-to-end outputs of task t: a row the router sent to another task (chosen ≠ t) would get
    that task's head and label space, so it is replaced by logits of a certainly wrong class, the
    rule of `mergetool evaluate` ((y + 1) mod n_classes). None when the task is not a classification
    (regression, choice or custom outputs have no wrong class to stand in)."""
    if (data.pairs is not None or data.kind == "custom" or data.metric in REGRESSION or outputs.ndim != 2
            or outputs.shape[1] < 2):
        return None
    out = outputs.copy()
    bad = np.flatnonzero(np.asarray(chosen) != t)
    out[bad] = 0.0
    out[bad, (np.asarray(data.labels)[bad].astype(np.int64) + 1) % outputs.shape[1]] = 1.0
    return out


class PerInputEvaluator:
    """Scores a per-input merged model on a split: each input's router weights give its merged
    backbone, run with its task's head. Inputs of a batch with identical weights (all of them under
    oracle routing) share one merge and one forward, which is the same computation as batch size 1.

    One pass gives both routed protocols: `evaluate` returns the backbone-routed score (the input's own
    head), and `end_to_end` holds the end-to-end one (the head of the task with the largest router
    weight: a misrouted input counts as wrong; None when a task is not a classification)."""
    def __init__(self, session, split: str):
        self.ev = session.evaluator(split, quantized=False)  # its task data and scorer
        self.session = session
        self._models: dict[int, TaskModel] = {}
        self.routing_accuracy: Optional[float] = None
        self.per_task_routing: dict[str, float] = {}
        self.end_to_end: Optional[tuple[float, dict[str, float]]] = None

    def _model(self, t: int) -> TaskModel:
        if t not in self._models:
            s = self.session
            self._models[t] = TaskModel(s.plan, s.tasks[t], s.full_precision_store.own_tensors(t), self.ev.device)
        return self._models[t]

    def evaluate(self, build: Callable[[np.ndarray], dict[str, Tensor]], route: Route,
                 key: Optional[Callable[[np.ndarray], tuple]] = None,
                 progress: Optional[Callable[[], None]] = None) -> tuple[float, dict[str, float]]:
        """`build(w)` is the merged state for weights w; `key(w)` says which weights give the same
        state (default: the weights themselves; EMR: the argmax task)."""
        plan = self.session.plan
        key = key or (lambda w: tuple(np.round(w, 8)))
        per_task, e2e, self.per_task_routing = {}, {}, {}
        cache: dict = {}  # the last merged state, by its key
        right = total = 0
        for t, name in enumerate(plan.tasks):
            outputs, chosen = self._task_outputs(t, build, route, key, cache, progress)
            per_task[name] = self.ev.score_outputs(t, outputs)
            right, total = right + int((chosen == t).sum()), total + len(chosen)
            self.per_task_routing[name] = float(np.mean(chosen == t)) if len(chosen) else 0.0
            wrong = misrouted_wrong(self.ev.data[t], outputs, chosen, t)
            e2e[name] = None if wrong is None else self.ev.score_outputs(t, wrong)
        self.routing_accuracy = right / total if total else None
        self.end_to_end = None if None in e2e.values() else (float(np.mean(list(e2e.values()))), e2e)
        return float(np.mean(list(per_task.values()))), per_task

    def _task_outputs(self, t: int, build, route: Route, key, cache: dict, progress) -> tuple[np.ndarray, np.ndarray]:
        """Task t's outputs with its own head, in batch order, and the task its router weights chose per input."""
        plan, model = self.session.plan, self._model(t)
        model.loaded.clear()
        outs, chosen = [], []
        with torch.inference_mode():
            for batch in self.ev.data[t].batches:
                weights = np.asarray(route(t, batch), dtype=np.float64)
                chosen.append(weights.argmax(1))
                keys = [key(w) for w in weights]
                out: list = [None] * len(keys)
                for k in dict.fromkeys(keys):
                    rows = [i for i, kk in enumerate(keys) if kk == k]
                    if k not in cache:
                        cache.clear()
                        cache[k] = build(weights[rows[0]])
                    for l in range(plan.L):
                        model.load(l, ("dynamic", k), cache[k])
                    sub = {n: v[rows].to(self.ev.device) for n, v in batch.items()}
                    logits = model.forward(sub).float().cpu()
                    for j, i in enumerate(rows):
                        out[i] = logits[j]
                outs.append(torch.stack(out))
                if progress:
                    progress()
        return torch.cat(outs).numpy(), np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)
