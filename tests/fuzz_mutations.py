"""Recipe mutations of the fuzz test files: slots of the base recipe with their verdicts.
"""

from __future__ import annotations

import math
from pathlib import Path

from fuzz_files import (
    DELETE,
)
from fuzz_fixtures import (
    World,
)
from fuzz_strategies import (
    INF,
    NAN,
    ODD_PATHS,
    Mut,
    apply,
    choice_slot,
    name_value,
    named_paths,
    number_slot,
    rename_task,
)
from fuzz_support import (
    ANY,
    BAD,
    OK,
    combine,
)
from hypothesis import strategies as st

# ------------------------------------------------------------------------------------------ recipe mutations

def model_ref(world: World) -> st.SearchStrategy:
    refs = [("", BAD), ("/nonexistent-fuzz/model", BAD), ("../nonexistent-model", BAD), ("someorg/not-cached-fuzz", BAD),
            ("pkg:no_such_module_fuzz", BAD), ("pkg:json", BAD), (str(world.data), BAD),
            (str(world.splits["t0"]["validation"]), BAD), ("/dev/null", BAD), (str(world.zoo), BAD),
            (5, BAD), ([], BAD), (None, BAD), ("x" * 300, BAD), (str(world.tasks[0]), ANY), (str(world.base), ANY)]
    return st.sampled_from(refs)


def data_path_slot(world: World, loc: tuple) -> st.SearchStrategy[Mut]:
    label = ".".join(map(str, loc))
    fixed = [(str(world.data), "a folder"), (str(world.base / "config.json"), "a config file"),
             (str(world.base), "a model folder"), (str(world.splits["t0"]["validation"]) + "x", "a missing file")]
    return st.one_of(
        st.sampled_from(ODD_PATHS).map(lambda p: Mut(loc, p, BAD, f"{label} = odd path {p[:30]!r}")),
        st.sampled_from(fixed).map(lambda pf: Mut(loc, pf[0], BAD, f"{label} = {pf[1]}")),
        st.sampled_from([5, None, [], {"a": 1}]).map(lambda v: Mut(loc, v, BAD, f"{label} of type {type(v).__name__}")),
    )


