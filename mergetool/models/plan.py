"""The component plan: which tensors of which models form which component.

Every tensor of every model lands in exactly one place: a component (mergeable, searched over),
a task's own tensors (`task_specific`: heads, kept per task), a non-float buffer (checked equal),
or `base_only` (present in the base but in no task model, e.g. a pooler the heads dropped).
Anything else refuses the plan, with the list of offenders.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field
from typing import Optional

import torch

from mergetool.core.errors import MergetoolError, MultiError, PlanError
from mergetool.core.grouping import search_space_log10
from mergetool.core.storage import storage_cost
from mergetool.models.presets import Classifier, adapter_module_weight, coarsen, preset_for, sort_key
from mergetool.models.source import ModelSource, open_model
from mergetool.recipe.schema import Recipe

SHOW = 6  # offenders named per error line


@dataclass(frozen=True)
class Component:
    name: str
    kind: str
    layer: Optional[int]
    stack: Optional[str]
    tensors: tuple[str, ...]
    params: int

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "layer": self.layer, "stack": self.stack,
                "tensors": list(self.tensors), "params": self.params}


@dataclass(frozen=True)
class Plan:
    tasks: tuple[str, ...]
    components: tuple[Component, ...]
    task_specific: dict[str, tuple[str, ...]]
    buffers: tuple[str, ...]
    base_only: tuple[str, ...]
    d: int  # float parameters in the base's mergeable components: the normaliser of Eq. 8
    base_bits: int  # b+: the base's stored float width
    preset: str
    granularity: str
    model_type: Optional[str]
    adapter: Optional[dict] = None  # {"type": "LORA"|"IA3", "frozen": [...], "frozen_params": n}
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def T(self) -> int:
        return len(self.tasks)

    @property
    def L(self) -> int:
        return len(self.components)

    @property
    def search_space_log10(self) -> float:
        return search_space_log10(self.T, self.L)

    @property
    def individual_cost(self) -> float:
        """C of keeping every task model whole in full precision (T for full fine-tunes)."""
        mergeable = sum(c.params for c in self.components)
        return storage_cost(self.T * mergeable * self.base_bits, d=self.d, base_bits=self.base_bits,
                            frozen_base=bool(self.adapter))

    def head_params(self, task: str) -> int:
        return sum(math.prod(self.shapes.get(f"{task}/{n}", ())) for n in self.task_specific[task])

    def to_json(self) -> dict:
        return {
            "tasks": list(self.tasks),
            "components": [c.to_json() for c in self.components],
            "task_specific": {t: list(v) for t, v in self.task_specific.items()},
            "uncovered": [],
            "buffers": list(self.buffers),
            "base_only": list(self.base_only),
            "total_params": self.d,
            "base_bits": self.base_bits,
            "T": self.T,
            "L": self.L,
            "search_space_log10": self.search_space_log10,
            "individual_storage": self.individual_cost,
            "preset": self.preset,
            "granularity": self.granularity,
            "model_type": self.model_type,
            "adapter": self.adapter,
        }


def open_models(recipe: Recipe) -> tuple[ModelSource, list[ModelSource]]:
    """Open the base and every task model lazily; refuses missing paths with located errors."""
    errors: list[MergetoolError] = []
    base = None
    try:
        base = open_model(recipe.base_model, key="base_model")
    except MergetoolError as e:
        errors.append(recipe.error(e.message, "base_model", e.fix, cls=type(e)))
    tasks: list[ModelSource] = []
    for i, m in enumerate(recipe.models):
        try:
            tasks.append(open_model(m.model, key=f"models[{i}].model",
                                    base_type=base.model_type if base else None))
        except MergetoolError as e:
            errors.append(recipe.error(e.message, ("models", i, "model"), e.fix, cls=type(e)))
    if errors:
        raise MultiError(errors)
    return base, tasks


def build_plan(recipe: Recipe, *, check_values: bool = True,
               sources: Optional[tuple[ModelSource, list[ModelSource]]] = None) -> Plan:
    """Decompose the recipe's models into components; raise MultiError listing every problem."""
    base, tasks = sources or open_models(recipe)
    names = recipe.task_names
    errors: list[MergetoolError] = []

    def fail(msg: str, key, fix: Optional[str] = None) -> None:
        errors.append(recipe.error(msg, key, fix, cls=PlanError))

    def stop_if_failed() -> None:
        if errors:
            raise MultiError(errors[:20])

    preset = _check_architecture(recipe, base, tasks, fail)
    stop_if_failed()
    ts_rx = [re.compile(p) for p in recipe.components.task_specific]
    ts_names = _task_specific_names(recipe, tasks, ts_rx, fail)  # normalised or checkpoint names match
    is_ts = lambda n: n in ts_names or any(rx.search(n) for rx in ts_rx)  # noqa: E731
    task_specific = {t: tuple(sorted(n for n in src.keys() if is_ts(n))) for t, src in zip(names, tasks)}
    shared = [set(n for n in src.keys() if not is_ts(n)) for src in tasks]
    union = set().union(*shared)
    _check_presence(names, shared, union, fail)
    stop_if_failed()
    _check_shapes(base, names, tasks, union, fail)
    buffers = tuple(sorted(n for n in union if not tasks[0].meta(n).is_float))
    floats = sorted(n for n in union if tasks[0].meta(n).is_float)
    groups = _classify(recipe, preset, base, tasks, floats, fail)
    stop_if_failed()
    if check_values:
        _check_values(recipe, base, tasks, floats, buffers, fail)
        stop_if_failed()
    base_only = () if tasks[0].is_adapter else tuple(sorted(
        n for n in base.keys() if n not in union and not is_ts(n)))
    shapes = {f"{t}/{n}": src.meta(n).shape for t, src in zip(names, tasks) for n in task_specific[t]}
    return _assemble_plan(recipe, preset, base, tasks, groups, is_ts, task_specific=task_specific,
                          buffers=buffers, base_only=base_only, shapes=shapes)


