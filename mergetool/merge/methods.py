"""The intra-group merge F of MERGE (paper Sec. III-B, Eq. 5), as plain tensor functions.

Every method but the native ones is delegated to mergekit's in-memory API (`merge_tensors`); mergekit is
imported lazily because its import takes seconds. Native methods (`pcb`: PCB-Merging) are mergetool's own
kernels (native_methods.py), for methods mergekit does not have. mergekit's from-disk `run_merge` path is never used.
The deterministic task-vector methods (task_arithmetic, ties, breadcrumbs, breadcrumbs_ties) run
by default through `mergetool.merge.fast_kernels.gta_merge`, a streaming kernel that is bitwise equal to
mergekit's `merge_tensors` (tested against it) but needs no argsort and no T-fold stacked copy;
`merge_group(..., fast=False)` is mergekit's own path, the reference.

Conventions:
- A group with one member is not merged: the member's own tensor is returned (|Θ| ≥ 2 rule).
- Methods whose contract uses a base get θ_pre as the base; methods that ignore it (linear =
  WA, karcher) get the members only, so WA is the plain (weighted) average of the task models.
- Pairwise methods whose "base" is just one end of an interpolation (slerp, nearswap,
  arcee_fusion: base required, exactly two inputs) merge exactly two task models, with the
  first member as mergekit's base. nuslerp takes θ_pre as base and exactly two tasks.
- Task arithmetic follows Eq. 5 exactly: θ_pre + λ·Σ_t (θ_t − θ_pre). mergekit's
  task_arithmetic computes base + λ·Σ_t w_t·(θ_t − base), divided by Σ w_t only when
  `normalize` is true. Its default is already false; we pin it to false (unless the recipe sets
  it) so a change of default upstream cannot silently turn TA into an average.
- The per-model `weight` defaults to 1.0 for every method that takes one.
- Methods that draw random numbers are seeded from `seed_key` with a stable hash, inside
  `torch.random.fork_rng()`, so results are reproducible and the global RNG is untouched.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Optional

import torch
from torch import Tensor

from mergetool.core.compat import bind_merge_parameters
from mergetool.core.errors import MergetoolError
from mergetool.merge.fast_kernels import fast_method, gta_merge
from mergetool.merge.native_methods import NATIVE_METHODS
from mergetool.models.streaming import TensorLike, as_tensor

METHOD_ALIASES = {"wa": "linear", "ta": "task_arithmetic", "tm": "ties", "bc": "breadcrumbs"}

# The paper's intra-group methods at their own papers' recommended settings (MERGE-WA/TA/TM/BC, issue #18):
# WA is the uniform mean; TA λ = 0.3 (Ilharco et al.); TIES keeps the top 20 % of |τ| with λ = 1 (Yadav et
# al.); Breadcrumbs masks the bottom β = 90 % and the top γ = 1 % of |τ| (Davari & Belilovsky; in mergekit's
# terms density 0.09 = kept share, gamma 0.01 = top share dropped) and, its α being tuned per task count
# there, takes TA's λ = 0.3.
VARIANT_SETTINGS: dict[str, tuple[str, dict[str, float]]] = {
    "wa": ("linear", {}),
    "ta": ("task_arithmetic", {"lambda": 0.3}),
    "tm": ("ties", {"density": 0.2, "lambda": 1.0}),
    "bc": ("breadcrumbs", {"density": 0.09, "gamma": 0.01, "lambda": 0.3}),
}


def variant_key(key: str) -> str:
    """The paper's key of a MERGE variant (wa, ta, tm, bc; `ties` is read as `tm`)."""
    k = {"ties": "tm"}.get(key.strip().lower(), key.strip().lower())
    if k not in VARIANT_SETTINGS:
        raise MergetoolError(f"no paper settings for merge method {key!r}", key="methods",
                             fix=f"use one of {', '.join(sorted(VARIANT_SETTINGS))} (ties = tm)")
    return k


def variant_settings(key: str) -> tuple[str, dict[str, float]]:
    """(method, parameters) of a MERGE variant's intra-group method at its paper's settings."""
    method, params = VARIANT_SETTINGS[variant_key(key)]
    return method, dict(params)

# Defaults we pin on top of mergekit's (see module docstring).
_PINNED_DEFAULTS: dict[str, dict[str, Any]] = {"task_arithmetic": {"normalize": False}}
# Methods that sample at random outside the sparsifiers (arcee_fusion samples quantiles).
_RANDOM_METHODS = {"arcee_fusion"}
_BASE_ID = "base"


