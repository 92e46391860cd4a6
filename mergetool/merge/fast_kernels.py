"""A streaming kernel for mergekit's task-vector methods that sparsify by magnitude, equal to mergekit.

mergekit's TIES and breadcrumbs (`mergekit.sparsify.magnitude`, `magnitude_outliers`) rank each task
vector's |τ| with a full `torch.argsort`: O(n log n) time and ~6 bytes of index and copy per value.
Here each kept set is a range of ascending ranks [a, b), found by an exact radix select over the
float32 bit patterns of |τ| (two histogram passes, O(n)); then sign election and the disjoint mean
run in flat chunks, with the same tensor operations as mergekit's `merge_group`, so the result is
bitwise equal. Inputs are plain tensors or `LazyTensor`s read chunk by chunk; the output is the only
full-size tensor held (apart from the rare tie case below).

Ties: `torch.argsort` on CPU is not stable, so when a group of equal non-zero magnitudes straddles a
rank boundary, which of them mergekit keeps is decided by the sort's internals. Then (and only for
that task vector) the kernel runs mergekit's own argsort on the same |τ| and keeps its pick from the
split tie group (a few indices), so the result stays bitwise equal. This costs mergekit's time and
memory for that one task vector; with fp32 fine-tunes it happens for ~1 in 10 task vectors and
for most embeddings. Equal zero magnitudes never matter (±0 kept or dropped is ±0).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from mergetool.models.streaming import TensorLike, numel, read

CHUNK = 1 << 20  # elements per chunk
PARALLEL = 1 << 18  # one-chunk tensors this large select their thresholds in two threads
_BIG = threading.Lock()
_HI = 1 << 15  # bins of the high 16 bits of a non-negative finite float32
_LO = 1 << 16
_INF_KEY = 0x7F800000


def fast_method(method) -> bool:
    """True for mergekit methods this kernel reproduces: deterministic generalized task arithmetic
    (task_arithmetic, ties, breadcrumbs, breadcrumbs_ties)."""
    from mergekit.merge_methods.generalized_task_arithmetic import GeneralizedTaskArithmeticMerge
    from mergekit.sparsify import SparsificationMethod as S

    return isinstance(method, GeneralizedTaskArithmeticMerge) and method.sparsification_method in (
        None, S.magnitude, S.magnitude_outliers)


def kept_ranks(n: int, method: Optional[str], density: float, gamma: float = 0.0) -> Optional[tuple[int, int]]:
    """The ascending ranks [a, b) of |τ| that mergekit keeps; None = keep everything (no sparsifying)."""
    if method is None or density >= 1:
        return None
    if method == "magnitude":  # argsort descending, first k
        if density <= 0 or n == 0:
            return (0, 0)
        k = max(1, int(density * n))
        return (n - k, n)
    target = int(density * n)  # magnitude_outliers: ascending sort, indices[n_bot : n_bot + target]
    n_bot = max(0, n - target - int(gamma * n))
    return (n_bot, n_bot + target)


@dataclass
class _Keep:
    lo: int = -1  # keep |τ| keys in [lo, hi] ...
    hi: int = _INF_KEY
    extra: Optional[torch.Tensor] = None  # ... and these flat indices (mergekit's pick of a tie group)
    none: bool = False  # keep nothing (density ≤ 0 → zeros_like)


def _keys(member: TensorLike, base_c: torch.Tensor, s: int, e: int, work: torch.dtype) -> torch.Tensor:
    d = read(member, s, e).to(work) - base_c
    return d.abs().float().view(torch.int32)


def _key_chunks(base: TensorLike, member: TensorLike, work, chunk: int):
    n = numel(base)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        yield _keys(member, read(base, s, e).to(work), s, e, work)


def _select(chunks: Callable[[], Iterable[torch.Tensor]], ranks: list[int]) -> Optional[list[tuple]]:
    """For each ascending rank r of |τ| (keys from `chunks()`, two passes): (key at r, count below it,
    count equal); None if a value is not finite."""
    hist = torch.zeros(_HI, dtype=torch.int64)
    for key in chunks():
        if bool((key > _INF_KEY).any()):
            return None  # NaN: leave it to mergekit
        hist += torch.bincount(key >> 16, minlength=_HI)
    cum = hist.cumsum(0)
    buckets = {}
    for r in ranks:
        b = int(torch.searchsorted(cum, r, right=True))
        buckets[r] = (b, int(cum[b - 1]) if b else 0)
    lows = {b: torch.zeros(_LO, dtype=torch.int64) for b, _ in buckets.values()}
    for key in chunks():
        hi = key >> 16
        for b, h in lows.items():
            h += torch.bincount(key[hi == b] & 0xFFFF, minlength=_LO)
    out = []
    for r in ranks:
        b, below = buckets[r]
        cum2 = lows[b].cumsum(0)
        lo = int(torch.searchsorted(cum2, r - below, right=True))
        out.append(((b << 16) | lo, below + (int(cum2[lo - 1]) if lo else 0), int(lows[b][lo])))
    return out


def _tie_picks(w: torch.Tensor, method: str, a: int, b: int, keep: _Keep) -> torch.Tensor:
    """Flat indices that mergekit's own argsort / sort (on the same |τ| = w) keeps outside
    [keep.lo, keep.hi]: its pick from the tie groups that straddle a boundary (a handful of elements)."""
    mask = torch.zeros(w.numel(), dtype=torch.bool)
    if method == "magnitude":
        mask[torch.argsort(w, descending=True)[: w.numel() - a]] = True
    else:
        mask[torch.sort(w, descending=False).indices[a:b]] = True
    key = w.view(torch.int32)
    mask &= (key < keep.lo) | (key > keep.hi)
    return mask.nonzero().flatten()


def _plan_keep(base, member, method, span, work, chunk) -> Optional[_Keep]:
    a, b = span
    n = numel(base)
    if a >= b:
        return _Keep(none=method == "magnitude", lo=1, hi=0)  # magnitude → zeros; outliers → d·0
    ranks = ([a] if a > 0 else []) + ([b - 1] if b < n else [])
    if n <= chunk:  # one chunk: compute the keys once for both passes (and the tie fallback)
        keys = _keys(member, read(base, 0, n).to(work), 0, n, work)
        chunks = lambda: [keys]  # noqa: E731
    else:
        keys, chunks = None, lambda: _key_chunks(base, member, work, chunk)  # noqa: E731
    found = _select(chunks, ranks) if ranks else []
    if found is None:
        return None
    keep, i = _Keep(), 0
    straddles = False
    if a > 0:
        key, below, eq = found[i]
        keep.lo, i = key, i + 1
        if key != 0 and below < a:  # the group at the boundary is split: exclude it, mergekit picks
            keep.lo, straddles = key + 1, True
    if b < n:
        key, below, eq = found[i]
        keep.hi = key
        if key != 0 and below + eq > b:
            keep.hi, straddles = key - 1, True
    if straddles and keys is not None:
        keep.extra = _tie_picks(keys.view(torch.float32), method, a, b, keep)
    elif straddles:
        with _BIG:  # one full-size argsort at a time: it needs ~16 bytes per value
            d = read(member, 0, n).to(work) - read(base, 0, n).to(work)
            keep.extra = _tie_picks(d.abs_().reshape(-1).float(), method, a, b, keep)
    return keep


def gta_merge(base: TensorLike, members: Sequence[TensorLike], method, params: dict[str, Any], *,
              ids: Sequence, work: torch.dtype, out_dtype: torch.dtype,
              chunk: Optional[int] = None) -> Optional[torch.Tensor]:
    """mergekit's GeneralizedTaskArithmeticMerge.merge_group for (base, members), streamed.

    `params` are mergekit's bound parameters (per-input ones keyed by `ids`, the members' ids).
    Returns None when the kernel cannot reproduce mergekit (rescaling, non-finite values)."""
    if params.get("rescale"):
        return None
    chunk = chunk or CHUNK
    sp = method.sparsification_method.value if method.sparsification_method else None
    n, shape = numel(base), tuple(base.shape)
    if n <= chunk:  # one chunk: read each input once, not once per pass
        base, members = read(base, 0, n), [read(m, 0, n) for m in members]

    def plan(i, m):
        span = kept_ranks(n, sp, params["density"][i], params["gamma"][i] if "gamma" in params else 0.0)
        return span is None, (_Keep() if span is None else _plan_keep(base, m, sp, span, work, chunk))

    if sp is not None and PARALLEL <= n <= chunk and len(members) > 1:  # torch kernels release the GIL
        with ThreadPoolExecutor(max_workers=2) as pool:
            keeps = list(pool.map(plan, ids, members))
    else:
        keeps = [plan(i, m) for i, m in zip(ids, members)]
    if any(keep is None for _, keep in keeps):
        return None
    weights = torch.tensor([params["weight"][i] for i in ids], dtype=work).unsqueeze(-1)
    out = torch.empty(n, dtype=out_dtype)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        base_c = read(base, s, e).to(work)
        deltas = base_c.new_empty((len(members), e - s))
        for j, (m, (all_kept, keep)) in enumerate(zip(members, keeps)):
            d = read(m, s, e).to(work) - base_c
            if keep.none:
                d = torch.zeros_like(d)
            elif not all_kept:
                key = d.abs().float().view(torch.int32)
                hit = (key >= keep.lo) & (key <= keep.hi)
                if keep.extra is not None:
                    hit[keep.extra[(keep.extra >= s) & (keep.extra < e)] - s] = True
                d = d * hit.to(work)
            deltas[j] = d
        deltas.mul_(weights)
        out[s:e] = _combine(deltas, weights, base_c, method, params).to(out_dtype)
    return out.reshape(shape)


def _combine(deltas, weights, base_c, method, params) -> torch.Tensor:
    """The tail of mergekit's GeneralizedTaskArithmeticMerge.merge_group, op for op."""
    if method.consensus_method:
        mask_dtype = torch.int8 if params["int8_mask"] else base_c.dtype
        sign = deltas.sign().to(mask_dtype)
        if method.consensus_method.value == "sum":
            majority = (deltas.sum(dim=0) >= 0).to(mask_dtype) * 2 - 1
        else:
            majority = (sign.sum(dim=0) >= 0).to(mask_dtype) * 2 - 1
        mask = sign == majority
        mixed = (deltas * mask).sum(dim=0)
        divisor = (weights * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if params["normalize"]:
        mixed /= divisor
    if params["lambda"] != 1:
        mixed *= params["lambda"]
    return (base_c + mixed).to(base_c.dtype)
