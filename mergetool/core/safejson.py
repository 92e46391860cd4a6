"""JSON from files we did not write (libraries, data, configs, headers): bounded size and depth, finite numbers.

`parse_json` is the one reader for untrusted JSON. It refuses documents nested deeper than `max_depth`, larger
than `max_bytes`, with NaN/Infinity literals or numbers that overflow a float, and never raises anything but
`UnsafeJSON` (a ValueError) with a short reason that does not quote the document.
"""

from __future__ import annotations

import json
import math
from typing import Any, Optional

MAX_DEPTH = 64
MAX_BYTES = 100 * 2**20  # safetensors allows 100 MB headers; manifests and configs are far smaller


class UnsafeJSON(ValueError):
    """A JSON document that is broken, too large, too deep or not finite; the message (what is wrong, to
    follow "is not JSON: ") never quotes it."""


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise UnsafeJSON("a number overflows a 64-bit float")
    return value


def _no_constants(name: str) -> Any:
    raise UnsafeJSON(f"{name} is not allowed (numbers must be finite)")


def is_number(value: Any) -> bool:
    """A JSON number (int or float, not a bool); parse_json has already refused the non-finite ones."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def depth(value: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        node, d = stack.pop()
        if isinstance(node, dict):
            node = node.values()
        elif not isinstance(node, list):
            deepest = max(deepest, d)
            continue
        deepest = max(deepest, d + 1)
        stack.extend((child, d + 1) for child in node)
    return deepest


def parse_json(raw: str | bytes, *, max_depth: int = MAX_DEPTH, max_bytes: Optional[int] = MAX_BYTES) -> Any:
    """Parse untrusted JSON; raises UnsafeJSON (never RecursionError, UnicodeDecodeError or OverflowError)."""
    if max_bytes is not None and len(raw) > max_bytes:
        raise UnsafeJSON(f"larger than {max_bytes} bytes")
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        value = json.loads(text, parse_float=_finite_float, parse_constant=_no_constants)
    except UnsafeJSON:
        raise
    except RecursionError:
        raise UnsafeJSON(f"nested deeper than {max_depth} levels") from None
    except UnicodeDecodeError:
        raise UnsafeJSON("not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise UnsafeJSON(f"{exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    except ValueError:  # an integer literal past Python's digit limit
        raise UnsafeJSON("an integer has too many digits") from None
    if depth(value) > max_depth:
        raise UnsafeJSON(f"nested deeper than {max_depth} levels")
    return value