def _mergekit():
    from mergekit import merge_methods

    return merge_methods


def _method_names() -> list[str]:
    return sorted(m.spec.name for m in _mergekit().registered_methods())


def resolve_method(name: str) -> str:
    """Alias, mergekit name or native name (native_methods.py) → canonical method name."""
    key = str(name).strip().lower()
    key = METHOD_ALIASES.get(key, key)
    if key in NATIVE_METHODS:
        return key
    names = sorted([*_method_names(), *NATIVE_METHODS])
    if key in names:
        return key
    choices = names + sorted(METHOD_ALIASES)
    raise MergetoolError(
        f"unknown merge method {name!r}",
        key="method",
        fix=f"{_did_you_mean(key, choices)}known methods: {', '.join(choices)}",
    )


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=3, cutoff=0.5)
    return f"did you mean {', '.join(close)}? " if close else ""


def _spec(method: str):
    return _mergekit().get(method).spec


def _is_pairwise(spec) -> bool:
    """True when mergekit's 'base' is one end of a two-model interpolation (slerp, ...)."""
    from mergekit.merge_methods.base import BasePolicy

    c = spec.contract
    return c.base == BasePolicy.REQUIRED and c.max_inputs == 2


def _layout(spec, n_tasks: int) -> tuple[list[Hashable], Optional[int], bool]:
    """(input ids, base index, whether θ_pre is passed) for a group of n_tasks members."""
    from mergekit.merge_methods.base import BasePolicy

    if _is_pairwise(spec):
        return list(range(n_tasks)), 0, False
    if spec.contract.base in (BasePolicy.REQUIRED, BasePolicy.OPTIONAL):
        return [_BASE_ID, *range(n_tasks)], 0, True
    return list(range(n_tasks)), None, False


# shares of a tensor: (low, high, low included, high included); mergekit takes density 2 or -1 silently
SHARES = {"density": (0, 1, False, True), "select_topk": (0, 1, False, True), "gamma": (0, 1, True, False),
          "epsilon": (0, 1, True, False), "ratio": (0, 1, False, True)}


def _check_range(key: str, value: Any) -> None:
    """Numbers are finite; shares of a tensor lie in their interval (SHARES)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if not math.isfinite(value):
        raise MergetoolError(f"parameter {key!r} is {value}", key=key, fix="give a finite number")
    if key in SHARES:
        lo, hi, lo_in, hi_in = SHARES[key]
        if not ((lo <= value if lo_in else lo < value) and (value <= hi if hi_in else value < hi)):
            span = f"{'[' if lo_in else '('}{lo}, {hi}{']' if hi_in else ')'}"
            raise MergetoolError(f"parameter {key!r} is {value:g}, outside {span}", key=key,
                                 fix=f"{key} is a share of each tensor: give a value in {span}")


def _check_arity(method: str, spec, n_tasks: int) -> None:
    ids, base_index, _ = _layout(spec, n_tasks)
    base_id = ids[base_index] if base_index is not None else None
    try:
        spec.contract.validate_ids(ids, base_id)
    except ValueError as e:
        c = spec.contract
        raise MergetoolError(
            f"merge method {method!r} cannot merge a group of {n_tasks} tasks ({e})",
            key="method",
            fix=f"use a method that accepts {n_tasks} inputs (e.g. task_arithmetic), or "
            f"constrain groups for {method} (contract: base={c.base.value}, "
            f"inputs {c.min_inputs}..{c.max_inputs or 'any'})",
        ) from None


def _per_input_values(value: Any) -> list[Any]:
    if isinstance(value, Mapping):
        return list(value.values())
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return list(value)
    return [value]


def check_method(name: str, parameters: Mapping, n_tasks: int) -> None:
    """Refuse an unknown method, a group size it cannot take, or unknown/invalid parameters.

    A group of one task is never merged, so arity is only checked for n_tasks ≥ 2.
    """
    from mergekit.merge_methods.base import ParameterScope

    method = resolve_method(name)
    if method in NATIVE_METHODS:
        return _check_native(method, parameters)
    spec = _spec(method)
    known = {p.name: p for p in spec.parameters}
    allowed = sorted(set(known) | {"weight"})
    for key, value in (parameters or {}).items():
        if key not in allowed:
            raise MergetoolError(
                f"unknown parameter {key!r} for merge method {method!r}",
                key=str(key),
                fix=f"{_did_you_mean(str(key), allowed)}parameters of {method}: {', '.join(allowed)}",
            )
        p = known.get(key)
        per_input = p is None or p.scope != ParameterScope.SHARED
        values = _per_input_values(value) if per_input else [value]
        if per_input and len(values) > 1 and len(values) != n_tasks:
            raise MergetoolError(
                f"parameter {key!r} has {len(values)} per-model values for {n_tasks} tasks",
                key=str(key),
                fix="give one value, or one per task in the group",
            )
        for v in values:
            try:
                if p is None:
                    float(v)
                else:
                    p.validate(v)
            except (TypeError, ValueError):  # pydantic ValidationError is a ValueError
                raise MergetoolError(
                    f"invalid value {v!r} for parameter {key!r} of {method!r}",
                    key=str(key),
                    fix=f"give a value of type {_type_name(p)}",
                ) from None
            _check_range(str(key), v)
    for p in spec.parameters:
        if p.required and p.name != "weight" and p.name not in (parameters or {}):
            raise MergetoolError(
                f"merge method {method!r} needs parameter {p.name!r}",
                key=p.name,
                fix=f"add {p.name}: <value> to the method's parameters",
            )
    if n_tasks >= 2:
        _check_arity(method, spec, n_tasks)


def _check_native(method: str, parameters: Mapping) -> None:
    """A native method's parameters: known names, one finite number each, shares in their interval."""
    allowed = sorted([*NATIVE_METHODS[method].defaults, "weight"])
    for key, value in (parameters or {}).items():
        if key not in allowed:
            raise MergetoolError(f"unknown parameter {key!r} for merge method {method!r}", key=str(key),
                                 fix=f"{_did_you_mean(str(key), allowed)}parameters of {method}: {', '.join(allowed)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MergetoolError(f"invalid value {value!r} for parameter {key!r} of {method!r}", key=str(key),
                                 fix="give one number (the same for every task of a group)")
        _check_range(str(key), value)


