"""Paths the user wrote: `~` and `~user` expanded as a shell does (an unknown user leaves the text as it is)."""

from __future__ import annotations

from pathlib import Path
from typing import Union


def expand_user(path: Union[str, Path]) -> Path:
    """Path(path).expanduser(), except that `~nosuchuser/x` (or `~` without a home) stays literal, like
    `echo ~nosuchuser` in a shell, instead of raising RuntimeError."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        return Path(path)
