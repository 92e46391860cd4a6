"""Known errors, formatted in one place: one line each on stderr, exit code 2, no traceback."""

from __future__ import annotations

import functools
import sys
import traceback
from typing import Callable

import typer

from mergetool.core.errors import MergetoolError, MultiError

EXIT_USAGE = 2
_state = {"debug": False}


def set_debug(value: bool) -> None:
    _state["debug"] = value


def report(error: MergetoolError) -> None:
    lines = error.lines() if isinstance(error, MultiError) else [error.one_line()]
    for line in lines:
        typer.echo(f"error: {line}", err=True)


def handles_errors(fn: Callable) -> Callable:
    """Wrap a command: MergetoolError -> one line per problem and exit 2 (traceback with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MergetoolError as e:
            if _state["debug"]:
                traceback.print_exc(file=sys.stderr)
            report(e)
            raise typer.Exit(EXIT_USAGE) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper
