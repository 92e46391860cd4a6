"""LoRA task models in a group: F merges ΔW_t = s_t·B_t@A_t, stored re-factorised at the largest rank.

The merge sees each task's ΔW as its task vector over a zero base (θ_pre = 0), so WA averages the
ΔW_t, TA gives λ·Σ ΔW_t, TIES trims and elects over ΔW_t, exactly as for full fine-tunes. The result
is re-factorised by truncated SVD (`refactor_lora`) at the members' largest rank r, so an expert
stores B' (out × r) and A' (r × in), and its storage cost counts exactly those bytes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Optional

import torch
from torch import Tensor

from mergetool.merge.methods import merge_group

LoraPair = tuple[str, str, float]  # (A name, B name, scaling)
_A, _B = ".lora_A.weight", ".lora_B.weight"


def lora_delta(A: Tensor, B: Tensor, scaling: float) -> Tensor:
    """ΔW = scaling · B @ A for A (r × in) and B (out × r), computed in ≥ float32."""
    dtype = torch.promote_types(A.dtype, B.dtype)
    work = torch.promote_types(dtype, torch.float32)
    return (scaling * (B.to(work) @ A.to(work))).to(dtype)


def refactor_lora(delta: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Best rank-r factorisation of delta (truncated SVD): (B', A') with B' @ A' ≈ delta.

    Singular values are split as sqrt on both sides. If rank exceeds min(delta.shape) the
    extra rows/columns are zero, so the shapes are always (out × rank) and (rank × in).
    """
    if delta.ndim != 2:
        raise ValueError(f"refactor_lora needs a 2-D delta, got shape {tuple(delta.shape)}")
    if rank < 1:
        raise ValueError(f"rank must be ≥ 1, got {rank}")
    work = delta.to(torch.promote_types(delta.dtype, torch.float32))
    U, S, Vh = torch.linalg.svd(work, full_matrices=False)
    k = min(rank, S.numel())
    root = S[:k].sqrt()
    B = work.new_zeros(delta.shape[0], rank)
    A = work.new_zeros(rank, delta.shape[1])
    B[:, :k] = U[:, :k] * root
    A[:k] = root[:, None] * Vh[:k]
    return B.to(delta.dtype), A.to(delta.dtype)


def lora_pairs(names: Sequence[str]) -> dict[str, tuple[str, str]]:
    """Base weight name -> (lora_A name, lora_B name) for a component's tensors; refuses strays."""
    pairs: dict[str, tuple[str, str]] = {}
    for n in names:
        if n.endswith(_A):
            target = n[: -len(_A)] + ".weight"
            pairs[target] = (n, n[: -len(_A)] + _B)
        elif not n.endswith(_B):
            raise ValueError(f"adapter tensor {n!r} is not a LoRA A/B weight")
    missing = [b for _, b in pairs.values() if b not in names]
    if missing or 2 * len(pairs) != len(names):
        raise ValueError(f"unpaired LoRA tensors in {list(names)[:4]}")
    return pairs


def scaling_for(src, target: str, rank: int) -> float:
    """PEFT's scaling lora_alpha / r (/ sqrt(r) with rsLoRA), honouring rank/alpha patterns."""
    cfg = src.peft_config
    module = target.removesuffix(".weight")
    alpha = _pattern(getattr(cfg, "alpha_pattern", None) or {}, module, cfg.lora_alpha)
    return alpha / rank ** 0.5 if getattr(cfg, "use_rslora", False) else alpha / rank


def _pattern(patterns: Mapping[str, float], module: str, default: float) -> float:
    for key, value in patterns.items():
        if module == key or re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def lowrank_refactor(B: Tensor, A: Tensor, scaling: float, rank: int) -> tuple[Tensor, Tensor]:
    """refactor_lora(scaling·B@A, rank) without the dense SVD: QR of both factors, SVD of the r×r core."""
    work = torch.promote_types(torch.promote_types(A.dtype, B.dtype), torch.float32)
    qb, rb = torch.linalg.qr(B.to(work))
    qa, ra = torch.linalg.qr(A.to(work).T)
    U, S, Vh = torch.linalg.svd(scaling * rb @ ra.T)
    k = min(rank, S.numel())
    root = S[:k].sqrt()
    B2 = B.new_zeros(B.shape[0], rank, dtype=work)
    A2 = A.new_zeros(rank, A.shape[1], dtype=work)
    B2[:, :k] = (qb @ U[:, :k]) * root
    A2[:k] = root[:, None] * (Vh[:k] @ qa.T)
    return B2, A2


def merge_lora(A: Sequence[Tensor], B: Sequence[Tensor], scales: Sequence[float], method: str,
               parameters: Mapping, *, seed_key: Optional[str] = None):
    """((B', A'), (members' B, members' A)): the group's merged ΔW re-factorised at the largest rank,
    and each member's own ΔW factorised the same way and at the same shape (the conditional
    quantiser's sources, unit for unit)."""
    rank = max(a.shape[0] for a in A)
    deltas = [lora_delta(a, b, s) for a, b, s in zip(A, B, scales)]
    work = torch.promote_types(deltas[0].dtype, torch.float32)
    deltas = [d.to(work) for d in deltas]
    merged = merge_group(torch.zeros_like(deltas[0]), deltas, method, parameters, seed_key=seed_key)
    del deltas
    sources = [lowrank_refactor(b, a, s, rank) for a, b, s in zip(A, B, scales)]
    return refactor_lora(merged, rank), ([b for b, _ in sources], [a for _, a in sources])


def lora_dense(w0: Tensor, A: Tensor, B: Tensor, scaling: float) -> Tensor:
    """W0 + scaling·B@A, computed in float64 and cast to W0's dtype (search and library alike)."""
    return (w0.double() + scaling * (B.double() @ A.double())).to(w0.dtype)
