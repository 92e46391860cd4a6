"""The routed baselines of `mergetool baselines`: Twin, EMR, TALL masks, T-Switch-like and BitDelta, each
under every requested base storage (fp32 as in the papers, then e.g. fp16) and every protocol (common.py).

One cost convention for every method (core/storage.py): C = stored bits / (b⁺·d), counting everything the
method needs at inference except the task heads: its base (or shared expert) at the precision it is stored,
its task-specific payload (bit-packed masks and codes, scales at b⁺ bits, dense vectors at the storage
precision) and its router (an fp32 MLP). The first storage is the entry itself, the others its `variants`.
Hyperparameters (Twin's rank, TALL's λ_t, T-Switch's ρ_t, BitDelta's scale multiplier α_t) are tuned on
validation at the first storage and reused at the others.
"""

from __future__ import annotations

from typing import Optional, Sequence

from mergetool.baselines.common import BaselineRun, entry
from mergetool.baselines.delta import MODELS, PayloadModel
from mergetool.baselines.dynamic import EMRModel, TwinModel, oracle_route

ROUTED = ("twin", "emr", "tall", "tswitch", "bitdelta")
PER_TASK_ARGMAX = ("emr", "tall", "tswitch", "bitdelta")  # route by the argmax task over θ̂_pre's features


def count_routed_steps(methods: Sequence[str], storages: Sequence[str], grids: dict, twin_ranks: Sequence[int],
                       *, test: bool, router: bool) -> int:
    """The progress messages the routed baselines send (for a progress bar's total)."""
    t, r = int(test), int(router)
    n = r * len(storages) if set(PER_TASK_ARGMAX) & set(methods) else 0  # one router per base storage
    for key in (m for m in methods if m in ROUTED):
        for i, _ in enumerate(storages):
            if key == "twin":
                n += 1 + r + (len(set(twin_ranks)) + r + t + r * t if i == 0 else 1 + t + r * (1 + t))
            else:
                tuned = len(grids[key]) if i == 0 and key != "emr" else 1
                n += 1 + tuned + t + r * (1 + t)
    return n


def _variant(cost: float, bd: dict, scored: dict, info: dict, run: BaselineRun) -> dict:
    return {"storage_cost": cost, "storage_breakdown": bd, "validation": scored["validation"],
            "test": scored["test"], "protocols": scored["protocols"],
            "routing": run.routed(info, scored["accuracy"], scored["per_task_accuracy"])}


def _add(run: BaselineRun, name: str, key: str, params: dict, variants: list[dict], **extra) -> None:
    first = variants[0]
    e = entry(name, key, "dynamic", first["storage_cost"], first["validation"], first["test"], params,
              storage_breakdown=first["storage_breakdown"], routing=first["routing"], protocols=first["protocols"],
              **extra)
    e["variants"] = {v["storage_breakdown"]["storage"]: {k: x for k, x in v.items() if k != "routing"} | {
        "routing_accuracy": v["routing"]["accuracy"]} for v in variants[1:]}
    run.out.append(e)


# --- TALL, T-Switch-like, BitDelta -----------------------------------------------------------------------
def _tune(run: BaselineRun, model: PayloadModel, grid: Sequence[float], router_bits: float) -> tuple[list, tuple]:
    """Every grid value for all tasks at once, task given, on validation; each task keeps its best value."""
    ev, T, tasks = run.evaluators["validation"], run.p.T, list(run.p.tasks)
    rows = []
    for v in grid:
        run.say(f"tuning {model.key_name} {model.param}={v}")
        model.choice = [v] * T
        perf, per_task = ev.evaluate(model.state, oracle_route(T), key=model.key)
        b = model.bits()
        rows.append({model.param: v, "performance": perf, "per_task": per_task,
                     "storage_cost": run.cost(b["base"] + b["shared"] + b["per_task"]) + router_bits})
    best = [max(range(len(grid)), key=lambda i, n=n: (rows[i]["per_task"][n], -i)) for n in tasks]
    model.choice = [grid[i] for i in best]
    per_task = {n: rows[best[t]]["per_task"][n] for t, n in enumerate(tasks)}
    return rows, (sum(per_task.values()) / T, per_task)


