"""The Typer application: global options, then the command groups."""

from __future__ import annotations

from typing import Annotated

import typer

from mergetool.cli import (
    baselines_cmds,
    doctor_cmds,
    hub_cmds,
    library_cmds,
    recipe_cmds,
    runtime_cmds,
    search_cmds,
    serve_cmds,
)
from mergetool.cli._errors import OneLineUsageErrors, set_debug
from mergetool.core.version import __version__

app = typer.Typer(
    name="mergetool",
    help="Component-wise model merging (MERGE): plan, search, export expert libraries, route and predict.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=OneLineUsageErrors,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mergetool {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for known errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    set_debug(debug)


recipe_cmds.register(app)
search_cmds.register(app)
library_cmds.register(app)
hub_cmds.register(app)
baselines_cmds.register(app)
runtime_cmds.register(app)
serve_cmds.register(app)
doctor_cmds.register(app)


def main() -> None:
    app()
