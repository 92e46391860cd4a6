"""What every baseline of one `run_baselines` call shares: the run, the entry format, the three protocols.

Protocols (issue #13), scored for every routed method on the same evaluator:
- `oracle`: the task is given (one-hot weights on the true task), the input's own head;
- `backbone_routed`: the router picks the merge weights or the task's payload, the input's own head
  (the protocol of the Twin, EMR and WEMoE papers);
- `end_to_end`: the router also picks the head (the task with the largest router weight), and a misrouted
  input counts as wrong (what `predict` does; `mergetool evaluate`'s rule).
One routed pass gives both routed figures (dynamic.PerInputEvaluator). An entry's `validation`/`test` stay
what they were: backbone-routed when a router is trained, oracle otherwise; `protocols` has all three.
"""

from __future__ import annotations

from typing import Callable, Optional

from mergetool.baselines.dynamic import Features, PerInputEvaluator, oracle_route, train_router
from mergetool.core.grouping import all_shared, all_singletons
from mergetool.core.storage import storage_cost
from mergetool.search.types import RacingSettings

SPLITS = ("validation", "test")
PROTOCOLS = ("oracle", "backbone_routed", "end_to_end")
ROUTING_NOTE = {"oracle": "oracle: one-hot on the true task (no router trained or stored)",
                "router": "router: the project's MLP router trained on the `router` split, over each method's "
                          "own backbone features (Twin: softmax-weighted merge per input; EMR, TALL, T-Switch, "
                          "BitDelta: argmax task); backbone_routed applies the input's own head, end_to_end "
                          "the argmax task's head (a misroute counts as wrong)"}


def as_score(r) -> Optional[dict]:
    """(performance, per_task) → {"performance", "per_task"}; a dict or None is kept as it is."""
    return r if r is None or isinstance(r, dict) else {"performance": r[0], "per_task": r[1]}


def entry(name: str, key: str, kind: str, cost: float, val, test, params: Optional[dict] = None, **extra) -> dict:
    return {"name": name, "id": key, "kind": kind, "storage_cost": cost, "validation": as_score(val),
            "test": as_score(test), "params": params or {}, **extra}


class BaselineRun:
    """What every baseline of one `run_baselines` call shares: the session, the splits, the output rows."""
    def __init__(self, session, test: bool, routing: str, say: Callable[[str], None]):
        self.s, self.p, self.test, self.routing, self.say = session, session.plan, test, routing, say
        self.singles, self.shared = all_singletons(self.p.T, self.p.L), all_shared(self.p.T, self.p.L)
        self.splits = SPLITS if test else ("validation",)
        self.out: list[dict] = []
        self._evaluators: Optional[dict] = None
        self._routers: dict = {}
        self.racing: Optional[RacingSettings] = None
        self.reference: dict = {}
        self.storages: tuple[str, ...] = ("fp32",)
        self.detail: Callable[[str], None] = lambda _: None  # progress within a step (the count does not move)

    def evaluate(self, fn, what: str):
        """fn(split) on validation and, when asked for, on test."""
        self.say(f"{what} (validation)")
        val = fn("validation")
        if self.test:
            self.say(f"{what} (test)")
        return val, fn("test") if self.test else None

    @property
    def evaluators(self) -> dict:
        if self._evaluators is None:
            self._evaluators = {sp: PerInputEvaluator(self.s, sp) for sp in self.splits}
        return self._evaluators

    def router_for(self, state: dict, what: str, cache_key: Optional[tuple] = None) -> tuple:
        """(route, info): the project's router over features of `state` (trained once per cache_key)."""
        if self.routing == "oracle":
            return oracle_route(self.p.T), {"kind": "oracle", "params": 0}
        if cache_key is not None and cache_key in self._routers:
            return self._routers[cache_key]
        self.say(f"{what}: training the router")
        out = train_router(self.s, Features(self.s, state, self.evaluators["validation"].ev.device))
        if cache_key is not None:
            self._routers[cache_key] = out
        return out

    def routed(self, info: dict, accuracy: dict, per_task: Optional[dict] = None) -> dict:
        return {**info, "note": ROUTING_NOTE[self.routing], "accuracy": accuracy,
                **({"per_task_accuracy": per_task} if per_task else {})}

    def router_cost(self, info: dict) -> float:
        return storage_cost(info["params"] * 32, d=self.p.d, base_bits=self.p.base_bits)  # an fp32 MLP

    def cost(self, bits: float) -> float:
        return storage_cost(bits, d=self.p.d, base_bits=self.p.base_bits)

    def routed_pass(self, split: str, build, route, key=None) -> dict:
        """One routed pass: both routed protocols and the routing accuracy (overall and per task)."""
        ev = self.evaluators[split]
        backbone = as_score(ev.evaluate(build, route, key=key))
        return {"backbone_routed": backbone, "end_to_end": as_score(ev.end_to_end),
                "accuracy": ev.routing_accuracy, "per_task_accuracy": dict(ev.per_task_routing)}

    def protocols(self, build, key, route, what: str, oracle_val=None, routed_val: Optional[dict] = None) -> dict:
        """Every protocol of a per-input model on the run's splits: {protocols, routing accuracy, headline}.

        `oracle_val` (performance, per_task) and `routed_val` (a `routed_pass`) are validation figures already
        scored while tuning."""
        oracle = oracle_route(self.p.T)
        prot: dict = {p: {} for p in PROTOCOLS}
        acc, per_task_acc = {}, {}
        for sp in self.splits:
            if sp == "validation" and oracle_val is not None:
                prot["oracle"][sp] = as_score(oracle_val)
            else:
                self.say(f"{what} task given ({sp})")
                prot["oracle"][sp] = as_score(self.evaluators[sp].evaluate(build, oracle, key=key))
            if self.routing != "router":
                continue
            if sp == "validation" and routed_val is not None:
                r = routed_val
            else:
                self.say(f"{what} routed ({sp})")
                r = self.routed_pass(sp, build, route, key)
            prot["backbone_routed"][sp], prot["end_to_end"][sp] = r["backbone_routed"], r["end_to_end"]
            acc[sp], per_task_acc[sp] = r["accuracy"], r["per_task_accuracy"]
        if self.routing != "router":
            prot["backbone_routed"] = prot["end_to_end"] = None
        head = prot["backbone_routed"] or prot["oracle"]
        return {"protocols": prot, "accuracy": acc, "per_task_accuracy": per_task_acc,
                "validation": head["validation"], "test": head.get("test")}
