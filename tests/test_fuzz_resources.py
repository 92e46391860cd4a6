"""Fuzz suite, part 5: resource bombs and deep documents in a bounded subprocess.
See tests/fuzz_fixtures.py and tests/fuzz_support.py (budget, counts, --fuzz-long).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest
from fuzz_resources import (
    RESOURCE_IDS,
    RESOURCE_MEMORY,
    RESOURCE_TIMEOUT,
    _resource_cases,
    run_subprocess,
)
from fuzz_support import (
    CANARY,
)

pytestmark = [pytest.mark.timeout(3600 * (10 if os.environ.get("FUZZ_LONG") else 1)), pytest.mark.usefixtures("fuzz_report")]




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