def _task_specific_names(recipe: Recipe, tasks: list[ModelSource], ts_rx: list, fail) -> set[str]:
    """Normalised names whose normalised or checkpoint name a task_specific pattern matches. A pattern the
    user wrote that matches no tensor is an error (the recipe's defaults may match nothing)."""
    found: set[str] = set()
    hit = [False] * len(ts_rx)
    for src in tasks:
        for n in src.keys():
            for i, rx in enumerate(ts_rx):
                if rx.search(n) or rx.search(src.checkpoint_name(n)):
                    found.add(n)
                    hit[i] = True
    if "task_specific" in recipe.components.model_fields_set:
        for i, ok in enumerate(hit):
            if not ok:
                fail(f"pattern {ts_rx[i].pattern!r} matches no tensor of the task models",
                     ("components", "task_specific", i), _names_hint(ts_rx[i].pattern, tasks[0].keys()))
    return found


def _names_hint(pattern: str, names) -> str:
    """Fix for a pattern that matched nothing: the (normalised) names closest to it."""
    plain = re.sub(r"\(\?P<\w+>|[\\^$()?*+\[\]]", "", pattern)
    close = difflib.get_close_matches(plain, list(names), n=3, cutoff=0.3)
    shown = ", ".join(close) if close else ", ".join(list(names)[:3])
    return f"patterns match tensor names without the backbone prefix, e.g. {shown}"


def _check_presence(names, shared: list[set], union: set, fail) -> None:
    """A shared tensor must be in every task model."""
    for n in sorted(union):
        lacking = [t for t, s in zip(names, shared) if n not in s]
        if lacking:
            fail(f"tensor {n!r} is missing in {', '.join(lacking)}", "models",
                 "add a regex matching it to components.task_specific if it is a per-task head")


