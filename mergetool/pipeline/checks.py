"""Checks of a recipe beyond its schema: the merge method, the data files and the models.

`check_recipe` runs them all and reports every problem at once (MultiError), one line each.
"""

from __future__ import annotations

from typing import Optional

from mergetool.core.errors import MergetoolError, MultiError
from mergetool.evaluation.choice import check_split
from mergetool.evaluation.data import read_split
from mergetool.evaluation.images import check_images
from mergetool.evaluation.metrics import REGRESSION, custom_evaluator
from mergetool.evaluation.tasks import label_names, map_labels
from mergetool.merge.methods import check_method as check
from mergetool.models.plan import Plan, build_plan
from mergetool.models.source import resolve_model_ref
from mergetool.recipe.schema import Recipe

SPLITS = ("validation", "test", "router")


def check_method(recipe: Recipe) -> list[MergetoolError]:
    params = dict(recipe.merge.parameters)
    weights = [m.parameters.get("weight", 1.0) for m in recipe.models]
    if any(m.parameters for m in recipe.models):
        params.setdefault("weight", weights)
    try:
        check(recipe.merge.method, params, len(recipe.models))
    except MergetoolError as e:
        key = ("merge", "method") if e.key in (None, "method") else ("merge", "parameters", e.key)
        return [recipe.error(e.message, key, e.fix)]
    return []


def check_data(recipe: Recipe) -> list[MergetoolError]:
    """Every split named in the recipe exists, is readable, non-empty and has its columns; every custom
    evaluator imports and takes (outputs, labels, records)."""
    errors: list[MergetoolError] = []
    for task, cfg in recipe.tasks.items():
        if cfg.kind == "custom":
            try:
                custom_evaluator(cfg.evaluator, f"tasks.{task}.evaluator")
            except MergetoolError as e:
                errors.append(recipe.error(e.message, ("tasks", task, "evaluator"), e.fix, cls=type(e)))
        for split_name in SPLITS:
            split = getattr(cfg, split_name)
            if split is None:
                continue
            key = ("tasks", task, split_name)
            try:
                read_split(split, limit=None)
            except MergetoolError as e:
                located = recipe.error(e.message, key + ("path",), e.fix, cls=type(e))
                located.file = e.file or located.file
                located.line, located.col = (e.line, None) if e.line else (located.line, located.col)
                located.key = ".".join(str(k) for k in key)
                errors.append(located)
    return errors


def check_labels(recipe: Recipe, plan: Plan) -> list[MergetoolError]:
    """Every label in every split is one of its task model's classes (id2label names or ids)."""
    import json


    errors: list[MergetoolError] = []
    for i, (task, entry) in enumerate(zip(plan.tasks, recipe.models)):
        config_path = resolve_model_ref(entry.model) / "config.json"
        cfg = recipe.tasks[task]
        if not config_path.is_file() and not cfg.kind.endswith("_choice"):  # PEFT adapters: no head config
            continue
        names = label_names(json.loads(config_path.read_text())) if config_path.is_file() else []
        for split_name in SPLITS:
            split = getattr(cfg, split_name)
            if split is None or cfg.kind == "custom":
                continue
            if cfg.kind.endswith("_choice"):  # a label indexes into its own row's choices

                errors.extend(check_split(split, f"tasks.{task}.{split_name}"))
                continue
            if cfg.kind == "image_classification":

                errors.extend(check_images(split, f"tasks.{task}.{split_name}"))
            try:
                values = [r[split.label] for r in read_split(split, limit=None)]
                map_labels(values, names, cfg.metric in REGRESSION, file=split.path,
                           key=f"tasks.{task}.{split_name}.label")
            except MergetoolError as e:
                errors.append(e)
    return errors


def check_codecs(recipe: Recipe, plan: Optional[Plan]) -> list[MergetoolError]:
    """Delta codecs need full fine-tunes (an adapter's delta is the adapter itself). A menu of several
    codecs is searched per component (mergetool.search.genome)."""
    errors = []
    if plan is not None and plan.adapter and recipe.uses_delta_codecs:
        errors.append(recipe.error(f"delta codecs store full fine-tunes' deltas; these are {plan.adapter['type']} "
                                   "adapters", ("codecs",), "use codecs: [full] (the default) for adapter zoos"))
    return errors


def check_recipe(recipe: Recipe, *, check_values: bool = True, sources=None) -> Plan:
    """All checks; returns the plan, or raises MultiError listing every problem. Every command that reads
    a recipe (validate, plan, search, baselines, export) runs this before it writes anything."""
    data_errors = check_data(recipe)
    errors = check_method(recipe) + data_errors
    try:
        plan = build_plan(recipe, check_values=check_values, sources=sources)
    except MultiError as e:
        errors.extend(e.errors)
        plan = None
    except MergetoolError as e:
        errors.append(e)
        plan = None
    if plan is not None and not data_errors:
        errors.extend(check_labels(recipe, plan))
    errors.extend(check_codecs(recipe, plan))
    if errors:
        raise MultiError(errors)
    return plan
