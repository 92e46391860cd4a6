"""Property-based fuzz suite: every command, on generated bad (and good) input, exits 0 with correct output
or 2 with one `error:` line per problem; never a traceback; writes nothing on failure; never opens a file
outside the inputs it was given (an audit hook on `open`); resource bombs are refused in a bounded
subprocess.

Budget: fixed seeds (`derandomize`), `deadline=None`; each test states its examples per command (a
minimum, checked from the invocation counter); `--fuzz-long` (or FUZZ_LONG=1) runs 10x as many. The
counts per command are printed at the end of the session and written to <basetemp>/fuzz-counts.json.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from fuzz_support import (
    ANY,
    BAD,
    BAD_NUMBERS,
    CANARY,
    COUNTS,
    DELETE,
    INF,
    JSON_JUNK,
    NAN,
    ODD_NUMBERS,
    ODD_PATHS,
    OK,
    Budget,
    Mut,
    Outcome,
    Soft,
    Tamper,
    agree,
    apply,
    choice_slot,
    combine,
    expect,
    failure,
    faults,
    from_schema,
    json_paths,
    name_value,
    named_paths,
    nested,
    number_slot,
    pick,
    predict_line,
    relist,
    rename_task,
    run_cli,
    run_subprocess,
    schema_invalid,
    scratch,
    set_at,
    tampers,
    to_json,
    to_yaml,
    write,
    yaml_text,
)
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from mergetool.testing.toy import make_text_zoo, save_bert_tokenizer, write_jsonl

pytestmark = pytest.mark.timeout(3600 * (10 if os.environ.get("FUZZ_LONG") else 1))

MIXED = [[0, 0, 0, 0, 0, 0, 0, 0], [0, 1, 0, 1, 0, 1, 1, 1]]
LABELS = {"t0": 2, "t1": 3}  # make_text_zoo: t0 has 2 labels, t1 3


def fuzz(n: int):
    """Hypothesis settings of one fuzz test: fixed seed, no deadline, n examples (x10 with --fuzz-long).
    FUZZ_SHRINK=0 skips shrinking (a failing run then reports the first example found, not the smallest)."""
    phases = [p for p in Phase if p != Phase.shrink or os.environ.get("FUZZ_SHRINK", "1") != "0"]
    return settings(max_examples=Budget.examples(n), deadline=None, derandomize=True, database=None, phases=phases,
                    suppress_health_check=list(HealthCheck), print_blob=False, report_multiple_bugs=True)


def run_counted(inner, minimum: dict[str, int]) -> None:
    """Run a @given function and check it ran each command at least its stated number of times
    ("*": all commands together)."""
    start = dict(COUNTS)
    inner()
    for cmd, n in minimum.items():
        ran = (sum(COUNTS.values()) - sum(start.values())) if cmd == "*" else COUNTS[cmd] - start.get(cmd, 0)
        assert ran >= Budget.examples(n), f"{cmd}: {ran} runs, below the stated minimum {Budget.examples(n)}"


# ------------------------------------------------------------------------------------------ the world

@dataclass
class World:
    root: Path
    zoo: Path
    base: Path
    tasks: list
    data: Path
    splits: dict
    secret: Path
    lib: Path
    labels: dict
    run: Path
    recipe: dict

    @property
    def ex_root(self) -> Path:
        return self.root / "ex"

    def reads(self, ex: Path, *more) -> list:
        return [ex, self.zoo, self.data, *more]


def rows(task: str, n: int = 8, words: str = "w1 w2") -> list[dict]:
    return [{"text": f"{words} w{5 + j}", "label": j % LABELS[task]} for j in range(n)]


def base_recipe(w_base: Path, tasks: list, splits: dict, output: str = "run") -> dict:
    return {
        "name": "fz",
        "base_model": str(w_base),
        "models": [{"name": f"t{i}", "model": str(p)} for i, p in enumerate(tasks)],
        "merge": {"method": "ta", "parameters": {"lambda": 0.5}},
        "quantization": {"bits": 8, "granularity": "per_channel", "mode": "conditional"},
        "tasks": {t: {"validation": {"path": str(s["validation"])}, "test": {"path": str(s["test"])},
                      "router": {"path": str(s["router"])}, "batch_size": 8} for t, s in splits.items()},
        "search": {"population": 2, "evaluations": 2, "seed": 0, "racing": None},
        "router": {"epochs": 2, "hidden": [8, 8]},
        "output": output,
    }


@pytest.fixture(scope="session", autouse=True)
def fuzz_report(request, tmp_path_factory):
    """Sets the budget from --fuzz-long; prints and records the invocations per command at the end."""
    try:
        Budget.long = Budget.long or bool(request.config.getoption("--fuzz-long"))
    except ValueError:  # the option is not registered (conftest without it)
        pass
    lines: list[str] = []

    class Reporter:
        def pytest_terminal_summary(self, terminalreporter):
            for line in lines:
                terminalreporter.write_line(line)

    request.config.pluginmanager.register(Reporter(), "fuzz-counts")
    yield
    if COUNTS:
        total = sum(COUNTS.values())
        lines.append(f"fuzz ({'long' if Budget.long else 'default'} budget): {total} command runs: " +
                     ", ".join(f"{k} {v}" for k, v in sorted(COUNTS.items())))
        (tmp_path_factory.getbasetemp() / "fuzz-counts.json").write_text(json.dumps(dict(COUNTS), indent=1))


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    """A tiny BERT zoo with tokenizers, labelled splits, a library exported by the CLI, a finished
    search run, and a secret folder outside every allow-list."""
    root = tmp_path_factory.mktemp("fuzz")
    base, tasks, _ = make_text_zoo(root / "zoo")
    for p in (base, *tasks):
        save_bert_tokenizer(p)
    data = root / "data"
    splits = {t: {s: write_jsonl(data / f"{t}-{s}.jsonl", rows(t)) for s in ("validation", "test", "router")}
              for t in ("t0", "t1")}
    secret = root / "secret"
    write(secret / "secret.json", json.dumps({"api_key": CANARY}))
    write_jsonl(secret / "secret.jsonl", [{"label": 0, "password": CANARY, CANARY: 1}] * 4)
    src = root / "libsrc"
    write(src / "recipe.yaml", to_yaml(base_recipe(base, tasks, splits)))
    write(src / "g.json", json.dumps({"tasks": ["t0", "t1"], "grouping": MIXED}))
    out = run_cli(["export", src / "recipe.yaml", "--grouping", src / "g.json", "--out", root / "lib",
                   "--shard-size", "8KB", "--device", "cpu"])
    assert out.exit_code == 0 and not out.exc_type, out.describe()
    manifest = json.loads((root / "lib" / "manifest.json").read_text())
    labels = {t["name"]: t["labels"] for t in manifest["tasks"]}
    run_src = root / "runsrc"
    write(run_src / "recipe.yaml", to_yaml(base_recipe(base, tasks, splits)))
    out = run_cli(["search", run_src / "recipe.yaml", "-q", "--device", "cpu"])
    assert out.exit_code == 0 and not out.exc_type, out.describe()
    w = World(root, root / "zoo", base, tasks, data, splits, secret, root / "lib", labels, run_src / "run",
              base_recipe(base, tasks, splits))
    COUNTS.clear()  # the fixture's own runs are not fuzz cases
    return w


def write_recipe(ex: Path, recipe, name: str = "recipe.yaml") -> Path:
    return write(ex / name, recipe if isinstance(recipe, (str, bytes)) else to_yaml(recipe))


def copy_lib(world: World, ex: Path, name: str = "lib") -> Path:
    shutil.copytree(world.lib, ex / name, symlinks=True)
    return ex / name


# ------------------------------------------------------------------------------------------ output checks

def validate_ok(out: Outcome):
    if not out.stdout.startswith("ok: ") or "T=" not in out.stdout:
        return f"validate printed {out.stdout[:200]!r}"


def plan_ok(names):
    def check(out: Outcome):
        try:
            plan = json.loads(out.stdout)
        except ValueError:
            return "plan --json did not print JSON"
        if plan.get("tasks") != names or not plan.get("components"):
            return f"plan --json tasks {plan.get('tasks')} != {names} or no components"
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (plan.get("search_space_log10"),)):
            return "search_space_log10 is not finite"
    return check


def predictions_ok(world: World, dest: Path | None, *, lines: list | None, task: str | None):
    """Each prediction names a task of the library (the --task one, if given), one of its labels, a score in
    [0, 1]; input line numbers in order; exactly the expected lines when they are known."""
    def check(out: Outcome):
        text = dest.read_text(encoding="utf-8") if dest is not None else out.stdout
        got = []
        for raw in text.splitlines():
            try:
                p = json.loads(raw)
            except ValueError:
                return f"prediction line is not JSON: {raw[:100]!r}"
            t, score = p.get("task"), p.get("score")
            if t not in world.labels or (task and t != task):
                return f"prediction task {t!r}"
            if p.get("label") not in world.labels[t]:
                return f"label {p.get('label')!r} not among {world.labels[t]}"
            if not isinstance(score, float) or not (0.0 <= score <= 1.0):
                return f"score {score!r} is not a probability"
            got.append(p.get("line"))
        if got != sorted(got) or len(set(got)) != len(got):
            return f"line numbers out of order: {got[:20]}"
        if lines is not None and got != lines:
            return f"predicted lines {got[:20]}, expected {lines[:20]}"
    return check


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


# ------------------------------------------------------------------------------------------ 0. the harness

def test_harness_sees_reads_writes_and_tracebacks(world, tmp_path):
    """The audit hook, the snapshots and the verdicts work (else every property below would pass vacuously)."""
    recipe = write_recipe(world.secret, world.recipe, "elsewhere.yaml")
    try:
        out = run_cli(["validate", recipe], reads=[tmp_path], watch=[tmp_path])
        assert any(str(world.secret) in r for r in out.reads), out.describe()
        with pytest.raises(failure("validate read outside its inputs")):
            expect(out)
    finally:
        recipe.unlink()
    out = run_cli(["schema", "--out", tmp_path / "s.json"], reads=[tmp_path], watch=[tmp_path])
    assert out.exit_code == 0 and out.changes == [f"new {tmp_path / 's.json'}"], out.describe()
    with pytest.raises(failure("schema wrote outside its output")):
        expect(out)
    expect(out, writes=[tmp_path / "s.json"])
    with pytest.raises(failure("schema accepted a bad input")):
        expect(out, BAD, writes=[tmp_path / "s.json"])
    out = run_cli(["inspect", world.lib, "--solution", "x"], reads=[world.lib])
    with pytest.raises(failure("inspect refused a valid input")):
        expect(out, OK)
    from fuzz_support import Guard

    assert Guard.allow is None  # cleared after every run


# ------------------------------------------------------------------------------------------ 1. validate / plan

def test_validate_and_plan_on_mutated_recipes(world):
    """validate and plan agree; a recipe with a known-bad edit is refused by both; a valid one accepted."""
    n = 50

    @fuzz(n)
    @given(case=mutated_recipe(world))
    def inner(case):
        recipe, verdict, labels = case
        why = "; ".join(labels)
        with scratch(world.ex_root) as ex:
            path = write_recipe(ex, recipe)
            reads, watch = recipe_reads(world, ex, recipe), [ex, world.zoo, world.data]
            v = expect(run_cli(["validate", path], reads=reads, watch=watch), verdict, why=why, check_ok=validate_ok)
            names = task_names(recipe) if v.exit_code == 0 else None
            p = expect(run_cli(["plan", path, "--json"], reads=reads, watch=watch), verdict, why=why,
                       check_ok=plan_ok(names))
            if p.exit_code != v.exit_code:
                agree(v, p, f"validate exit {v.exit_code}, plan exit {p.exit_code} on the same recipe ({why})")
            if p.exit_code == 0 and "^bert\\.pooler\\." in json.dumps(recipe.get("components", {})):
                specific = json.loads(p.stdout)["task_specific"]
                if not all(any("pooler" in x for x in names_) for names_ in specific.values()):
                    raise failure("plan ignores a task_specific pattern")(
                        f"pattern ^bert\\.pooler\\. accepted but no pooler tensor is task-specific: {specific}")

    run_counted(inner, {"validate": n, "plan": n})


# ------------------------------------------------------------------------------------------ 2. schema recipes

def test_schema_generated_recipes(world):
    """Recipes generated from `mergetool schema` (sections sometimes replaced by junk), with real model and
    data paths dropped in; whatever the JSON Schema rejects, validate must refuse."""
    n = 40
    out = run_cli(["schema"])
    expect(out, OK, check_ok=lambda o: None if json.loads(o.stdout).get("title") == "mergetool recipe" else "schema")
    schema = json.loads(out.stdout)
    real = {"base_model": str(world.base)}

    @fuzz(n)
    @given(doc=from_schema(schema), use_real=st.booleans())
    def inner(doc, use_real):
        if use_real and isinstance(doc, dict):
            doc = {**doc, **real}
            if isinstance(doc.get("models"), list):
                for i, m in enumerate(doc["models"]):
                    if isinstance(m, dict):
                        m["model"] = str(world.tasks[i % 2])
            if isinstance(doc.get("tasks"), dict):
                for tname, tk in doc["tasks"].items():
                    for s in ("validation", "test", "router"):
                        if isinstance(tk, dict) and isinstance(tk.get(s), dict):
                            tk[s]["path"] = str(world.splits["t0"]["validation"])
        invalid = schema_invalid(schema, doc)
        with scratch(world.ex_root) as ex:
            path = write_recipe(ex, doc)
            expect(run_cli(["validate", path], reads=recipe_reads(world, ex, doc), watch=[ex, world.zoo, world.data]),
                   BAD if invalid else ANY, why=f"schema says {invalid}" if invalid else "schema-valid",
                   check_ok=validate_ok)

    run_counted(inner, {"validate": n})


# ------------------------------------------------------------------------------------------ 3. YAML text

def test_yaml_texts(world):
    """A valid recipe's text with YAML hazards spliced in (aliases, tags, tabs, documents, bytes)."""
    n = 40
    valid = to_yaml(world.recipe)

    @fuzz(n)
    @given(case=yaml_text(valid))
    def inner(case):
        raw, verdict, label = case
        with scratch(world.ex_root) as ex:
            path = write_recipe(ex, raw)
            expect(run_cli(["validate", path], reads=world.reads(ex), watch=[ex, world.zoo, world.data]), verdict,
                   why=label, check_ok=validate_ok)

    run_counted(inner, {"validate": n})


