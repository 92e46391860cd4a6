"""Static merges weighted by statistics of each task's data: Fisher merging and RegMean (issue #18).

Both read each task's `router` split (the unlabelled inputs the router trains on; labels are never used) with
that task's own fine-tune, then merge every mergeable tensor at once (merge/weighted_kernels.py); each task
keeps its own head. C = 1, as for every static merge.

- Fisher merging: F_t is the diagonal empirical Fisher of model t, the mean over FISHER_EXAMPLES inputs of
  the squared gradient of log p(ŷ | x), ŷ the model's own prediction, one input at a time (per-example
  gradients, as the estimator is defined). Classification heads only.
- RegMean: G_t = Σ X_tᵀ X_t over the inputs of each linear layer of the components (padding tokens left out),
  on GRAM_EXAMPLES inputs; α (the off-diagonal scale) is tuned on validation over REGMEAN_ALPHAS. Tensors that
  are not linear weights (embeddings, LayerNorm, biases) are averaged.
The estimation cost (inputs used, wall time) is reported with each entry.
"""

from __future__ import annotations

import time

import torch

from mergetool.baselines.dynamic import router_batches, router_tokenizer
from mergetool.core.errors import MergetoolError
from mergetool.evaluation.runner import TaskModel
from mergetool.merge.weighted_kernels import FISHER_FLOOR, fisher_merge, regmean_merge

FISHER_EXAMPLES = 256  # inputs per task for the Fisher diagonal
GRAM_EXAMPLES = 256  # inputs per task for RegMean's Gram matrices
REGMEAN_ALPHAS = (0.5, 0.7, 0.9)
DATA_MERGES = ("fisher", "regmean", "adamerging")  # the baselines that read the router split


def check_router_splits(session, methods) -> None:
    """Fisher, RegMean (and AdaMerging) read each task's `router` split: refuse a task without one."""
    wanted = [m for m in methods if m in DATA_MERGES]
    if not wanted:
        return
    for name in session.plan.tasks:
        if session.recipe.tasks[name].router is None:
            raise MergetoolError(f"{wanted[0]} needs each task's `router` split (unlabelled inputs); task {name!r} "
                                 "has none", key=f"tasks.{name}.router",
                                 fix=f"add `router: {{path: ...}}` to task {name}, or leave {wanted[0]} out of --methods")


def mergeable(session) -> list[str]:
    """The float tensors of every component (what a static merge merges)."""
    return [n for c in session.plan.components for n in c.tensors if session.base.meta(n).dtype.is_floating_point]


def task_model(session, t: int, device) -> TaskModel:
    """Task t's own fine-tune, whole, as a module."""
    s = session
    model = TaskModel(s.plan, s.tasks[t], s.full_precision_store.own_tensors(t), device)
    for l, comp in enumerate(s.plan.components):
        model.load(l, ("task", t), {n: s.tasks[t].get(n) for n in comp.tensors})
    return model


def fisher_diagonal(session, t: int, device, limit: int = FISHER_EXAMPLES, tok=None) -> tuple[dict, int]:
    """({tensor: F_t}, inputs used): mean squared per-example gradient of log p(ŷ|x) of model t (`tok`: the
    router tokenizer, loaded here if not given)."""
    model, names = task_model(session, t, device), mergeable(session)
    params = [model.tensor(n) for n in names]
    fisher = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    for p in params:
        p.requires_grad_(True)
    seen = 0
    with torch.enable_grad():
        for batch in router_batches(session, tok or router_tokenizer(session), t, limit, 1):
            logits = model.forward({k: v.to(device) for k, v in batch.items()}).float()
            if logits.dim() != 2 or logits.shape[-1] < 2:
                raise MergetoolError(f"fisher needs a classification head; task {session.plan.tasks[t]!r} has "
                                     f"outputs of shape {tuple(logits.shape)}", key="--methods",
                                     fix="leave fisher out of --methods for regression or choice tasks")
            logp = torch.log_softmax(logits, -1)[0]
            grads = torch.autograd.grad(logp[logp.argmax()], params, allow_unused=True)
            for f, g in zip(fisher, grads):
                if g is not None:
                    f += g.detach().float() ** 2
            seen += 1
    for p in params:
        p.requires_grad_(False)
    return {n: (f / max(seen, 1)).cpu() for n, f in zip(names, fisher)}, seen


def fisher_state(session, device, say) -> tuple[dict, dict]:
    """The Fisher-merged tensors and the estimation cost."""
    start, fishers, used, tok = time.perf_counter(), [], 0, router_tokenizer(session)
    for t, name in enumerate(session.plan.tasks):
        say(f"fisher: gradients on {name}")
        f, n = fisher_diagonal(session, t, device, FISHER_EXAMPLES, tok)
        fishers.append(f)
        used += n
    state = {n: fisher_merge([src.get(n) for src in session.tasks], [f[n] for f in fishers])
             for n in mergeable(session)}
    return state, {"examples": used, "examples_per_task": FISHER_EXAMPLES, "floor": FISHER_FLOOR,
                   "estimation_seconds": round(time.perf_counter() - start, 1)}


