"""Fuzz suite, part 1: the harness, validate/plan on mutated and schema-generated recipes, YAML texts, data files.
See tests/fuzz_fixtures.py and tests/fuzz_support.py (budget, counts, --fuzz-long).
"""

from __future__ import annotations

import json
import os

import pytest
from fuzz_files import (
    to_yaml,
    write,
)
from fuzz_fixtures import (
    DATA_CASES,
    MIXED,
    data_case,
    fuzz,
    library_ok,
    plan_ok,
    rows,
    run_counted,
    validate_ok,
    write_recipe,
)
from fuzz_mutations import (
    mutated_recipe,
    recipe_reads,
    task_names,
)
from fuzz_strategies import (
    apply,
    from_schema,
    schema_invalid,
    scratch,
    yaml_text,
)
from fuzz_support import (
    ANY,
    BAD,
    OK,
    Soft,
    agree,
    expect,
    failure,
    run_cli,
)
from hypothesis import given
from hypothesis import strategies as st

pytestmark = [pytest.mark.timeout(3600 * (10 if os.environ.get("FUZZ_LONG") else 1)), pytest.mark.usefixtures("fuzz_report")]


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


