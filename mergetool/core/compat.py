"""The one place where mergetool touches version-sensitive API of its dependencies.

Everything else in the package uses public, documented API only. What is here falls in two groups:

- public functions whose argument names moved between releases (transformers' mask builders renamed
  `past_key_values` to `cache` in 5.24 and keep the old name only until 5.40): the call is adapted to
  the signature of the installed version, so neither name is ever passed through a deprecation shim;
- private API with no public equivalent (mergekit's parameter binding). Each is wrapped in one small
  function, with a comment saying why.

Each function raises `DependencyDrift` naming the package, its installed version and this file when the
API it relies on has changed, and `tests/test_compat.py` calls every one of them, so an upgrade that
breaks one fails a test with that one line (`scripts/test.sh --latest` runs them on the newest releases).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from importlib import metadata
from typing import Any, Callable, Mapping

from mergetool.core.errors import MergetoolError


class DependencyDrift(MergetoolError):
    """An installed dependency no longer offers an API that mergetool adapts to."""


def installed_version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def drift(package: str, what: str) -> DependencyDrift:
    return DependencyDrift(
        f"{package} {installed_version(package)}: {what}",
        key="environment",
        fix="install the locked versions (bash scripts/setup_env.sh), or adapt mergetool/core/compat.py",
    )


@functools.lru_cache(maxsize=None)
def _parameters(fn: Callable) -> frozenset:
    return frozenset(inspect.signature(fn).parameters)


def _embeds_keyword(fn: Callable, package: str) -> str:
    names = _parameters(fn)
    for name in ("inputs_embeds", "input_embeds"):
        if name in names:
            return name
    raise drift(package, f"{fn.__qualname__} takes neither inputs_embeds nor input_embeds")


def _no_cache(fn: Callable, package: str) -> dict:
    """The keyword that says 'no KV cache': `cache` from transformers 5.24, `past_key_values` before."""
    names = _parameters(fn)
    for name in ("cache", "past_key_values"):
        if name in names:
            return {name: None}
    raise drift(package, f"{fn.__qualname__} takes neither cache nor past_key_values")


def bidirectional_mask(config, inputs_embeds, attention_mask):
    """The attention mask an encoder layer takes, built exactly as the model's own forward builds it.

    transformers' BERT/RoBERTa/ViT forwards call `masking_utils.create_bidirectional_mask`; calling the
    same public function keeps a staged run bitwise equal to the plain forward for every attention
    implementation (eager, sdpa, ...)."""
    try:
        from transformers.masking_utils import create_bidirectional_mask
    except ImportError:
        raise drift("transformers", "transformers.masking_utils.create_bidirectional_mask is gone") from None
    key = _embeds_keyword(create_bidirectional_mask, "transformers")
    return create_bidirectional_mask(config=config, attention_mask=attention_mask, **{key: inputs_embeds})


def causal_mask(config, inputs_embeds, attention_mask, position_ids):
    """The causal mask a decoder layer takes without a KV cache (GPT-2, Llama), as their forwards build it."""
    try:
        from transformers.masking_utils import create_causal_mask
    except ImportError:
        raise drift("transformers", "transformers.masking_utils.create_causal_mask is gone") from None
    key = _embeds_keyword(create_causal_mask, "transformers")
    return create_causal_mask(config=config, attention_mask=attention_mask, position_ids=position_ids,
                              **{key: inputs_embeds}, **_no_cache(create_causal_mask, "transformers"))


def skip_weight_init() -> contextlib.AbstractContextManager:
    """A context in which transformers' constructors skip random weight init (every weight is loaded
    afterwards). It only saves time: where the helper is missing, a plain context is returned."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        return contextlib.nullcontext()
    return no_init_weights()


def bind_merge_parameters(method, group, parameters: Mapping[str, Any]) -> dict:
    """mergekit's own per-input parameter binding for one tensor group (defaults, per-model values).

    Private: mergekit 0.1.5 binds parameters only inside `MergeMethod.__call__`, which also runs the
    merge; the fast streaming kernel needs the bound values without mergekit's kernel. Binding them
    ourselves would duplicate mergekit's rules (scopes, defaults, per-model mappings), so this calls
    `_bind_parameters` and nothing else does."""
    bind = getattr(method, "_bind_parameters", None)
    if bind is None:
        raise drift("mergekit", f"{type(method).__name__} has no _bind_parameters")
    try:
        bound = bind((group,), dict(parameters))
    except TypeError as e:
        if "positional argument" in str(e) or "unexpected keyword" in str(e):
            raise drift("mergekit", f"_bind_parameters changed its signature ({e})") from None
        raise
    if not isinstance(bound, (list, tuple)) or len(bound) != 1 or not isinstance(bound[0], Mapping):
        raise drift("mergekit", "_bind_parameters no longer returns one mapping per group")
    return dict(bound[0])


@functools.lru_cache(maxsize=1)
def usage_error_types() -> tuple[type, type]:
    """(UsageError, ClickException) of the Click that Typer runs on. Typer ≥ 0.26 vendors Click as a private
    module and exports only BadParameter, Exit and Abort, so both are found on BadParameter's MRO (public)."""
    import typer

    by_name = {c.__name__: c for c in typer.BadParameter.__mro__}
    if "UsageError" not in by_name or "ClickException" not in by_name:
        raise drift("typer", "typer.BadParameter no longer derives from Click's UsageError / ClickException")
    return by_name["UsageError"], by_name["ClickException"]