def gram_matrices(session, t: int, device, limit: int = GRAM_EXAMPLES, tok=None) -> tuple[dict, int]:
    """({linear weight: X_tᵀ X_t}, inputs used) over the real (unpadded) tokens of task t's inputs (`tok`: the
    router tokenizer, loaded here if not given)."""
    model, names = task_model(session, t, device), set(mergeable(session))
    by_id = {id(model.tensor(n)): n for n in names}
    grams: dict = {}
    mask: dict = {}

    def hook(module, inputs, name):
        x = inputs[0].detach()
        m = mask.get("tokens")
        x = x[m] if m is not None and x.dim() == 3 and x.shape[:2] == m.shape else x.reshape(-1, x.shape[-1])
        x = x.double()
        grams[name] = grams.get(name, 0) + x.T @ x

    hooks = [mod.register_forward_pre_hook(lambda mod, inp, n=by_id[id(mod.weight)]: hook(mod, inp, n))
             for mod in model.module.modules()
             if isinstance(mod, torch.nn.Linear) and id(mod.weight) in by_id]
    seen = 0
    try:
        with torch.inference_mode():
            for batch in router_batches(session, tok or router_tokenizer(session), t, limit, 16):
                mask["tokens"] = batch["attention_mask"].bool().to(device)
                model.forward({k: v.to(device) for k, v in batch.items()})
                seen += len(batch["input_ids"])
    finally:
        for h in hooks:
            h.remove()
    return {n: g.cpu() for n, g in grams.items()}, seen


class RegMeanStatistics:
    """The Gram matrices of every task, collected once; `state(alpha)` is the merge for one α."""

    def __init__(self, session, device, say):
        start, self.session, self.grams, self.used = time.perf_counter(), session, [], 0
        tok = router_tokenizer(session)
        for t, name in enumerate(session.plan.tasks):
            say(f"regmean: layer inputs of {name}")
            g, n = gram_matrices(session, t, device, GRAM_EXAMPLES, tok)
            self.grams.append(g)
            self.used += n
        self.seconds = round(time.perf_counter() - start, 1)

    def state(self, alpha: float) -> dict:
        s = self.session
        out = {}
        for n in mergeable(s):
            thetas = [src.get(n) for src in s.tasks]
            if all(n in g for g in self.grams):
                out[n] = regmean_merge(thetas, [g[n] for g in self.grams], alpha)
            else:
                out[n] = (torch.stack([x.float() for x in thetas]).mean(0)).to(thetas[0].dtype)
        return out

    def cost(self) -> dict:
        return {"examples": self.used, "examples_per_task": GRAM_EXAMPLES, "estimation_seconds": self.seconds,
                "linear_layers": len(self.grams[0]) if self.grams else 0}


# --- the baselines ------------------------------------------------------------------------------
def run_fisher(run) -> None:
    """Fisher merging: one merge (nothing tuned), scored like every static method."""
    from mergetool.baselines.common import entry
    from mergetool.baselines.static import fixed_store, score

    state, cost = fisher_state(run.s, run.evaluators["validation"].ev.device, run.say)
    store = fixed_store(run.s, state)
    val, tst = run.evaluate(lambda sp: score(run.s, store, run.shared, sp)[:2], "fisher")
    run.out.append(entry("Fisher Merging", "fisher", "static", store.storage_cost(run.shared), val, tst,
                         {"method": "fisher", **cost}))
    store.clear()


def run_regmean(run) -> None:
    """RegMean: the Gram matrices once, then α tuned on validation (the first best on ties)."""
    from mergetool.baselines.common import entry
    from mergetool.baselines.static import fixed_store, score

    stats = RegMeanStatistics(run.s, run.evaluators["validation"].ev.device, run.say)
    rows, best = [], None
    for alpha in REGMEAN_ALPHAS:
        run.say(f"tuning regmean alpha={alpha}")
        store = fixed_store(run.s, stats.state(alpha))
        perf, per_task, cost = score(run.s, store, run.shared, "validation")
        rows.append({"alpha": alpha, "performance": perf})
        if best is None or perf > best[1]:
            best = (alpha, perf, per_task, cost, store)
        else:
            store.clear()
    alpha, perf, per_task, cost, store = best
    if run.test:
        run.say("regmean (test)")
    tst = score(run.s, store, run.shared, "test")[:2] if run.test else None
    run.out.append(entry("RegMean", "regmean", "static", cost, (perf, per_task), tst,
                         {"method": "regmean", "alpha": alpha, **stats.cost()}, grid=rows))
    store.clear()


def count_data_merge_steps(methods, T: int, test: bool) -> int:
    """The progress messages run_fisher and run_regmean send."""
    n = (T + 1 + int(test)) if "fisher" in methods else 0
    return n + ((T + len(REGMEAN_ALPHAS) + int(test)) if "regmean" in methods else 0)
