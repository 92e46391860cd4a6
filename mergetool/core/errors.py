"""Known, user-facing errors. The CLI prints them as one line and exits with code 2."""

from __future__ import annotations

from typing import Optional


class MergetoolError(Exception):
    """A problem with the user's input: one line naming where, what and the fix.

    `file`, `line`, `col` and `key` say where; `fix` says what to do about it.
    """

    def __init__(
        self,
        message: str,
        *,
        file: Optional[str] = None,
        key: Optional[str] = None,
        fix: Optional[str] = None,
        line: Optional[int] = None,
        col: Optional[int] = None,
    ):
        super().__init__(message)
        self.message = message
        self.file = str(file) if file is not None else None
        self.key = key
        self.fix = fix
        self.line = line
        self.col = col

    def one_line(self) -> str:
        where = ""
        if self.file:
            where = self.file
            if self.line is not None:
                where += f":{self.line}"
                if self.col is not None:
                    where += f":{self.col}"
        parts = []
        if where:
            parts.append(where)
        if self.key:
            parts.append(self.key)
        head = ": ".join(parts)
        text = f"{head}: {self.message}" if head else self.message
        if self.fix:
            text += f" (fix: {self.fix})"
        return " ".join(text.split())  # always a single line

    def __str__(self) -> str:
        return self.one_line()


class RecipeError(MergetoolError):
    """The recipe file is malformed or inconsistent."""


class PlanError(MergetoolError):
    """The models cannot be decomposed into a complete, consistent component plan."""


class ModelLoadError(MergetoolError):
    """A model reference cannot be resolved or read."""


class DataError(MergetoolError):
    """A task's data file is missing, unreadable or lacks a column."""


class LibraryError(MergetoolError):
    """An expert library is malformed, tampered with or unsafe."""


MAX_REPORTED = 20  # a file with thousands of problems prints the first ones and a count, not thousands of lines


class MultiError(MergetoolError):
    """Several independent problems, reported one line each (at most MAX_REPORTED, then a count)."""

    def __init__(self, errors: list[MergetoolError]):
        self.errors = list(errors)
        super().__init__("; ".join(self.lines()))

    def lines(self) -> list[str]:
        shown = [e.one_line() for e in self.errors[:MAX_REPORTED]]
        if len(self.errors) > MAX_REPORTED:
            shown.append(f"... and {len(self.errors) - MAX_REPORTED} more problems (fix the ones above first)")
        return shown