# ------------------------------------------------------------------------------------------ 4. data files

DATA_CASES = [
    # (label, verdict, suffix, content: bytes, or a list of records written as JSON lines)
    ("good", OK, ".jsonl", None),
    ("long texts (past the position table)", OK, ".jsonl", [{"text": "w1 " * 3000, "label": j % 2} for j in range(4)]),
    ("csv", OK, ".csv", b"text,label\nw1 w2,0\nw3 w4,1\n"),
    ("empty file", BAD, ".jsonl", b""),
    ("blank lines only", BAD, ".jsonl", b"\n\n  \n"),
    ("not UTF-8", BAD, ".jsonl", b'{"text": "caf\xe9", "label": 0}\n'),
    ("a line that is not JSON", BAD, ".jsonl", b'{"text": "w1", "label": 0}\n{oops\n'),
    ("a JSON array line", BAD, ".jsonl", b"[1, 2]\n"),
    ("no label column", BAD, ".jsonl", [{"text": "w1"}] * 3),
    ("no text column", BAD, ".jsonl", [{"label": 0}] * 3),
    ("label out of range", BAD, ".jsonl", [{"text": "w1", "label": 7}, {"text": "w2", "label": 0}]),
    ("negative label", BAD, ".jsonl", [{"text": "w1", "label": -1}, {"text": "w2", "label": 0}]),
    ("fractional label", BAD, ".jsonl", [{"text": "w1", "label": 0.5}, {"text": "w2", "label": 1}]),
    ("null label", BAD, ".jsonl", [{"text": "w1", "label": None}]),
    ("list label", BAD, ".jsonl", [{"text": "w1", "label": [0]}]),
    ("unknown string label", BAD, ".jsonl", [{"text": "w1", "label": "zzz"}, {"text": "w2", "label": 0}]),
    ("string labels of the model", ANY, ".jsonl", [{"text": "w1", "label": "c0"}, {"text": "w2", "label": "c1"}]),
    ("bool label", ANY, ".jsonl", [{"text": "w1", "label": True}, {"text": "w2", "label": False}]),
    ("integer text", BAD, ".jsonl", [{"text": 5, "label": 0}]),
    ("null text", BAD, ".jsonl", [{"text": None, "label": 0}]),
    ("list text", BAD, ".jsonl", [{"text": ["w1"], "label": 0}]),
    ("dict text", BAD, ".jsonl", [{"text": {"a": "w1"}, "label": 0}]),
    ("empty text", ANY, ".jsonl", [{"text": "", "label": 0}, {"text": "w1", "label": 1}]),
    ("one example", ANY, ".jsonl", [{"text": "w1", "label": 0}]),
    ("NaN literal", BAD, ".jsonl", b'{"text": "w1", "label": NaN}\n'),
    ("1e400", BAD, ".jsonl", b'{"text": "w1", "label": 0, "x": 1e400}\n'),
    ("nested 100 deep", ANY, ".jsonl", b'{"text": "w1", "label": 0, "x": ' + nested(100).encode() + b"}\n"),
    ("broken csv", BAD, ".csv", b'text,label\n"w1,0\n'),
    ("csv without label", BAD, ".csv", b"text\nw1\n"),
    ("txt suffix", BAD, ".txt", b"w1 w2\n"),
    ("a folder", BAD, "/", None),
    ("missing file", BAD, "missing", None),
    ("BOM", ANY, ".jsonl", b'\xef\xbb\xbf{"text": "w1", "label": 0}\n{"text": "w2", "label": 1}\n'),
]


