"""Known errors, formatted in one place: one line each on stderr, exit code 2, no traceback."""

from __future__ import annotations

import functools
import sys
import traceback
from typing import Callable

import typer
from typer.core import TyperGroup

from mergetool.core.compat import usage_error_types
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
        except (MergetoolError, OSError) as e:  # OSError: a path the OS refuses (name too long, permission, space)
            if _state["debug"]:
                traceback.print_exc(file=sys.stderr)
            report(e if isinstance(e, MergetoolError) else MergetoolError(
                str(e.strerror or e), file=e.filename, fix="check the path and its permissions"))
            raise typer.Exit(EXIT_USAGE) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


class OneLineUsageErrors(TyperGroup):
    """The app's command group: Click's own usage errors (a missing option, a bad value, an unknown
    command) are one `error:` line naming the command and pointing at its --help, exit 2, not a usage box."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        usage_error, click_exception = usage_error_types()
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except usage_error as e:
            ctx = getattr(e, "ctx", None)
            where = ctx.command_path if ctx is not None else (prog_name or "mergetool")
            typer.echo(f"error: {where}: {' '.join(e.format_message().split())} "
                       f"(fix: see `{where} --help`)", err=True)
            code = EXIT_USAGE
        except click_exception as e:  # e.g. a file option Click could not open
            typer.echo(f"error: {' '.join(e.format_message().split())}", err=True)
            code = getattr(e, "exit_code", 1)
        except typer.Abort:
            typer.echo("aborted", err=True)
            code = 1
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)
