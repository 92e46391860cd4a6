"""(IA)³ task models in a group: F merges the scaling vectors l_t over a base of ones.

PEFT's IA3 scales activations: the output of k, v (and any non-feedforward target) by l of shape
(out, 1), and the input of the feedforward targets (T5's `wo`, Llama's `down_proj`) by l of shape
(1, in). Merged into the frozen weight W0 that is a scaling of W0's rows (output) or columns
(input); a Conv1D base (`fan_in_fan_out`) stores W transposed, so the dims swap.

Merge choice: l is treated as a full-model weight whose pre-trained value is 1, so task-vector
methods see the deltas l_t − 1 (TA: 1 + λ·Σ(l_t − 1); TIES trims and elects over l_t − 1) and
WA averages the l_t. The merged vector is stored flat (one quantiser unit, as for norms and biases)
and quantised against the members' vectors by the conditional rule, so its cost counts exactly
its values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional

import torch
from torch import Tensor

from mergetool.merge.methods import merge_group

SUFFIX = ".ia3_l"
Ia3Slot = tuple[str, int]  # (vector name, the dim of W0 it scales: 0 rows, 1 columns)


def ia3_targets(names: Sequence[str]) -> dict[str, str]:
    """Base weight name -> IA3 vector name for a component's tensors; refuses strays."""
    out = {}
    for n in names:
        if not n.endswith(SUFFIX):
            raise ValueError(f"adapter tensor {n!r} is not an IA3 vector (…{SUFFIX})")
        out[n[: -len(SUFFIX)] + ".weight"] = n
    return out


def scaled_dim(vector_shape: Sequence[int], weight_shape: Sequence[int], fan_in_fan_out: bool = False) -> int:
    """The dim of W0 that an IA3 vector scales. PEFT saves a feedforward vector as (1, in) (it
    scales the input: W0's columns) and any other as (out, 1) (the output: W0's rows)."""
    if len(weight_shape) != 2:
        raise ValueError(f"IA3 needs a 2-D weight, got shape {list(weight_shape)}")
    out_dim, in_dim = (weight_shape[1], weight_shape[0]) if fan_in_fan_out else tuple(weight_shape)
    shape = tuple(vector_shape)
    if shape == (out_dim, 1):
        feedforward = False
    elif shape == (1, in_dim):
        feedforward = True
    else:
        raise ValueError(f"IA3 vector of shape {list(shape)} fits neither the output ({out_dim}) nor the "
                         f"input ({in_dim}) of its weight")
    return int(feedforward) ^ int(fan_in_fan_out)


def merge_ia3(vectors: Sequence[Tensor], method: str, parameters: Mapping, *,
              seed_key: Optional[str] = None) -> Tensor:
    """F(1, {l_t}): the members' vectors merged over a base of ones (flat, float32 or wider)."""
    work = torch.promote_types(vectors[0].dtype, torch.float32)
    flat = [v.reshape(-1).to(work) for v in vectors]
    return merge_group(torch.ones_like(flat[0]), flat, method, parameters, seed_key=seed_key)


def apply_ia3(w0: Tensor, vector: Tensor, dim: int) -> Tensor:
    """W0 with IA3 merged in, as PEFT's merge does it (W0 · l in W0's dtype) along `dim`."""
    shape = [1] * w0.ndim
    shape[dim] = -1
    return w0 * vector.reshape(shape).to(w0.dtype)


def ia3_dense(slots: Mapping[str, tuple[str, int]], vectors: Mapping[str, Tensor], base_get) -> dict[str, Tensor]:
    """Effective weights of an IA3 expert: W0 scaled per slot; an output-scaled (dim 0) weight's bias
    is scaled too, as PEFT merges it. `base_get(name)` gives a frozen base tensor, or None."""
    out = {}
    for target, (vec, dim) in slots.items():
        w0 = base_get(target)
        if w0 is None:
            raise ValueError(f"no frozen base weight {target!r} for IA3 vector {vec!r}")
        out[target] = apply_ia3(w0, vectors[vec], dim)
        bias = base_get(target.removesuffix("weight") + "bias") if dim == 0 else None
        if bias is not None:
            out[target.removesuffix("weight") + "bias"] = apply_ia3(bias, vectors[vec], 0)
    return out