def data_case(ex: Path, case, base_rows) -> str:
    label, _, suffix, content = case
    if suffix == "/":
        (ex / "datadir").mkdir()
        return str(ex / "datadir")
    if suffix == "missing":
        return str(ex / "missing.jsonl")
    path = ex / f"data{suffix}"
    if content is None:
        write_jsonl(path, base_rows)
    elif isinstance(content, bytes):
        write(path, content)
    else:
        write_jsonl(path, content)
    return str(path)


def test_data_files_validate_and_export_agree(world):
    """Broken data files in any split: validate refuses them, and export refuses whatever validate refuses
    (before it writes anything, RUN/router/ included)."""
    n = 25

    @fuzz(n)
    @given(case=st.sampled_from(DATA_CASES), split=st.sampled_from(["validation", "test", "router"]),
           task=st.sampled_from(["t0", "t1"]))
    def inner(case, split, task):
        label, verdict = case[0], case[1]
        why = f"{task}.{split}: {label}"
        with scratch(world.ex_root) as ex:
            recipe = apply(world.recipe, [])
            recipe["tasks"][task][split]["path"] = data_case(ex, case, rows(task))
            path = write_recipe(ex, recipe)
            write(ex / "g.json", json.dumps({"tasks": ["t0", "t1"], "grouping": MIXED}))
            reads, watch = recipe_reads(world, ex, recipe), [ex, world.zoo, world.data]
            with Soft() as soft:
                v = soft(expect, run_cli(["validate", path], reads=reads, watch=watch), verdict, why=why,
                         check_ok=validate_ok)
                e = soft(expect, run_cli(["export", path, "--grouping", ex / "g.json", "--out", ex / "out",
                                          "--device", "cpu"], reads=reads + [ex], watch=watch), verdict, why=why,
                         writes=[ex / "out", ex / "run"], check_ok=library_ok(world, ex / "out", ex))
                if v.exit_code == 2 and e.exit_code == 0:
                    soft(agree, v, e, f"export built a library from a recipe validate refuses ({why})")

    run_counted(inner, {"validate": n, "export": n})


def library_ok(world: World, lib: Path, ex: Path):
    """An exported library: manifest present, every file with the mode of manifest.json, and
    `inspect --verify` accepts it."""
    def check(out: Outcome):
        if not (lib / "manifest.json").is_file():
            return "no manifest.json in the exported library"
        mode = (lib / "manifest.json").stat().st_mode & 0o777
        odd = {p.name: oct(p.stat().st_mode & 0o777) for p in lib.iterdir() if p.stat().st_mode & 0o777 != mode}
        if odd:
            return f"files with another mode than manifest.json ({oct(mode)}): {odd}"
        i = run_cli(["inspect", lib, "--verify"], reads=[lib], watch=[lib])
        if i.exit_code != 0:
            return f"inspect --verify refuses the exported library: {i.stderr[:300]}"
    return check


# ------------------------------------------------------------------------------------------ 5. search

SEARCH_OPTIONS = [
    ([], OK, "no option"), (["--evaluations", "-1"], BAD, "--evaluations -1"), (["--evaluations", "0"], BAD, "--evaluations 0"),
    (["--seed", "-1"], BAD, "--seed -1"), (["--seed", str(2**70)], BAD, "--seed 2**70"),
    (["--init", "nope"], BAD, "--init nope"), (["--granularity", "nope"], BAD, "--granularity nope"),
    (["--crossover", "two_point"], BAD, "--crossover two_point"), (["--precision", "fp8"], BAD, "--precision fp8"),
    (["--device", "tpu"], BAD, "--device tpu"), (["--evaluations", "abc"], BAD, "--evaluations abc"),
    (["--resume", "--force"], ANY, "--resume --force"), (["--no-surrogate", "--init", "random"], OK, "ablation flags"),
    (["--granularity", "layer"], OK, "--granularity layer"),
]
OUTPUTS = ["file", "under_file", "proc", "library", "deep_new"]


