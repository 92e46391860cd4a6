"""Fuzz suite, part 4: path arguments and usage, baselines.
See tests/fuzz_fixtures.py and tests/fuzz_support.py (budget, counts, --fuzz-long).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fuzz_files import (
    write,
)
from fuzz_fixtures import (
    World,
    copy_lib,
    fuzz,
    run_counted,
    write_recipe,
)
from fuzz_mutations import (
    recipe_reads,
    recipe_slots,
)
from fuzz_strategies import (
    apply,
    scratch,
)
from fuzz_support import (
    ANY,
    BAD,
    expect,
    run_cli,
)
from hypothesis import given
from hypothesis import strategies as st

pytestmark = [pytest.mark.timeout(3600 * (10 if os.environ.get("FUZZ_LONG") else 1)), pytest.mark.usefixtures("fuzz_report")]


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