def _type_name(p) -> str:
    t = p.value_type if p is not None else float
    return getattr(t, "__name__", str(t))


def uses_randomness(method: str) -> bool:
    """True for methods that sample (dare_*, della*, arcee_fusion on large tensors)."""
    from mergekit.merge_methods.generalized_task_arithmetic import (
        GeneralizedTaskArithmeticMerge,
    )
    from mergekit.sparsify import SparsificationMethod

    canonical = resolve_method(method)
    if canonical in NATIVE_METHODS:
        return False
    if canonical in _RANDOM_METHODS:
        return True
    m = _mergekit().get(canonical)
    return isinstance(m, GeneralizedTaskArithmeticMerge) and m.sparsification_method in (
        SparsificationMethod.random,
        SparsificationMethod.della_magprune,
    )


def stable_seed(key: str) -> int:
    """A 63-bit seed from a string, identical across processes and Python versions."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _bind(spec, parameters: Mapping, ids: list[Hashable], n_tasks: int) -> dict[str, Any]:
    """Recipe parameters → mergekit parameters (per-model lists → {member index: value})."""
    from mergekit.merge_methods.base import ParameterScope

    out = dict(_PINNED_DEFAULTS.get(spec.name, {}))
    specs = {p.name: p for p in spec.parameters}
    given = dict(parameters or {})
    if "weight" in specs:
        given.setdefault("weight", 1.0)
    else:
        given.pop("weight", None)  # per-model weight is accepted for every method
    for key, value in given.items():
        p = specs.get(key)
        if p is not None and p.scope != ParameterScope.SHARED:
            if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
                if len(value) != n_tasks:
                    raise MergetoolError(
                        f"parameter {key!r} has {len(value)} per-model values for {n_tasks} tasks",
                        key=key,
                        fix="give one value, or one per task in the group",
                    )
                value = dict(enumerate(value))
            if isinstance(value, Mapping) and p.scope == ParameterScope.INPUT and _BASE_ID in ids:
                value = {_BASE_ID: 1.0 if p.required else p.default, **value}
        out[key] = value
    return out


def merge_group(
    base: Optional[TensorLike],
    members: Sequence[TensorLike],
    method: str,
    parameters: Mapping,
    *,
    seed_key: Optional[str] = None,
    out_dtype: Optional[torch.dtype] = None,
    fast: bool = True,
) -> Tensor:
    """F(θ_pre, Θ) for one tensor. A singleton returns the member's own tensor (not a copy).

    16-bit inputs are merged in float32; the result has `out_dtype` (default: the members'
    dtype). Non-float tensors must be equal across inputs and are passed through. Inputs may be
    `LazyTensor`s. With `fast`, deterministic task-vector methods (task_arithmetic, ties,
    breadcrumbs, breadcrumbs_ties) run the streaming kernel of mergetool.merge.fast_kernels, which is
    bitwise equal to mergekit's; everything else goes through mergekit's `merge_tensors`.
    """
    if not members:
        raise ValueError("merge_group needs at least one member")
    if len(members) == 1:
        t = as_tensor(members[0])
        return t if out_dtype is None else t.to(out_dtype)
    first = members[0]
    if not first.dtype.is_floating_point:
        return _equal_buffer(base, members, seed_key)

    canonical = resolve_method(method)
    if canonical in NATIVE_METHODS:
        return _native_merge(base, members, canonical, parameters, seed_key, out_dtype or first.dtype)
    spec = _spec(canonical)
    _check_arity(canonical, spec, len(members))
    ids, base_index, with_base = _layout(spec, len(members))
    if with_base and base is None:
        raise MergetoolError(
            f"merge method {canonical!r} needs the base model's tensor {seed_key or ''}",
            key=seed_key,
            fix="the base model must contain every tensor of a merged component",
        )
    tensors = [base, *members] if with_base else list(members)
    kwargs = _bind(spec, parameters, ids, len(members))
    half = any(t.dtype in (torch.float16, torch.bfloat16) for t in tensors)
    dtype = torch.float32 if half else None
    out_dtype = out_dtype or first.dtype

    try:
        if fast and with_base and not uses_randomness(canonical):
            out = _fast_merge(tensors, canonical, kwargs, ids, dtype, out_dtype, seed_key)
            if out is not None:
                return out
        return _mergekit_merge([as_tensor(t) for t in tensors], canonical, kwargs, ids, base_index, seed_key,
                               dtype, out_dtype)
    except (TypeError, ValueError) as e:
        raise MergetoolError(
            f"merge method {canonical!r} failed{' on ' + seed_key if seed_key else ''}: {e}",
            key=seed_key,
            fix="check the method's parameters and that all models have equal shapes",
        ) from None


def _native_merge(base, members, method: str, parameters: Mapping, seed_key, out_dtype) -> Tensor:
    if base is None:
        raise MergetoolError(f"merge method {method!r} needs the base model's tensor {seed_key or ''}", key=seed_key,
                             fix="the base model must contain every tensor of a merged component")
    merged = NATIVE_METHODS[method].call(as_tensor(base), [as_tensor(m) for m in members], parameters)
    return merged.to(out_dtype)


def _equal_buffer(base: Optional[TensorLike], members: Sequence[TensorLike], seed_key: Optional[str]) -> Tensor:
    """A non-float tensor is passed through; it must be identical in every model."""
    first = as_tensor(members[0])
    others = [as_tensor(t) for t in members[1:]] + ([as_tensor(base)] if base is not None else [])
    if any(not torch.equal(first, t) for t in others):
        raise MergetoolError(
            f"non-float tensor {seed_key or ''} differs between models",
            key=seed_key,
            fix="non-float buffers cannot be merged; they must be identical",
        )
    return first


def _mergekit_merge(tensors: list[Tensor], canonical: str, kwargs: dict, ids, base_index, seed_key, dtype,
                    out_dtype) -> Tensor:
    """mergekit's own `merge_tensors`; a random method runs under a seed of its own (the global RNG is left alone)."""

    def run() -> Tensor:
        return _mergekit().merge_tensors(
            tensors, canonical, parameters=kwargs, ids=ids, base_index=base_index,
            name=seed_key, dtype=dtype, out_dtype=out_dtype,
        )

    if not uses_randomness(canonical):
        return run()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(stable_seed(seed_key or ""))
        return run()


def _fast_merge(tensors, canonical, kwargs, ids, dtype, out_dtype, seed_key) -> Optional[Tensor]:
    """The streaming kernel with mergekit's own parameter binding; None when it does not apply."""
    from mergekit.merge_methods.base import TensorGroup


    method = _mergekit().get(canonical)
    if not fast_method(method) or any(getattr(t, "device", torch.device("cpu")).type != "cpu" for t in tensors):
        return None
    metas = [torch.empty(tuple(t.shape), dtype=t.dtype, device="meta") for t in tensors]
    group = TensorGroup.from_tensors(metas, ids=ids, base_index=0, name=seed_key)
    bound = bind_merge_parameters(method, group, kwargs)
    work = dtype or functools.reduce(torch.promote_types, [t.dtype for t in tensors])
    return gta_merge(tensors[0], tensors[1:], method, bound, ids=ids[1:], work=work, out_dtype=out_dtype)