def test_search_refuses_before_writing(world):
    """search on mutated recipes, option overrides and odd outputs: a refused run leaves no run folder
    (no run.json, reference.json or journal); an accepted one writes a readable front."""
    n = 12

    @fuzz(n)
    @given(fault=faults("recipe", "recipe", "option", "output"), data=st.data())
    def inner(fault, data):
        recipe, verdict, labels = data.draw(mutated_recipe(world, search_sized=True)) \
            if fault in ("recipe", "any") else (apply(world.recipe, []), OK, [])
        args, opt_verdict, opt_label = pick(data.draw, SEARCH_OPTIONS, fault in ("option", "any"))
        output = data.draw(st.sampled_from(OUTPUTS)) if fault in ("output", "any") else None
        with scratch(world.ex_root) as ex:
            if output is not None:
                write(ex / "afile", "precious\n")
                recipe["output"] = {"file": str(ex / "afile"), "under_file": str(ex / "afile" / "run"),
                                    "proc": "/proc/fuzz-run", "library": str(copy_lib(world, ex) / "run"),
                                    "deep_new": str(ex / "a" / "b" / "run")}[output]
            path = write_recipe(ex, recipe)
            run_dir = Path(recipe["output"]) if os.path.isabs(str(recipe.get("output"))) else ex / "run"
            out_verdict = {None: OK, "deep_new": OK}.get(output, BAD)
            why = "; ".join(labels + [opt_label, f"output {output}"])
            verdict = combine(verdict, opt_verdict, out_verdict)
            s = expect(run_cli(["search", path, "-q", *args], reads=recipe_reads(world, ex, recipe),
                               watch=[ex, world.zoo, world.data]), verdict, why=why, writes=[run_dir],
                       check_ok=front_ok(run_dir))
            assert s

    run_counted(inner, {"search": n})


def front_ok(run_dir: Path):
    def check(out: Outcome):
        try:
            front = json.loads((run_dir / "search" / "front.json").read_text())
        except (OSError, ValueError) as e:
            return f"no readable front.json: {e}"
        for r in front:
            p, c = r.get("performance"), r.get("storage_cost")
            if not (isinstance(p, float) and 0 <= p <= 1 and isinstance(c, float) and math.isfinite(c) and c > 0):
                return f"front record with P={p!r}, C={c!r}"
    return check


# ------------------------------------------------------------------------------------------ 6. export options

GROUPINGS = [
    ("good", OK, {"tasks": ["t0", "t1"], "grouping": MIXED}),
    ("bare list", OK, MIXED),
    ("tasks reordered", OK, {"tasks": ["t1", "t0"], "grouping": MIXED[::-1]}),
    ("one row", BAD, {"grouping": MIXED[:1]}), ("short rows", BAD, {"grouping": [r[:7] for r in MIXED]}),
    ("id out of range", BAD, {"grouping": [MIXED[0], MIXED[1][:7] + [2]]}),
    ("negative id", BAD, {"grouping": [MIXED[0], MIXED[1][:7] + [-1]]}),
    ("fractional id", BAD, {"grouping": [MIXED[0], MIXED[1][:7] + [0.5]]}),
    ("NaN id", BAD, "NAN"), ("1e400 id", BAD, "HUGE"), ("2**70 id", BAD, {"grouping": [MIXED[0], MIXED[1][:7] + [2**70]]}),
    ("string ids", BAD, {"grouping": [["a"] * 8, ["b"] * 8]}), ("null", BAD, None), ("empty object", BAD, {}),
    ("unknown tasks", BAD, {"tasks": ["t0", "zz"], "grouping": MIXED}),
    ("unknown components", BAD, {"components": ["x"] * 8, "grouping": MIXED}),
    ("not JSON", BAD, b"{oops"), ("empty file", BAD, b""), ("not UTF-8", BAD, b"\xff\xfe[[0]]"),
    ("nested 200 deep", BAD, nested(200).encode()), ("missing file", BAD, "MISSING"), ("a folder", BAD, "DIR"),
]
EXPORT_OUTS = [("new", OK), ("nested new", ANY), ("existing library", BAD), ("existing library --force", OK),
               ("inside a library", BAD), ("a file", BAD), ("under a file", BAD), ("folder with files --force", BAD),
               ("/proc", BAD), ("the recipe's folder", BAD)]
SHARDS = [("2GB", OK), ("8KB", OK), ("1KB", OK), ("0", BAD), ("-1KB", BAD), ("abc", BAD), ("1e400GB", BAD),
          ("", BAD), ("nanGB", BAD), ("2XB", BAD), (str(2**70), ANY)]
EXTRA = [([], OK), (["--device", "tpu"], BAD), (["--all"], BAD), (["--solution", "0"], BAD), (["--budget", "nan"], BAD),
         (["--budget", "-1"], BAD), (["--budget", "1e400"], BAD), (["--solution", "abc"], BAD)]


def test_export_options(world):
    """export --grouping with odd grouping files, targets, shard sizes and options: refused cleanly with
    nothing written (no .tmp-/.old- folders, no RUN/router/), or a library that inspect --verify accepts."""
    n = 20

    @fuzz(n)
    @given(fault=faults("grouping", "target", "shard", "extra"), data=st.data())
    def inner(fault, data):
        glabel, gverdict, gdoc = pick(data.draw, GROUPINGS, fault in ("grouping", "any"))
        tlabel, tverdict = pick(data.draw, EXPORT_OUTS, fault in ("target", "any"))
        size, sverdict = pick(data.draw, SHARDS, fault in ("shard", "any"))
        args, everdict = pick(data.draw, EXTRA, fault in ("extra", "any"))
        with scratch(world.ex_root) as ex:
            path = write_recipe(ex, world.recipe)
            gpath = ex / "g.json"
            if gdoc == "MISSING":
                gpath = ex / "missing.json"
            elif gdoc == "DIR":
                gpath.mkdir()
            elif gdoc in ("NAN", "HUGE"):
                write(gpath, json.dumps({"grouping": [MIXED[0], MIXED[1][:7] + ["@"]]}).replace(
                    '"@"', "NaN" if gdoc == "NAN" else "1e400"))
            else:
                write(gpath, gdoc if isinstance(gdoc, bytes) else json.dumps(gdoc))
            write(ex / "afile", "precious\n")
            force = []
            if tlabel.startswith("existing library"):
                out = copy_lib(world, ex, "target")
                force = ["--force"] if tlabel.endswith("--force") else []
            elif tlabel == "folder with files --force":
                (ex / "home").mkdir()
                write(ex / "home" / "precious.txt", "x")
                out, force = ex / "home", ["--force"]
            else:
                out = {"new": ex / "out", "nested new": ex / "a" / "b" / "out",
                       "inside a library": copy_lib(world, ex) / "sub", "a file": ex / "afile",
                       "under a file": ex / "afile" / "out", "/proc": Path("/proc/fuzz-lib"),
                       "the recipe's folder": ex}[tlabel]
            verdict = combine(gverdict, tverdict, sverdict, everdict)
            why = f"grouping {glabel}; out {tlabel}; shard {size!r}; {' '.join(args)}"
            reads = recipe_reads(world, ex, world.recipe) + [out.parent]  # temp folders beside the target
            expect(run_cli(["export", path, "--grouping", gpath, "--out", out, "--shard-size", size, *force, *args],
                           reads=reads, watch=[ex, world.zoo, world.data]), verdict, why=why,
                   writes=[out, ex / "run"], check_ok=library_ok(world, out, ex))

    run_counted(inner, {"export": n})


