"""Fuzz suite, part 3: predict inputs, evaluate, export-model, run folders.
See tests/fuzz_fixtures.py and tests/fuzz_support.py (budget, counts, --fuzz-long).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
from fuzz_files import (
    DELETE,
    faults,
    json_paths,
    nested,
    pick,
    relist,
    set_at,
    to_json,
    write,
)
from fuzz_fixtures import (
    DATA_CASES,
    copy_lib,
    data_case,
    fuzz,
    library_ok,
    model_ok,
    predictions_ok,
    rows,
    run_counted,
    write_recipe,
)
from fuzz_mutations import (
    recipe_reads,
)
from fuzz_strategies import (
    apply,
    predict_line,
    rename_task,
    scratch,
)
from fuzz_support import (
    ANY,
    BAD,
    OK,
    Outcome,
    Soft,
    combine,
    expect,
    failure,
    run_cli,
)
from fuzz_tamper import (
    BAD_NUMBERS,
    JSON_JUNK,
    ODD_NUMBERS,
    Tamper,
)
from hypothesis import given
from hypothesis import strategies as st

pytestmark = [pytest.mark.timeout(3600 * (10 if os.environ.get("FUZZ_LONG") else 1)), pytest.mark.usefixtures("fuzz_report")]


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
