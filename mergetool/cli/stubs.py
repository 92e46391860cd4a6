"""Commands whose issues have not landed yet: listed in --help, exit 2 when called."""

from __future__ import annotations

import typer

PENDING = {
    "baselines": "Score static and dynamic merging baselines.",
}


def _stub(name: str):
    def command(ctx: typer.Context) -> None:
        typer.echo(f"error: `mergetool {name}` is not implemented yet", err=True)
        raise typer.Exit(2)

    command.__doc__ = PENDING[name] + " (not implemented yet)"
    return command


def register(app: typer.Typer) -> None:
    for name in PENDING:
        app.command(name, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(_stub(name))