# ------------------------------------------------------------------------------------------ 7. tampered libraries

def test_tampered_libraries(world):
    """A library with 1-3 tamperings, checksums rewritten to match or not: inspect --verify, predict and
    export-model exit 0 or 2 cleanly; what inspect --verify accepts, predict and export-model can use;
    predictions are probabilities of the library's labels; nothing under the secret folder is opened."""
    n = 40

    @fuzz(n)
    @given(ts=st.lists(tampers(world.lib), min_size=1, max_size=3), relisted=st.sampled_from([True, True, True, False]))
    def inner(ts, relisted):
        with scratch(world.ex_root) as ex:
            lib = copy_lib(world, ex)
            for t in ts:
                t.apply(lib, world.secret)
            if relisted:
                relist(lib)
            src = write(ex / "in.jsonl", "".join(json.dumps({"text": f"w1 w{i}"}) + "\n" for i in range(5)))
            why = f"{ts} relisted={relisted}"
            with Soft() as soft:
                i = soft(expect, run_cli(["inspect", lib, "--verify"], reads=[lib], watch=[ex]), ANY, why=why)
                p = soft(expect, run_cli(["predict", lib, "--input", src, "--output", ex / "out.jsonl", "-q",
                                          "--device", "cpu"], reads=[ex], watch=[ex]), ANY, why=why,
                         writes=[ex / "out.jsonl"],
                         check_ok=predictions_ok(world, ex / "out.jsonl", lines=[1, 2, 3, 4, 5], task=None))
                m = soft(expect, run_cli(["export-model", lib, "--task", "t0", "--out", ex / "model"], reads=[ex],
                                         watch=[ex]), ANY, why=why, writes=[ex / "model"],
                         check_ok=model_ok(ex / "model", "t0"))
                if i.exit_code == 0 and p.exit_code != 0:
                    soft(agree, i, p, f"inspect --verify accepts the library, predict refuses it ({why})")
                if i.exit_code == 0 and m.exit_code != 0:
                    soft(agree, i, m, f"inspect --verify accepts the library, export-model refuses it ({why})")
                if i.exit_code == 2 and p.exit_code == 0:
                    soft(agree, i, p, f"predict used a library that inspect --verify refuses ({why})")

    run_counted(inner, {"inspect": n, "predict": n, "export-model": n})


def model_ok(out: Path, task: str):
    """export-model wrote a checkpoint that transformers loads with nothing missing or unexpected."""
    def check(o: Outcome):
        import transformers as tf

        try:
            _, info = tf.AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
        except Exception as e:  # noqa: BLE001
            return f"transformers cannot load the exported model: {type(e).__name__}: {str(e)[:200]}"
        if info["missing_keys"] or info["unexpected_keys"]:
            return f"missing {info['missing_keys'][:4]}, unexpected {info['unexpected_keys'][:4]} (initialised at random)"
    return check


# ------------------------------------------------------------------------------------------ 8. predict inputs

PREDICT_OUTPUTS = [("stdout", OK), ("new file", OK), ("existing file", OK), ("the input", BAD), ("a folder", BAD),
                   ("inside the library", BAD), ("missing folder", BAD), ("under a file", BAD)]


@st.composite
def predict_case(draw):
    fault = draw(faults("lines", "lines", "output", "task", "batch", "device", "via"))
    field = draw(st.sampled_from(["text", "text", "text", "body"]))
    bad_lines = fault in ("lines", "any")
    lines = draw(st.lists(predict_line(field, good_only=not bad_lines), min_size=0 if bad_lines else 1, max_size=8))
    sep = draw(st.sampled_from([b"\n", b"\n", b"\r\n"]))
    trailing = draw(st.booleans())
    via = draw(st.sampled_from(["file", "file", "file", "stdin", "csv"] if fault in ("via", "any") else ["file", "stdin"]))
    output = pick(draw, PREDICT_OUTPUTS, fault in ("output", "any"))
    task = pick(draw, [(None, OK), (None, OK), ("t0", OK), ("t1", OK), ("nope", BAD), ("", BAD), ("../t0", BAD)],
                fault in ("task", "any"))
    batch = pick(draw, [("64", OK), ("1", OK), ("3", OK), ("0", BAD), ("-1", BAD), ("abc", BAD), ("1e400", BAD),
                        (str(2**70), ANY)], fault in ("batch", "any"))
    device = pick(draw, [("cpu", OK), ("cpu", OK), ("auto", OK), ("tpu", BAD), ("", BAD)], fault in ("device", "any"))
    skip_bad = draw(st.booleans())
    return field, lines, sep, trailing, via, output, task, batch, device, skip_bad


def test_predict_inputs(world):
    """predict on generated input streams and options (non-JSON, non-UTF-8, missing or non-string text,
    huge texts, empty input, --output as the input / a folder / inside the library ...)."""
    n = 60

    @fuzz(n)
    @given(case=predict_case())
    def inner(case):
        field, lines, sep, trailing, via, (output, overdict), (task, tverdict), (batch, bverdict), \
            (device, dverdict), skip_bad = case
        with scratch(world.ex_root) as ex:
            lib = copy_lib(world, ex)
            if via == "csv":
                body = ("text\n" if field == "text" else "id,body\n").encode() + sep.join(
                    l.raw.replace(b'"', b"") for l in lines) + (sep if trailing else b"")
                kinds, src = [], write(ex / "in.csv", body)
                lverdict = ANY
            else:
                body = sep.join(l.raw for l in lines) + (sep if trailing and lines else b"")
                src = write(ex / "in.jsonl", body)
                kinds = [l.kind for l in lines]
                good = [i + 1 for i, k in enumerate(kinds) if k == "good"]
                if "maybe" in kinds:
                    lverdict = ANY
                elif "bad" in kinds:
                    lverdict = ANY if skip_bad else BAD
                else:
                    lverdict = OK if good else BAD  # an empty input is an error, not "0 predictions"
                if via == "stdin" and output == "the input":
                    output, overdict = "new file", OK
            write(ex / "afile", "precious\n")
            dest = {"stdout": None, "new file": ex / "out.jsonl", "existing file": ex / "afile", "the input": src,
                    "a folder": ex, "inside the library": lib / "preds.jsonl", "missing folder": ex / "no" / "o.jsonl",
                    "under a file": ex / "afile" / "o.jsonl"}[output]
            args = ["predict", lib, "--input", "-" if via == "stdin" else src, "-q", "--batch-size", batch,
                    "--device", device]
            args += ["--output", dest] if dest is not None else []
            args += ["--task", task] if task is not None else []
            args += ["--text-field", field] if field != "text" else []
            args += ["--skip-bad"] if skip_bad else []
            verdict = combine(lverdict, overdict, tverdict, bverdict, dverdict)
            expected = good if verdict == OK and via != "csv" else None
            why = f"lines {lines}; via {via}; output {output}; task {task}; batch {batch}; device {device}; " \
                  f"skip_bad {skip_bad}"
            expect(run_cli(args, reads=[ex], watch=[ex], stdin=body if via == "stdin" else None), verdict, why=why,
                   writes=[dest] if dest is not None else [],
                   check_ok=predictions_ok(world, dest, lines=expected, task=task))

    run_counted(inner, {"predict": n})


