"""AdaMerging (Yang et al., ICLR'24): task arithmetic whose coefficients are learned without labels.

θ(λ) = θ_pre + Σ_t λ_t · τ_t (task-wise: one λ per task) or θ_k(λ) = θ_pre,k + Σ_t λ_{t,k} · τ_{t,k}
(layer-wise: one λ per task per parameter tensor k of the backbone, the mergeable tensors). λ minimises the
Shannon entropy of the merged model's predictions on unlabelled inputs: at every step one batch of each task's
`router` split (labels never read), run with that task's own head through `torch.func.functional_call`, the
mean entropies summed over the tasks. The paper's settings: Adam, lr 1e-3, batch 16, 500 steps, λ initialised
at 0.3; λ is clipped to [0, 1] in the forward pass as in the reference code; a fixed seed orders the batches.
C = 1, as for every static merge; the wall time and the number of coefficients are reported.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch.func import functional_call

from mergetool.baselines.data_merges import mergeable, task_model
from mergetool.baselines.dynamic import router_batches, router_tokenizer
from mergetool.core.errors import MergetoolError


@dataclass(frozen=True)
class AdaMergingSettings:
    steps: int = 500
    lr: float = 1e-3
    batch_size: int = 16
    init: float = 0.3
    seed: int = 0

    def checked(self) -> AdaMergingSettings:
        if self.steps < 1:
            raise MergetoolError(f"AdaMerging needs a positive number of steps, got {self.steps}",
                                 key="--adamerging-steps", fix="give steps ≥ 1 (the paper's 500)")
        return self


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy of softmax(logits) over the batch."""
    logp = torch.log_softmax(logits.float(), -1)
    return -(logp.exp() * logp).sum(-1).mean()


class AdaMergingModel:
    """Task arithmetic with learnable coefficients (T × 1 task-wise, T × K layer-wise) over a session's models."""

    def __init__(self, session, layerwise: bool, device, init: float = 0.3):
        s = session
        self.names, self.device, self.layerwise = mergeable(s), device, layerwise
        self.base = {n: s.base.get(n).float().to(device) for n in self.names}
        self.taus = [{n: src.get(n).float().to(device) - self.base[n] for n in self.names} for src in s.tasks]
        self.coef = torch.full((len(s.tasks), len(self.names) if layerwise else 1), float(init), device=device,
                               requires_grad=True)
        self.dtypes = {n: s.base.meta(n).dtype for n in self.names}
        self.models = [task_model(s, t, device) for t in range(len(s.tasks))]  # each task's own head
        for m in self.models:
            for p in m.module.parameters():
                p.requires_grad_(False)  # only the coefficients learn
        self.keys = []  # per task: our tensor name -> the module's parameter name (functional_call's key)
        for m in self.models:
            by_id = {id(p): k for k, p in m.module.named_parameters(remove_duplicate=False)}
            self.keys.append({n: by_id[id(m.tensor(n))] for n in self.names})

    @property
    def coefficients(self) -> int:
        return self.coef.numel()

    def merged(self) -> dict[str, torch.Tensor]:
        lam = self.coef.clamp(0.0, 1.0)
        out = {}
        for k, n in enumerate(self.names):
            col = k if self.layerwise else 0
            out[n] = self.base[n] + sum(lam[t, col] * tau[n] for t, tau in enumerate(self.taus))
        return out

    def entropy(self, t: int, batch: dict, merged: dict[str, torch.Tensor]) -> torch.Tensor:
        params = {self.keys[t][n]: v for n, v in merged.items()}
        inputs = {k: v.to(self.device) for k, v in batch.items()}
        return prediction_entropy(functional_call(self.models[t].module, params, args=(), kwargs=inputs).logits)

    def state(self) -> dict[str, torch.Tensor]:
        """The merged tensors at the learned coefficients, in the base's dtypes, on the CPU."""
        with torch.no_grad():
            return {n: v.to(self.dtypes[n]).cpu() for n, v in self.merged().items()}


def task_batches(session, settings: AdaMergingSettings) -> list[list[dict]]:
    """Each task's unlabelled `router` inputs, tokenized in batches (the whole split, capped by recipe.router)."""
    cap = session.recipe.router.max_per_task
    tok = router_tokenizer(session)
    return [list(router_batches(session, tok, t, cap, settings.batch_size)) for t in range(len(session.plan.tasks))]


def fit(model: AdaMergingModel, batches: list[list[dict]], settings: AdaMergingSettings,
        progress: Callable[[int], None] = lambda step: None) -> list[float]:
    """Adam on Σ_t entropy(task t's next batch); the summed entropy per step. Batches cycle in a seeded order."""
    order = random.Random(settings.seed)
    queues: list[list[int]] = [[] for _ in batches]
    opt = torch.optim.Adam([model.coef], lr=settings.lr)
    history = []
    for step in range(settings.steps):
        merged = model.merged()
        loss = torch.zeros((), device=model.device)
        for t, task in enumerate(batches):
            if not queues[t]:
                queues[t] = order.sample(range(len(task)), len(task))
            loss = loss + model.entropy(t, task[queues[t].pop()], merged)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
        progress(step)
    return history


GRANULARITIES = {"adamerging_task": (False, "AdaMerging (task-wise)"), "adamerging_layer": (True, "AdaMerging (layer-wise)")}


def run_adamerging(run, settings: AdaMergingSettings, keys: Sequence[str] = tuple(GRANULARITIES)) -> None:
    """AdaMerging at each granularity of `keys` (task-wise, layer-wise), fitted then scored like every static method."""
    from mergetool.baselines.common import entry
    from mergetool.baselines.static import fixed_store, score

    batches = task_batches(run.s, settings)
    device = run.evaluators["validation"].ev.device
    for key in keys:
        layerwise, name = GRANULARITIES[key]
        run.say(f"{key}: learning the coefficients ({settings.steps} steps)")
        start = time.perf_counter()
        model = AdaMergingModel(run.s, layerwise, device, settings.init)
        history = fit(model, batches, settings, progress=lambda step, k=key: run.detail(
            f"{k}: step {step + 1}/{settings.steps}"))
        seconds = round(time.perf_counter() - start, 1)
        store = fixed_store(run.s, model.state())
        val, tst = run.evaluate(lambda sp: score(run.s, store, run.shared, sp)[:2], key)
        lam = model.coef.detach().clamp(0, 1)
        params = {"method": "adamerging", "granularity": "layer" if layerwise else "task",
                  "coefficients": model.coefficients, "steps": settings.steps, "lr": settings.lr,
                  "batch_size": settings.batch_size, "init": settings.init, "wall_seconds": seconds,
                  "entropy_first": history[0], "entropy_last": history[-1],
                  "lambda_mean_per_task": dict(zip(run.p.tasks, lam.mean(1).tolist()))}
        run.out.append(entry(name, key, "static", store.storage_cost(run.shared), val, tst, params))
        store.clear()
        del model


def count_adamerging_steps(test: bool) -> int:
    return 2 * (2 + int(test))