def recipe_slots(world: World, *, search_sized: bool = False) -> st.SearchStrategy[Mut]:
    """One edit of the base recipe with its verdict. Task edits touch t0 only (t1 may be renamed)."""
    t = ("tasks", "t0")
    v = t + ("validation",)
    evals = 2
    merge = st.one_of(
        number_slot(("merge", "parameters", "lambda"), name="merge.parameters.lambda"),
        number_slot(("models", 0, "parameters", "weight"), name="models[0].parameters.weight").map(
            lambda m: m if m.verdict != OK else Mut(m.loc, m.value, ANY, m.label)),
        st.tuples(st.sampled_from(["ties", "dare_ties", "della"]),
                  st.one_of(st.floats(0.01, 1.0), st.sampled_from([0, -1, 2, 1.0001, NAN, INF, "x"]))).map(
            lambda md: Mut(("merge",), {"method": md[0], "parameters": {"density": md[1], "lambda": 1.0}},
                           ANY if isinstance(md[1], float) and 0 < md[1] <= 1 else BAD,
                           f"{md[0]} density={md[1]!r}")),
        st.sampled_from([("tie", BAD), ("", BAD), (5, BAD), ([], BAD), ("TA", ANY), ("linear", ANY), ("wa", ANY),
                         ("slerp", ANY), ("model_stock", ANY), ("passthrough", ANY)]).map(
            lambda mv: Mut(("merge", "method"), mv[0], mv[1], f"merge.method={mv[0]!r}")),
        st.sampled_from([{"densty": 0.5}, {"lambda": [1, 2, 3]}, {"lambda": {"a": 1}}, {"lambda": None}, []]).map(
            lambda p: Mut(("merge", "parameters"), p, BAD, f"merge.parameters={p!r}")),
    )
    quant = st.one_of(
        st.sampled_from([(b, OK) for b in range(2, 9)] + [(32, OK), ("none", OK), (None, OK), (16, BAD), (1, BAD),
                         (9, BAD), (0, BAD), (-1, BAD), ("abc", BAD), (2**70, BAD), (NAN, BAD), (4.5, BAD)]).map(
            lambda bv: Mut(("quantization", "bits"), bv[0], bv[1], f"quantization.bits={bv[0]!r}")),
        choice_slot(("quantization", "granularity"), ["per_tensor", "per_channel"]),
        choice_slot(("quantization", "mode"), ["conditional", "always", "never"]),
    )
    task = st.one_of(
        number_slot(t + ("batch_size",), lo=1, integer=True, name="tasks.t0.batch_size"),
        number_slot(t + ("max_length",), lo=1, integer=True, name="tasks.t0.max_length").map(
            lambda m: m if m.verdict != OK else Mut(m.loc, m.value, ANY, m.label)),  # > the position table: either
        number_slot(v + ("limit",), lo=1, integer=True, name="tasks.t0.validation.limit"),
        choice_slot(t + ("metric",), ["accuracy", "f1", "f1_macro", "matthews"], bad_extra=["acc_norm"]),
        st.sampled_from([("sequence_classification", OK), ("custom", BAD), ("image_classification", BAD),
                         ("causal_lm_choice", BAD), ("nope", BAD), (5, BAD)]).map(
            lambda kv: Mut(t + ("kind",), kv[0], kv[1], f"tasks.t0.kind={kv[0]!r}")),
        st.sampled_from([("text", OK), ("label", ANY), ("nope", BAD), ("", BAD), (None, BAD), (5, BAD)]).map(
            lambda cv: Mut(v + ("text",), cv[0], cv[1], f"tasks.t0.validation.text={cv[0]!r}")),
        st.sampled_from([("label", OK), ("nope", BAD), ("", BAD), (5, BAD), ("text", BAD)]).map(
            lambda cv: Mut(v + ("label",), cv[0], cv[1], f"tasks.t0.validation.label={cv[0]!r}")),
        data_path_slot(world, v + ("path",)),
        data_path_slot(world, t + ("test", "path")),
        data_path_slot(world, t + ("router", "path")),
        st.sampled_from([(v, BAD), (v + ("path",), BAD), (t + ("test",), ANY), (t + ("router",), ANY),
                         (t, BAD)]).map(lambda lv: Mut(lv[0], DELETE, lv[1], f"deleted {'.'.join(lv[0])}")),
        st.sampled_from([("custom", "no_such_module_fuzz:f"), ("custom", "json:dumps"), ("custom", "json"),
                         ("custom", "os:system")]).map(
            lambda ke: Mut(t, {**world.recipe["tasks"]["t0"], "kind": ke[0], "evaluator": ke[1]}, BAD,
                           f"custom evaluator {ke[1]!r}")),
    )
    search = st.one_of(
        number_slot(("search", "population"), lo=2, hi=evals, integer=True, name="search.population"),
        number_slot(("search", "seed"), lo=0, hi=2**32 - 1, integer=True, name="search.seed"),
        st.sampled_from([2, 3, 5] if search_sized else [2, 3, 50, 10**6]).map(
            lambda e: Mut(("search", "evaluations"), e, OK, f"search.evaluations={e}")),
        st.sampled_from([1, 0, -5, "x", NAN]).map(lambda e: Mut(("search", "evaluations"), e, BAD,
                                                                f"search.evaluations={e!r}")),
        choice_slot(("search", "surrogate"), ["random_forest", "none"], bad_extra=["random_forrest"]),
        choice_slot(("search", "init"), ["kmeans", "random"]),
        choice_slot(("search", "crossover"), ["one_point", "uniform"], bad_extra=["two_point"]),
        choice_slot(("search", "precision"), ["fp32"], bad_extra=["fp8", "fp16"]),
        number_slot(("search", "racing", "fraction"), lo=0, hi=1, lo_in=False, name="search.racing.fraction"),
        number_slot(("search", "racing", "confidence"), lo=0, hi=1, lo_in=False, hi_in=False,
                    name="search.racing.confidence"),
        number_slot(("search", "racing", "margin"), lo=0, name="search.racing.margin"),
        st.sampled_from([(None, OK), (True, OK), (False, OK), ("yes", BAD), (5, BAD)]).map(
            lambda rv: Mut(("search", "racing"), rv[0], rv[1], f"search.racing={rv[0]!r}")),
        st.just(Mut(("search", "executor"), "ray", ANY if not search_sized else BAD, "executor ray without a cluster")),
    )
    router = st.one_of(
        number_slot(("router", "epochs"), lo=1, hi=5, integer=True, name="router.epochs").map(
            lambda m: m if m.verdict != BAD or not isinstance(m.value, int) or m.value < 1 else
            Mut(m.loc, m.value, ANY, m.label)),
        number_slot(("router", "lr"), lo=0, lo_in=False, hi=10, name="router.lr").map(
            lambda m: m if m.verdict != BAD or not isinstance(m.value, (int, float)) or not math.isfinite(m.value)
            or m.value <= 0 else Mut(m.loc, m.value, ANY, m.label)),
        number_slot(("router", "max_per_task"), lo=1, integer=True, name="router.max_per_task"),
        st.sampled_from([([8, 8], OK), ([1, 1], OK), ([256], BAD), ([0, 8], BAD), ([-1, 8], BAD), ([8, 8, 8], BAD),
                         ([], BAD), ([NAN, 8], BAD), ("x", BAD), ([10**12, 10**12], ANY)]).map(
            lambda hv: Mut(("router", "hidden"), hv[0], hv[1], f"router.hidden={hv[0]!r}")),
        choice_slot(("router", "features"), ["auto"], bad_extra=["everything"]),
    )
    components = st.sampled_from([
        (["^classifier\\."], OK), ([], BAD), ([".*"], BAD), (["(oops"], BAD), (["^classifier\\.", "^nomatch$"], BAD),
        (["^classifier\\.", "^bert\\.pooler\\."], ANY), ([5], BAD), ("x", BAD), (None, BAD),
    ]).map(lambda pv: Mut(("components", "task_specific"), pv[0], pv[1], f"components.task_specific={pv[0]!r}"))
    components = st.one_of(components, choice_slot(("components", "preset"), ["auto", "bert"],
                                                   bad_extra=["gpt2", "custom"]),
                           choice_slot(("components", "granularity"), ["component", "layer", "kind", "model"]))
    top = st.one_of(
        st.sampled_from([("name",), ("base_model",), ("models",), ("tasks",)]).map(
            lambda loc: Mut(loc, DELETE, BAD, f"deleted {loc[0]}")),
        st.sampled_from([("models", 0, "name"), ("models", 0, "model")]).map(
            lambda loc: Mut(loc, DELETE, BAD, f"deleted models[0].{loc[2]}")),
        st.sampled_from([5, "abc", [], {}, [1], [{}], [{"name": "t0"}], None]).map(
            lambda x: Mut(("models",), x, BAD, f"models={x!r}")),
        st.sampled_from(["abc", [], 5, {}, None, {"t0": None}]).map(lambda x: Mut(("tasks",), x, BAD, f"tasks={x!r}")),
        st.sampled_from(["merge", "search", "router", "quantization", "components"]).flatmap(
            lambda sec: st.sampled_from([[], 5, "x"]).map(lambda x: Mut((sec,), x, BAD, f"{sec}={x!r}"))),
        model_ref(world).map(lambda rv: Mut(("base_model",), rv[0], rv[1], f"base_model={str(rv[0])[:40]!r}")),
        model_ref(world).map(lambda rv: Mut(("models", 1, "model"), rv[0],
                                            rv[1] if rv[1] == BAD else ANY, f"models[1].model={str(rv[0])[:40]!r}")),
        st.sampled_from([(), ("merge",), ("quantization",), ("search",), ("router",), ("models", 0), ("components",),
                         ("tasks", "t0"), ("tasks", "t0", "validation"), ("merge", "parameters")]).flatmap(
            lambda loc: st.sampled_from(["serch", "bitz", "lamda", "validaton", "pathh", "x", "ü", "__class__"]).map(
                lambda k: Mut(loc + (k,), 1, BAD, f"unknown key {'.'.join(map(str, loc + (k,)))}"))),
        st.sampled_from([("", ANY), ("x" * 300, ANY), ("../../x", ANY), ([], BAD), ({}, BAD)]).map(
            lambda nv: Mut(("name",), nv[0], nv[1], f"name={nv[0]!r}"[:60])),
    )
    return st.one_of(merge, quant, task, search, router, components, top)


