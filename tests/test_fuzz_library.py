"""Fuzz suite, part 2: search, export options, tampered libraries.
See tests/fuzz_fixtures.py and tests/fuzz_support.py (budget, counts, --fuzz-long).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from fuzz_files import (
    faults,
    nested,
    pick,
    relist,
    write,
)
from fuzz_fixtures import (
    MIXED,
    copy_lib,
    fuzz,
    library_ok,
    model_ok,
    predictions_ok,
    run_counted,
    write_recipe,
)
from fuzz_mutations import (
    mutated_recipe,
    recipe_reads,
)
from fuzz_strategies import (
    apply,
    scratch,
)
from fuzz_support import (
    ANY,
    BAD,
    OK,
    Outcome,
    Soft,
    agree,
    combine,
    expect,
    run_cli,
)
from fuzz_tamper import (
    tampers,
)
from hypothesis import given
from hypothesis import strategies as st

pytestmark = [pytest.mark.timeout(3600 * (10 if os.environ.get("FUZZ_LONG") else 1)), pytest.mark.usefixtures("fuzz_report")]


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


