"""`doctor`: versions, device, threads, offline assets, the lock, and the staged forward on every
architecture it supports; one pass/fail line per check, exit 2 with the fix on the first failure."""

from __future__ import annotations

from typing import Annotated

import typer

from mergetool.cli._errors import handles_errors
from mergetool.core.errors import MergetoolError
from mergetool.doctor import first_failure, header, run_checks


@handles_errors
def doctor(
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    assets: Annotated[bool, typer.Option(help="Also look for the offline demo assets (base model, corpora).")] = True,
) -> None:
    """Check this environment in a few seconds: lock, staged forward per architecture, offline assets."""
    for line in header(device):
        typer.echo(line)
    results, seconds = run_checks(assets=assets)
    for r in results:
        typer.echo(f"{'pass' if r.ok else 'FAIL'}  {r.name}: {r.detail}")
    failed = first_failure(results)
    if failed is not None:
        n = sum(not r.ok for r in results)
        raise MergetoolError(f"{n} of {len(results)} checks failed, first: {failed.name}: {failed.detail}",
                             key="doctor", fix=failed.fix or "see the FAIL lines above")
    typer.echo(f"ok: {len(results)} checks passed in {seconds:.1f} s")


def register(app: typer.Typer) -> None:
    app.command()(doctor)