@st.composite
def mutated_recipe(draw, world: World, *, search_sized: bool = False, min_size: int = 1):
    """(recipe dict, verdict, labels): one edit, sometimes two or three in different sections (one bad
    edit hides another), and maybe task t1 renamed."""
    slots = recipe_slots(world, search_sized=search_sized)
    muts = [draw(slots)] if min_size or draw(st.booleans()) else []
    while muts and len(muts) < 3 and draw(st.integers(0, 3)) == 0:
        m = draw(slots)
        if all((m.loc[:1] or ("<root>",)) != (x.loc[:1] or ("<root>",)) for x in muts):
            muts.append(m)
    recipe = apply(world.recipe, muts)
    verdicts = [m.verdict for m in muts]
    labels = [m.label for m in muts]
    if draw(st.integers(0, 4)) == 0 and isinstance(recipe.get("tasks"), dict) and "t1" in recipe["tasks"]:
        new, verdict = draw(name_value(taken=("t0",)))
        recipe = rename_task(recipe, "t1", new)
        verdicts.append(verdict)
        labels.append(f"task t1 renamed {new!r}")
    return recipe, combine(*verdicts), labels


def recipe_reads(world: World, ex: Path, recipe) -> list:
    return world.reads(ex, *named_paths(recipe, ex))


def task_names(recipe: dict) -> list:
    return [m["name"] for m in recipe["models"]]