# ------------------------------------------------------------------------------------------ 9. evaluate

def test_evaluate(world):
    """evaluate with a recipe whose test data are broken, without --recipe on a library whose own recipe
    points outside it, and with odd --split/--out/--batch-size: the secret folder is never opened nor quoted."""
    n = 20

    @fuzz(n)
    @given(fault=faults("data", "data", "own", "split", "out", "batch", "recipe"), task=st.sampled_from(["t0", "t1"]),
           relisted=st.booleans(), draw=st.data())
    def inner(fault, task, relisted, draw):
        data = draw.draw(st.sampled_from(DATA_CASES)) if fault in ("data", "any") else DATA_CASES[0]
        rfault = pick(draw.draw, EVAL_RECIPES, fault in ("recipe", "any"))
        own = draw.draw(st.sampled_from(["absolute", "parent", "link"])) if fault in ("own", "any") else None
        split = pick(draw.draw, [("test", OK), ("test", OK), ("validation", OK), ("train", BAD), ("", BAD)],
                     fault in ("split", "any"))
        out = pick(draw.draw, [("stdout", OK), ("new", OK), ("inside the library", BAD), ("a folder", BAD),
                               ("missing folder", BAD), ("the recipe", BAD)], fault in ("out", "any"))
        batch = pick(draw.draw, [("8", OK), ("0", BAD), ("-3", BAD), ("x", BAD)], fault in ("batch", "any"))
        (split_name, sverdict), (out_label, overdict), (bs, bverdict) = split, out, batch
        with scratch(world.ex_root) as ex:
            lib = copy_lib(world, ex)
            recipe = rfault[2](apply(world.recipe, []))
            args = ["evaluate", lib, "--split", split_name, "--batch-size", bs, "--device", "cpu"]
            if own is None:
                split_of = (recipe.get("tasks") or {}).get(task, {}).get("test" if split_name != "validation"
                                                                         else "validation")
                if isinstance(split_of, dict):
                    split_of["path"] = data_case(ex, data, rows(task))
                rpath = write_recipe(ex, recipe)
                args += ["--recipe", rpath]
                dverdict, why = combine(data[1], rfault[1]), f"{task} data: {data[0]}; recipe: {rfault[0]}"
                reads = recipe_reads(world, ex, recipe) + [lib]
            else:
                Tamper("recipe_paths", "manifest.json", (), own).apply(lib, world.secret)
                if relisted:
                    relist(lib)
                rpath = write_recipe(ex, recipe)
                dverdict, why = BAD, f"no --recipe; the library's recipe reads the secret folder ({own})"
                reads = [lib]
            dest = {"stdout": None, "new": ex / "e.json", "inside the library": lib / "e.json", "a folder": ex,
                    "missing folder": ex / "no" / "e.json", "the recipe": rpath}[out_label]
            args += ["--out", dest] if dest is not None else []
            verdict = combine(dverdict, sverdict, overdict, bverdict)
            expect(run_cli(args, reads=reads, watch=[ex, world.data, world.secret]), verdict,
                   why=f"{why}; split {split_name}; out {out_label}; batch {bs}", writes=[dest] if dest else [],
                   check_ok=report_ok(dest))

    run_counted(inner, {"evaluate": n})


def _drop_test(r):
    r["tasks"]["t0"].pop("test")
    return r


EVAL_RECIPES = [  # (label, verdict, edit of the base recipe) for evaluate --recipe
    ("as exported", OK, lambda r: r),
    ("task t1 renamed zz", BAD, lambda r: rename_task(r, "t1", "zz")),
    ("a task less", BAD, lambda r: {**r, "models": r["models"][:1], "tasks": {"t0": r["tasks"]["t0"]}}),
    ("no test split for t0", BAD, _drop_test),
    ("tasks swapped", ANY, lambda r: {**r, "models": r["models"][::-1]}),
    ("broken recipe", BAD, lambda r: {**r, "merge": {"method": "tie"}}),
]


def report_ok(dest: Path | None):
    def check(out: Outcome):
        try:
            rep = json.loads(dest.read_text() if dest else out.stdout)
        except (OSError, ValueError):
            return "no JSON report"
        for name, row in rep.get("tasks", {}).items():
            for k in ("oracle", "routed"):
                v = row.get(k)
                if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v)):
                    return f"{name}.{k} = {v!r}"
        if not rep.get("tasks"):
            return "report without tasks"
    return check


# ------------------------------------------------------------------------------------------ 10. export-model

def test_export_model_options(world):
    """export-model with odd tasks, targets, budgets and solutions."""
    n = 25

    @fuzz(n)
    @given(fault=faults("task", "out", "out", "budget", "solution"), data=st.data())
    def inner(fault, data):
        tname, tverdict = pick(data.draw, [("t0", OK), ("t1", OK), ("nope", BAD), ("", BAD), ("../t0", BAD),
                                           ("x" * 300, BAD)], fault in ("task", "any"))
        olabel, overdict = pick(data.draw, [("new", OK), ("nested new", ANY), ("existing folder", BAD),
                                            ("existing --force", ANY), ("inside the library", BAD), ("the library", BAD),
                                            ("a file", BAD), ("under a file", BAD), ("/proc", BAD)],
                                fault in ("out", "any"))
        b, bverdict = pick(data.draw, [(None, OK), (None, OK), ("5", OK), ("1.5", OK), ("0.0001", BAD)] +
                           [(x, BAD) for x in BAD_NUMBERS] + [(x, ANY) for x in ODD_NUMBERS], fault in ("budget", "any"))
        sol, solverdict = pick(data.draw, [(None, OK), (None, OK), ("0", ANY), ("7", BAD), ("-1", BAD), ("abc", BAD)],
                               fault in ("solution", "any"))
        with scratch(world.ex_root) as ex:
            lib = copy_lib(world, ex)
            write(ex / "afile", "precious\n")
            (ex / "existing").mkdir()
            write(ex / "existing" / "precious.txt", "x")
            dest = {"new": ex / "m", "nested new": ex / "a" / "b" / "m", "existing folder": ex / "existing",
                    "existing --force": ex / "existing", "inside the library": lib / "m", "the library": lib,
                    "a file": ex / "afile", "under a file": ex / "afile" / "m", "/proc": Path("/proc/fuzz-m")}[olabel]
            args = ["export-model", lib, "--task", tname, "--out", dest]
            args += ["--force"] if olabel.endswith("--force") else []
            args += ["--budget", b] if b is not None else []
            args += ["--solution", sol] if sol is not None else []
            verdict = combine(tverdict, overdict, bverdict, solverdict)
            why = f"task {tname[:20]!r}; out {olabel}; budget {b!r}; solution {sol!r}"
            expect(run_cli(args, reads=[lib, ex, dest.parent], watch=[ex]), verdict, why=why, writes=[dest],
                   check_ok=model_ok(dest, tname))
            if olabel == "existing --force" and not (ex / "existing" / "precious.txt").exists() and \
                    not (ex / "existing" / "config.json").exists():
                raise failure("export-model --force destroyed a folder")(why)

    run_counted(inner, {"export-model": n})