def _check_shapes(base: ModelSource, names, tasks: list[ModelSource], union: set, fail) -> None:
    """Shapes and dtypes are identical across models (and, for full models, the base) unless task-specific."""
    adapters = tasks[0].is_adapter
    for n in sorted(union):
        metas = [(t, s.meta(n)) for t, s in zip(names, tasks)]
        if adapters and n.endswith((".lora_A.weight", ".lora_B.weight")):
            continue  # LoRA ranks may differ; the merge works on B@A
        if not adapters and n in base:
            metas.insert(0, ("base", base.meta(n)))
        if len({m.shape for _, m in metas}) > 1:
            listing = ", ".join(f"{list(m.shape)} in {t}" for t, m in metas)
            fail(f"tensor {n!r} has different shapes: {listing}", "components.task_specific",
                 f"add '^{re.escape(n.rsplit('.', 1)[0])}\\.' to components.task_specific")
        elif not adapters and n not in base:
            fail(f"tensor {n!r} is in every task model but not in the base model", "base_model",
                 "check base_model, or add it to components.task_specific if it is a head")
        elif len({m.is_float for _, m in metas}) > 1:
            fail(f"tensor {n!r} is floating point in some models and not in others", "models")


def _classify(recipe: Recipe, preset: str, base: ModelSource, tasks: list[ModelSource], floats: list[str],
              fail) -> dict[str, dict]:
    """Every mergeable float tensor into its component slot: {component name: kind, layer, stack, tensors}."""
    classify = Classifier(preset, recipe.components.rules)
    adapters = tasks[0].is_adapter
    groups: dict[str, dict] = {}
    uncovered = []
    for n in floats:
        target = adapter_module_weight(n) if adapters else n
        slot = classify.slot(target) if target else None
        if slot is None:
            uncovered.append(n)
            continue
        if adapters and not _adapter_fits(n, target, base, tasks):
            fail(f"adapter tensor {n!r} does not fit the base weight {target!r} "
                 f"({list(base.meta(target).shape) if target in base else 'missing'})", "models",
                 "the adapters must be trained on this base_model")
            continue
        cname, kind, layer, stack = coarsen(slot, recipe.components.granularity)
        g = groups.setdefault(cname, {"kind": kind, "layer": layer, "stack": stack, "tensors": []})
        g["tensors"].append(n)
    for i, (rx, _) in enumerate(classify.user):
        if i not in classify.used:
            fail(f"rule pattern {rx.pattern!r} matches no mergeable tensor", ("components", "rules", i, "pattern"),
                 _names_hint(rx.pattern, floats))
    if uncovered:
        more = f" and {len(uncovered) - SHOW} more" if len(uncovered) > SHOW else ""
        fail(f"{len(uncovered)} tensor(s) are not covered by preset {preset!r}: "
             f"{', '.join(uncovered[:SHOW])}{more}", "components",
             "add a components.rules entry (name, pattern) or a task_specific regex for them")
    return groups


def _assemble_plan(recipe: Recipe, preset: str, base: ModelSource, tasks: list[ModelSource], groups: dict,
                   is_ts, **fields) -> Plan:
    """The Plan: components in layer order, d, b⁺ (the base's dominant float width) and adapter facts."""
    meta_src = tasks[0]
    components = tuple(sorted(
        (Component(name, g["kind"], g["layer"], g["stack"], tuple(g["tensors"]),
                   sum(meta_src.meta(n).numel for n in g["tensors"])) for name, g in groups.items()),
        key=lambda c: sort_key(c.kind, c.layer, c.stack, c.name)))
    if not components or not any(c.params for c in components):
        raise MergetoolError("no parameter is left to merge: `task_specific` (or the rules) claim every tensor",
                             file=str(recipe.path) if recipe.path else None, key="components.task_specific",
                             fix="list only the task heads, e.g. ['^classifier\\.']")
    base_float = [n for n in base.keys() if base.meta(n).is_float and not is_ts(n) and n not in fields["base_only"]]
    adapter_info = None
    if tasks[0].is_adapter:
        adapter_info = {"type": str(tasks[0].peft_config.peft_type.value),
                        "frozen_params": sum(base.meta(n).numel for n in base_float)}
        d = adapter_info["frozen_params"]
    else:
        d = sum(c.params for c in components)
    dtypes = [base.meta(n).dtype for n in base_float]
    base_bits = 16 if dtypes and max(set(dtypes), key=dtypes.count) in (torch.float16, torch.bfloat16) else 32
    return Plan(tasks=recipe.task_names, components=components, d=d, base_bits=base_bits, preset=preset,
                granularity=recipe.components.granularity, model_type=base.model_type,
                adapter=adapter_info, **fields)


