"""Merge methods mergekit does not have, as plain tensor kernels: PCB-Merging.

PCB-Merging (Du et al., NeurIPS'24, "Parameter Competition Balancing for Model Merging"), per tensor, with
τ_t = θ_t − θ_pre for the n members (each flattened):
- outliers: the floor(q·d) largest and smallest entries of each |τ_t| are clipped to the next one (q = 1e-4,
  the reference code's; it clips floor(q·d) + 1 at the top, a rounding that matters only for small tensors);
- intra-balancing: exp(n · minmax(|τ_t|)²), minmax over the entries of τ_t;
- inter-balancing: tanh(τ_t ⊙ Σ_j τ_j);
- β_t = intra ⊙ inter; the entries of β_t below its order statistic number floor(d·(1 − ratio)) are raised to
  it, so that after a min-max normalisation only the entries above it, the top `ratio` share, keep a weight
  (`ratio` is the reference code's `pcb_ratio`: the share KEPT, 1 − the drop ratio); the others weigh 0;
- τ* = Σ_t β̂_t ⊙ τ̃_t / Σ_t β̂_t (τ̃: the clipped task vectors), and θ = θ_pre + λ · τ*.
The reference code runs on the whole model flattened into one vector; this kernel runs per tensor, as
mergekit's TIES does (quantiles and min-max per tensor), so it streams tensor by tensor like every other
intra-group method. λ defaults to 1; the paper tunes it (and the ratio) on validation, as `baselines` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

OUTLIER_QUANTILE = 1e-4


def _minmax_rows(x: Tensor) -> Tensor:
    """(x − min) / (max − min) per row; a constant row is all zeros."""
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, torch.ones_like(span)),
                       torch.zeros_like(x))


def _row_order_stat(x: Tensor, index: int) -> Tensor:
    """The `index`-th smallest value of each row (0-based), as a column."""
    return x.kthvalue(index + 1, dim=1, keepdim=True).values


def _clip_rows(x: Tensor, low: float, high: float) -> Tensor:
    """Each row clamped to its own order statistics number floor(d·low) and d − 1 − floor(d·high) (0-based):
    the floor(d·low) smallest and floor(d·high) largest values of a row are clipped."""
    d = x.shape[1]
    lo = _row_order_stat(x, min(int(d * low), d - 1))
    hi = _row_order_stat(x, max(d - 1 - int(d * high), 0))
    return torch.maximum(torch.minimum(x, hi), lo)


def pcb_weights(taus: Tensor, ratio: float) -> tuple[Tensor, Tensor]:
    """(clipped task vectors, their weights β̂) for taus of shape (n, d)."""
    n = taus.shape[0]
    magnitude = _clip_rows(taus.abs(), OUTLIER_QUANTILE, OUTLIER_QUANTILE)
    clipped = torch.sign(taus) * magnitude
    intra = torch.exp(n * _minmax_rows(magnitude) ** 2)
    inter = torch.tanh(taus * taus.sum(0, keepdim=True))
    return clipped, _minmax_rows(_clip_rows(intra * inter, 1 - ratio, 0.0))


def pcb_merge(base: Tensor, members: Sequence[Tensor], ratio: float = 0.1, lam: float = 1.0) -> Tensor:
    """θ_pre + λ · Σ_t β̂_t ⊙ τ̃_t / Σ_t β̂_t, computed in float32, returned in base's dtype."""
    if not 0 < ratio <= 1:
        raise ValueError(f"PCB ratio {ratio} is outside (0, 1]")
    b = base.float()
    taus = torch.stack([m.float().reshape(-1) - b.reshape(-1) for m in members])
    clipped, weights = pcb_weights(taus, ratio)
    merged = (clipped * weights).sum(0) / weights.sum(0).clamp(min=1e-12)
    return (b + lam * merged.reshape(base.shape)).to(base.dtype)


@dataclass(frozen=True)
class NativeMethod:
    """A merge method run by mergetool's own kernel: kernel(base, members, **parameters) → merged tensor."""

    kernel: Callable[..., Tensor]
    defaults: Mapping[str, float]  # every parameter, with its default
    shares: tuple[str, ...] = ()  # parameters that are a share of a tensor: (0, 1]
    aliases: Mapping[str, str] = None  # recipe name → kernel argument

    def call(self, base: Tensor, members: Sequence[Tensor], parameters: Mapping) -> Tensor:
        given = {k: v for k, v in dict(parameters or {}).items() if k != "weight"}
        args = {**self.defaults, **given}
        return self.kernel(base, members, **{(self.aliases or {}).get(k, k): float(v) for k, v in args.items()})


NATIVE_METHODS = {"pcb": NativeMethod(pcb_merge, {"ratio": 0.1, "lambda": 1.0}, shares=("ratio",),
                                      aliases={"lambda": "lam"})}
