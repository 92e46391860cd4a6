"""Merges weighted by statistics of each task's data, as plain tensor kernels: Fisher merging and RegMean.

- Fisher merging (Matena & Raffel, NeurIPS'22): θ* = Σ_t (F_t + ε) ⊙ θ_t / Σ_t (F_t + ε), F_t the diagonal
  empirical Fisher of model t. ε (their `fisher_floor`, 1e-6) keeps an entry no example moved (every F_t = 0,
  e.g. the embedding rows of unseen tokens) at the plain average.
- RegMean (Jin et al., ICLR'23), for a linear layer y = x Wᵀ with W_t of shape (out, in) and the Gram matrix
  G_t = X_tᵀ X_t of its inputs on task t: W*ᵀ = (Σ_t G̃_t)⁻¹ Σ_t G̃_t W_tᵀ, G̃_t = α G_t + (1 − α) diag(G_t)
  (the off-diagonal entries scaled by α). Solved in float64; a singular sum falls back to the pseudo-inverse.

The statistics themselves (gradients, layer inputs) are collected by `mergetool.baselines.data_merges`.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

FISHER_FLOOR = 1e-6


def fisher_merge(params: Sequence[Tensor], fishers: Sequence[Tensor], floor: float = FISHER_FLOOR) -> Tensor:
    """Σ_t (F_t + floor) θ_t / Σ_t (F_t + floor), in the first model's dtype."""
    num = torch.zeros_like(params[0], dtype=torch.float64)
    den = torch.zeros_like(num)
    for theta, fisher in zip(params, fishers, strict=True):
        w = fisher.double() + floor
        num += w * theta.double()
        den += w
    return (num / den).to(params[0].dtype)


def scaled_gram(gram: Tensor, alpha: float) -> Tensor:
    """G̃ = α G + (1 − α) diag(G): the off-diagonal entries scaled by α."""
    return alpha * gram + (1 - alpha) * torch.diag(torch.diagonal(gram))


def regmean_merge(weights: Sequence[Tensor], grams: Sequence[Tensor], alpha: float) -> Tensor:
    """W* with W*ᵀ = (Σ_t G̃_t)⁻¹ Σ_t G̃_t W_tᵀ for linear weights W_t (out × in) and Gram matrices G_t (in × in)."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"RegMean alpha {alpha} is outside [0, 1]")
    scaled = [scaled_gram(g.double(), alpha) for g in grams]
    total = sum(scaled)
    rhs = sum(g @ w.double().T for g, w in zip(scaled, weights, strict=True))
    try:
        merged_t = torch.linalg.solve(total, rhs)
    except RuntimeError:  # singular: the least-norm solution
        merged_t = torch.linalg.pinv(total) @ rhs
    return merged_t.T.to(weights[0].dtype).contiguous()