def run_payload(run: BaselineRun, key: str, grid: Optional[Sequence[float]] = None) -> None:
    name, cls = MODELS[key]
    grid = tuple(grid or cls.grid)
    variants, rows, choice = [], None, None
    for storage in run.storages:
        run.say(f"{key} [{storage} base]: encoding the base")
        model = cls(run.p, run.s.base, run.s.tasks, storage)
        route, info = run.router_for(model.pre, f"base [{storage}]", cache_key=("pre", storage))
        router = run.router_cost(info)
        oracle_val = None
        if choice is None:
            rows, oracle_val = _tune(run, model, grid, router)
            choice = list(model.choice)
        model.choice = list(choice)
        scored = run.protocols(model.state, model.key, route, f"{key} [{storage}]", oracle_val=oracle_val)
        b = model.bits()
        bd = {"base": run.cost(b["base"]), "per_task": run.cost(b["per_task"]),
              "per_task_each": dict(zip(run.p.tasks, map(run.cost, b["per_task_each"]))), "router": router,
              "storage": storage}
        if key == "tall":
            bd["multitask_vector"] = run.cost(b["shared"])
        bd["paper_convention"] = bd["per_task"] + bd.get("multitask_vector", 0.0)  # the papers leave the base out
        cost = bd["base"] + bd.get("multitask_vector", 0.0) + bd["per_task"] + router
        variants.append(_variant(cost, bd, scored, info, run))
        del model
    _add(run, name, key, {model_param(key): dict(zip(run.p.tasks, choice)), "base_storage": run.storages[0]},
         variants, grid=rows)


def model_param(key: str) -> str:
    return MODELS[key][1].param


# --- Twin-Merging and EMR-Merging ------------------------------------------------------------------------
def run_twin(run: BaselineRun, ties, twin_ranks: Sequence[int]) -> None:
    p = run.p
    shared_state = {}
    for l in range(p.L):
        shared_state.update(ties.store.expert(l, tuple(range(p.T))).dense())
    variants, rows, rank = [], [], None
    for storage in run.storages:
        run.say(f"twin [{storage}]: SVD of the task deltas")
        twin = TwinModel(p, shared_state, run.s.tasks, twin_ranks if rank is None else [rank], storage)
        route, info = run.router_for(twin.shared, f"twin [{storage}]")
        oracle_val = routed_val = None
        if rank is None:
            rank, rows, tuned = _tune_rank(run, twin, route, twin_ranks)
            oracle_val, routed_val = (None, tuned) if run.routing == "router" else (tuned["backbone_routed"], None)
        scored = run.protocols(lambda w, r=rank, m=twin: m.state(w, r), None, route, f"twin [{storage}]",
                               oracle_val=oracle_val, routed_val=routed_val)
        bd = {**twin.breakdown(rank), "router": run.router_cost(info)}
        variants.append(_variant(bd["shared"] + bd["per_task"] + bd["router"], bd, scored, info, run))
        del twin
    _add(run, "Twin-Merging", "twin", {"rank": rank, "shared": {"method": "ties", **ties.params},
                                       "base_storage": run.storages[0]}, variants, grid=rows)


def _tune_rank(run: BaselineRun, twin: TwinModel, route, twin_ranks: Sequence[int]) -> tuple[int, list, dict]:
    """Twin's rank on validation under the run's routing (backbone-routed with a router); ties: the smaller."""
    best, rows = None, []
    for r in sorted(set(twin_ranks)):
        run.say(f"tuning twin rank {r}")
        passed = run.routed_pass("validation", lambda w, r=r: twin.state(w, r), route)
        bd = twin.breakdown(r)
        perf = passed["backbone_routed"]["performance"]
        rows.append({"rank": r, "performance": perf, "storage_cost": bd["shared"] + bd["per_task"]})
        if best is None or perf > best[1]["backbone_routed"]["performance"]:
            best = (r, passed)
    return best[0], rows, best[1]


def run_emr(run: BaselineRun) -> None:
    variants, rescalers = [], None
    for storage in run.storages:
        run.say(f"emr [{storage}]: unified vector, masks, rescalers")
        emr = EMRModel(run.p, run.s.base, run.s.tasks, storage)
        route, info = run.router_for(emr.pre, f"base [{storage}]", cache_key=("pre", storage))
        scored = run.protocols(emr.state, emr.key, route, f"emr [{storage}]")
        bd = {**emr.breakdown(), "router": run.router_cost(info)}
        cost = bd["pretrained"] + bd["unified"] + bd["masks"] + bd["rescalers"] + bd["router"]
        bd["paper_convention"] += bd["router"]
        variants.append(_variant(cost, bd, scored, info, run))
        rescalers = rescalers or dict(zip(run.p.tasks, emr.rescalers))
        del emr
    _add(run, "EMR-Merging", "emr", {"rescalers": rescalers, "base_storage": run.storages[0]}, variants)