# ------------------------------------------------------------------------------------------ 11. run folders

RUN_FILES = ["run.json", "search/front.json", "search/reference.json", "search/evaluations.jsonl"]
RUN_JUNK = [v for v in JSON_JUNK if not (isinstance(v, str) and ("/" in v or v.startswith(".")))]


@st.composite
def run_tamper(draw, run: Path):
    name = draw(st.sampled_from(RUN_FILES))
    how = draw(st.sampled_from(["edit", "edit", "replace", "none"]))
    if how == "none":
        return name, how, None, None
    if how == "replace":
        return name, how, None, draw(st.sampled_from(["", "{", "[]", "{}", "null", "5", b"\xff\xfe", nested(5000),
                                                      '[{"id": 0}]', '[{"id": 0, "grouping": 5, "storage_cost": 1}]']))
    text = (run / name).read_text()
    doc = json.loads(text.splitlines()[0]) if name.endswith(".jsonl") else json.loads(text)
    loc = draw(st.sampled_from(json_paths(doc) or [("x",)]))
    return name, how, loc, draw(st.sampled_from(RUN_JUNK + [DELETE]))


def test_run_folder_front_and_export(world):
    """front and export --budget on a finished run whose run.json / front.json / reference.json / journal
    were edited: clean errors, nothing written on failure."""
    n = 20

    @fuzz(n)
    @given(t=run_tamper(world.run), budget=st.sampled_from([("5", OK), ("1.0", ANY), ("0.01", BAD), ("nan", BAD),
                                                          ("-2", BAD), ("x", BAD)]))
    def inner(t, budget):
        name, how, loc, value = t
        b, bverdict = budget
        with scratch(world.ex_root) as ex:
            run = ex / "run"
            shutil.copytree(world.run, run)
            p = run / name
            if how == "replace":
                write(p, value)
            elif how == "edit" and name.endswith(".jsonl"):  # the journal's first record
                lines = p.read_text().splitlines()
                doc = json.loads(lines[0])
                set_at(doc, loc, value)
                lines[0] = to_json(doc)
                write(p, "\n".join(lines) + "\n")
            elif how == "edit":
                doc = json.loads(p.read_text())
                set_at(doc, loc, value)
                write(p, to_json(doc))
            verdict = OK if how == "none" else ANY
            why = f"{how} {name} {loc} = {value!r}"[:300]
            reads = [ex, world.zoo, world.data, world.run.parent]
            with Soft() as soft:
                soft(expect, run_cli(["front", run], reads=reads, watch=[ex, world.zoo, world.data]), verdict, why=why,
                     writes=[run / "search" / "pareto.png"])
                soft(expect, run_cli(["export", run, "--budget", b, "--out", ex / "lib", "--device", "cpu"],
                                     reads=reads, watch=[ex, world.zoo, world.data]), combine(verdict, bverdict),
                     why=f"{why}; budget {b}", writes=[ex / "lib", run / "router"],
                     check_ok=library_ok(world, ex / "lib", ex))

    run_counted(inner, {"front": n, "export": n})


# ------------------------------------------------------------------------------------------ 12. path arguments

ODD_ARGS = ["missing", "empty folder", "/dev/null", "non-UTF-8 file", "empty file", "", ".", "-", "nul byte",
            "long name", "very long path", "a library", "secret link", "/proc/self/status"]


def odd_arg(world: World, ex: Path, kind: str) -> str:
    if kind == "missing":
        return str(ex / "missing")
    if kind == "empty folder":
        (ex / "empty").mkdir(exist_ok=True)
        return str(ex / "empty")
    if kind == "non-UTF-8 file":
        return str(write(ex / "latin.yaml", b"name: caf\xe9\n"))
    if kind == "empty file":
        return str(write(ex / "empty.yaml", b""))
    if kind == "nul byte":
        return str(ex / "a\x00b")
    if kind == "long name":
        return str(ex / ("x" * 300))
    if kind == "very long path":
        return str(ex / "/".join(["y" * 200] * 30))
    if kind == "a library":
        return str(copy_lib(world, ex, "libarg"))
    if kind == "secret link":
        os.symlink(world.secret, ex / "secretlink")
        return str(ex / "secretlink")
    return kind


PATH_COMMANDS = [["validate", "{}"], ["plan", "{}"], ["search", "{}", "-q"], ["inspect", "{}", "--verify"],
                 ["export-model", "{}", "--task", "t0", "--out", "{ex}/m"], ["front", "{}"],
                 ["predict", "{lib}", "--input", "{}", "-q"], ["predict", "{}", "--input", "{ex}/in.jsonl", "-q"],
                 ["evaluate", "{lib}", "--recipe", "{}"], ["export", "{}", "--budget", "1"],
                 ["export", "{recipe}", "--grouping", "{}", "--out", "{ex}/o"], ["schema", "--out", "{}"],
                 ["validate"], ["predict", "{lib}"], ["export-model", "{lib}"], ["inspect", "{lib}", "--nope"],
                 ["predict", "{lib}", "--input"], ["nope"], ["inspect", "{lib}", "--solution", "x"]]


def test_path_arguments_and_usage(world):
    """Every command given a missing / folder / device / non-UTF-8 / NUL / overlong path, and Typer's own
    usage errors (missing option, unknown option, missing value): exit 2 with one `error:` line."""
    n = 40

    @fuzz(n)
    @given(cmd=st.sampled_from(PATH_COMMANDS), kind=st.sampled_from(ODD_ARGS))
    def inner(cmd, kind):
        with scratch(world.ex_root) as ex:
            lib = copy_lib(world, ex)
            write(ex / "in.jsonl", '{"text": "w1"}\n')
            recipe = write_recipe(ex, world.recipe)
            arg = odd_arg(world, ex, kind)
            args = [a.format(arg, ex=ex, lib=lib, recipe=recipe) if "{" in a else a for a in cmd]
            # schema --out may legitimately write a new file; "a library" is a valid argument where one is expected
            schema_new = cmd[0] == "schema" and kind == "missing"
            valid_lib = kind == "a library" and cmd[:2] in (["inspect", "{}"], ["export-model", "{}"], ["predict", "{}"])
            verdict = ANY if schema_new or valid_lib else BAD
            reads = [ex, world.zoo, world.data] + ([world.secret] if kind == "secret link" else [])
            expect(run_cli(args, reads=reads, watch=[ex, world.zoo, world.data], cwd=ex), verdict,
                   why=f"{' '.join(cmd)} with {kind}", writes=[arg, ex / "m"] if schema_new or valid_lib else [])

    run_counted(inner, {"*": n})


# ------------------------------------------------------------------------------------------ 13. baselines

