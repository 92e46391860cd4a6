"""Import a module the user named in a recipe (`pkg:MODULE`, `evaluator: "module:function"`), with one-line errors.

A recipe is the user's own file, so importing what it names is trusted; a library's embedded recipe is never
used this way (evaluate takes data and evaluators only from a --recipe the user gives).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
from types import ModuleType
from typing import Callable

from mergetool.core.errors import MergetoolError

_MODULE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def import_named(name: str, *, key: str, error: type[MergetoolError] = MergetoolError) -> ModuleType:
    """The module `name`; one line (not a traceback) when it is not a module name, not installed or fails."""
    if not _MODULE.match(name or ""):
        raise error(f"{name!r} is not a module name", key=key, fix="write a dotted name such as my_pkg.evals")
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):  # a missing parent package
        spec = None
    if spec is None:
        raise error(f"package {name!r} is not installed", key=key, fix=f"pip install {name.split('.')[0].replace('_', '-')}")
    try:
        return importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - the user's module failed on import: say so in one line
        raise error(f"importing {name!r} failed ({type(exc).__name__}: {exc})", key=key,
                    fix="fix that module; `python -c 'import " + name + "'` shows the traceback") from None


def function_named(ref: str, n_args: int, *, key: str, error: type[MergetoolError] = MergetoolError) -> Callable:
    """`module:function`, checked to be a function that takes `n_args` positional arguments."""
    module_name, _, fn_name = (ref or "").partition(":")
    module = import_named(module_name, key=key, error=error)
    fn = getattr(module, fn_name, None) if fn_name.isidentifier() else None
    if not callable(fn):
        raise error(f"{module_name!r} has no function {fn_name!r}", key=key,
                    fix='write evaluator: "module:function" naming a function in that module')
    try:
        inspect.signature(fn).bind(*([None] * n_args))
    except TypeError:
        raise error(f"{ref} cannot be called with {n_args} arguments", key=key,
                    fix="define it as def f(outputs, labels, records) -> float") from None
    except ValueError:  # a builtin without a signature: let the call decide
        pass
    return fn