def _adapter_fits(name: str, target: str, base: ModelSource, tasks: list[ModelSource]) -> bool:
    """A LoRA A/B pair must multiply out to the base weight's shape; IA3 scales one of its dims."""
    if target not in base:
        return False
    out_dim, in_dim = (tuple(base.meta(target).shape) + (1,))[:2]
    for src in tasks:
        shape = src.meta(name).shape
        if name.endswith(".lora_A.weight") and shape[-1] != in_dim:
            return False
        if name.endswith(".lora_B.weight") and shape[0] != out_dim:
            return False
        if name.endswith(".ia3_l") and max(shape) not in (out_dim, in_dim):
            return False
    return True


def _check_architecture(recipe: Recipe, base: ModelSource, tasks: list[ModelSource], fail) -> str:
    btype = base.model_type
    if base.is_adapter:
        fail("base_model is a PEFT adapter; it must be the full pre-trained model", "base_model")
        return "custom"
    kinds = {t.is_adapter for t in tasks}
    if len(kinds) > 1:
        fail("task models mix full fine-tunes and PEFT adapters", "models", "use one kind for all tasks")
    for i, src in enumerate(tasks):
        if src.is_adapter:
            ptype = str(src.peft_config.peft_type.value)
            if ptype not in ("LORA", "IA3"):
                fail(f"PEFT type {ptype} is not supported (LoRA and IA3 are)", ("models", i, "model"))
        elif src.model_type != btype:
            fail(f"architecture {src.model_type!r} differs from the base model's {btype!r}",
                 ("models", i, "model"), "all task models must be fine-tunes of base_model")
    preset = recipe.components.preset
    detected = preset_for(btype)
    if preset == "auto":
        if detected is None:
            fail(f"no preset knows model_type {btype!r}", "components.preset",
                 "use preset: custom with components.rules")
            return "custom"
        return detected
    if preset != "custom" and detected != preset:
        fail(f"preset {preset!r} does not match the architecture {btype!r}", "components.preset",
             f"use preset: {detected or 'custom'}" + (" (or auto)" if detected else ""))
    return preset


def _check_values(recipe: Recipe, base: ModelSource, tasks: list[ModelSource], floats: list[str],
                  buffers: tuple[str, ...], fail) -> None:
    """NaN/Inf in any float tensor, and buffers that differ between models (one tensor at a time)."""
    named = [("base_model", base)] + [(("models", i, "model"), s) for i, s in enumerate(tasks)]
    for key, src in named:
        bad = [n for n in src.keys() if src.meta(n).is_float and not torch.isfinite(src.get(n)).all()]
        src.close()  # unmap: a full scan must not keep every model's pages resident
        if bad:
            fail(f"{len(bad)} tensor(s) hold NaN or Inf: {', '.join(bad[:SHOW])}", key,
                 "re-export the checkpoint; merging non-finite weights is undefined")
    for n in buffers:
        ref = tasks[0].get(n)
        others = [base] if n in base else []
        diff = [s.label for s in tasks[1:] + others if not torch.equal(s.get(n), ref)]
        if diff:
            fail(f"non-float buffer {n!r} differs in {', '.join(diff)}", "models",
                 "buffers cannot be merged; make them equal or mark them task_specific")