def test_baselines_refuse_bad_recipes(world):
    """baselines on recipes with a known-bad edit: refused before any evaluation, nothing written."""
    n = 8

    @fuzz(n)
    @given(m=recipe_slots(world).filter(lambda m: m.verdict == BAD))
    def inner(m):
        recipe = apply(world.recipe, [m])
        with scratch(world.ex_root) as ex:
            path = write_recipe(ex, recipe)
            expect(run_cli(["baselines", path], reads=recipe_reads(world, ex, recipe),
                           watch=[ex, world.zoo, world.data]), BAD, why=m.label)

    run_counted(inner, {"baselines": n})


# ------------------------------------------------------------------------------------------ 14. resource cases

def _laughs(levels: int = 9, width: int = 10) -> str:
    lines = ['a0: &a0 "lol"']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def _resource_cases(world: World, ex: Path) -> dict:
    """id -> (args, stdin bytes or None). Built lazily in `ex` (a folder of the test)."""
    recipe_text = to_yaml(world.recipe)

    def lib_copy(name):
        return copy_lib(world, ex, name)

    cases = {}
    cases["billion-laughs"] = (["validate", write(ex / "laughs.yaml", _laughs() + recipe_text)], None)
    params = recipe_text.replace("  parameters:\n    lambda: 0.5\n",
                                 "  parameters:\n    lambda: 0.5\n    x: *a9\n")
    cases["billion-laughs-in-merge-parameters"] = (["validate", write(ex / "laughs2.yaml", _laughs() + params)], None)
    for depth in (20_000, 100_000):
        cases[f"yaml-flow-nested-{depth}"] = (["validate", write(ex / f"deep{depth}.yaml", recipe_text + "deep: " +
                                                                 nested(depth) + "\n")], None)
    cases["yaml-block-nested-20000"] = (["validate", write(ex / "block.yaml", recipe_text + "deep:\n" + "".join(
        " " * i + "- \n" for i in range(1, 20_000)))], None)
    big = "".join(f"k{i}: {i}\n" for i in range(600_000))
    cases["recipe-10MB-600k-unknown-keys"] = (["validate", write(ex / "big.yaml", recipe_text + big)], None)
    cases["predict-jsonl-nested-100000"] = (["predict", lib_copy("lib-p"), "--input", write(
        ex / "deep.jsonl", '{"text": "w1", "x": ' + nested(100_000) + "}\n"), "-q", "--device", "cpu"], None)
    lm = lib_copy("lib-m")
    write(lm / "manifest.json", '{"format_version": 1, "x": ' + nested(100_000) + "}")
    cases["manifest-nested-100000"] = (["inspect", lm, "--verify"], None)
    lh = lib_copy("lib-h")
    shard = sorted(lh.glob("heads-*.safetensors"))[0]
    raw = shard.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header)[:-1] + ', "deep": ' + nested(100_000) + "}"
    text_b = text.encode() + b" " * (-len(text) % 8)
    shard.write_bytes(len(text_b).to_bytes(8, "little") + text_b + raw[8 + n:])
    relist(lh)
    cases["safetensors-header-nested-100000"] = (["predict", lh, "--input", write(ex / "in.jsonl", '{"text": "w1"}\n'),
                                                  "-q", "--device", "cpu"], None)
    lc = lib_copy("lib-c")
    write(lc / "config.json", '{"model_type": "bert", "x": ' + nested(100_000) + "}")
    relist(lc)
    cases["config-json-nested-100000"] = (["predict", lc, "--input", ex / "in.jsonl", "-q", "--device", "cpu"], None)
    data = write(ex / "deepdata.jsonl", '{"text": "w1", "label": 0, "x": ' + nested(100_000) + "}\n")
    r = apply(world.recipe, [])
    r["tasks"]["t0"]["validation"]["path"] = str(data)
    cases["data-jsonl-nested-100000"] = (["validate", write_recipe(ex, r, "deepdata.yaml")], None)
    r = apply(world.recipe, [])
    r["tasks"]["t0"]["validation"]["path"] = "/dev/zero"
    cases["data-is-dev-zero"] = (["validate", write_recipe(ex, r, "zero.yaml")], None)
    cases["grouping-nested-100000"] = (["export", write_recipe(ex, world.recipe, "g.yaml"), "--grouping",
                                        write(ex / "deepg.json", nested(100_000)), "--out", ex / "gout"], None)
    cases["stdin-pipe-not-utf8"] = (["predict", lib_copy("lib-s"), "--input", "-", "-q", "--device", "cpu"],
                                    b'{"text": "w1"}\n' * 50 + b'{"text": "caf\xe9"}\n')
    return cases


RESOURCE_IDS = ["billion-laughs", "billion-laughs-in-merge-parameters", "yaml-flow-nested-20000",
                "yaml-flow-nested-100000", "yaml-block-nested-20000", "recipe-10MB-600k-unknown-keys",
                "predict-jsonl-nested-100000", "manifest-nested-100000", "safetensors-header-nested-100000",
                "config-json-nested-100000", "data-jsonl-nested-100000", "data-is-dev-zero", "grouping-nested-100000",
                "stdin-pipe-not-utf8"]
RESOURCE_TIMEOUT = 60.0
RESOURCE_MEMORY = 4 << 30


@pytest.fixture(scope="module")
def resource_results(world, tmp_path_factory):
    """Every resource case run once, two at a time, each in `python -m mergetool` under RLIMIT_AS 4 GiB
    and a 60 s timeout: id -> (Proc, snapshot diff of its folder)."""
    from fuzz_support import diff, snapshot

    ex = tmp_path_factory.mktemp("resource")
    cases = _resource_cases(world, ex)
    assert sorted(cases) == sorted(RESOURCE_IDS)
    before = snapshot([ex])

    def one(item):
        name, (args, stdin) = item
        return name, run_subprocess(args, cwd=ex, timeout=RESOURCE_TIMEOUT, memory=RESOURCE_MEMORY, stdin=stdin)

    with ThreadPoolExecutor(2) as pool:
        results = dict(pool.map(one, cases.items()))
    return results, diff(before, snapshot([ex]))


@pytest.mark.parametrize("case", RESOURCE_IDS)
def test_resource_case(case, resource_results):
    """Bombs and deep documents: exit 2 with at most 21 `error:` lines, no traceback, within 60 s and 4 GiB."""
    results, changes = resource_results
    p = results[case]
    shown = f"rc={p.rc} signal={p.signal} timed_out={p.timed_out} in {p.elapsed:.1f}s\nstderr: {p.stderr[-1500:]}"
    assert not p.timed_out, f"{case}: no answer within {RESOURCE_TIMEOUT:.0f} s\n{shown}"
    assert p.signal is None, f"{case}: killed by signal {p.signal}\n{shown}"
    assert "Traceback" not in p.stdout + p.stderr, f"{case}: traceback\n{shown}"
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert p.rc == 2, f"{case}: exit {p.rc}\n{shown}"
    assert lines and all(x.startswith("error: ") for x in lines) and len(lines) <= 21, \
        f"{case}: {len(lines)} stderr lines, not 1..21 `error:` lines\n{shown}"
    assert CANARY not in p.stdout + p.stderr


def test_resource_cases_write_nothing(resource_results):
    """No resource case left a file behind (its folder is the same before and after all of them)."""
    _, changes = resource_results
    assert not changes, changes

