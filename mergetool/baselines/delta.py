"""Per-task payload baselines (issue #13): TALL masks, T-Switch-like and BitDelta.

Each stores the pre-trained base once, at a base precision (`storage`: fp32 | fp16 | int8, with the delta
codecs' base codec, baselines/storage.py), plus a payload per task; task t's model is θ̂_pre + Δ̂_t, with
θ̂_pre the base *as stored and decoded* and τ_t = θ_t − θ̂_pre (so base error and delta error do not compound).

- TALL masks (Wang et al., ICML'24): τ_MTL = Σ_t τ_t (task arithmetic's sum, stored at `storage`); per task
  the binary mask m_t = |τ_t| ≥ λ_t·|τ_MTL − τ_t| (bit-packed), Δ̂_t = m_t ⊙ τ_MTL. λ_t is tuned per task on
  validation over TALL_LAMBDAS. Stored: base + τ_MTL + T masks of d bits (each tensor padded to a byte).
- T-Switch-like: the `delta_switch` codec (merge/codec_kernels.py) at density ρ_t with one scale per tensor:
  a top-k |τ_t| mask, the kept signs and the mean kept magnitude. ρ_t is tuned per task over SWITCH_DENSITIES.
- BitDelta: the `delta_quant` codec at b = 1: the sign of τ_t and a per-row scale, mean |τ_t| of the row (the
  L2-optimal scale of a sign code). A global multiplier α_t on task t's scales is tuned on validation over
  BITDELTA_MULTIPLIERS and folded into the stored scales (so it costs nothing: α = 1 is the codec's own scale).

Scales are stored in the base's own dtype (b⁺ bits); every payload's bits are 8 × the bytes of the tensors it
writes (`codecs.to_tensors`), so C is exact to the byte. Per-task hyperparameters are picked on validation
with the task given (each task's score depends only on its own payload); ties go to the first grid value.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from mergetool.baselines.storage import stored, stored_state
from mergetool.merge.codecs import (
    DeltaQuantSpec,
    DeltaSwitchSpec,
    decode,
    encode_quant,
    encode_switch,
    tensor_bytes,
    to_tensors,
)
from mergetool.merge.quantize import pack_bits

TALL_LAMBDAS = (0.2, 0.3, 0.4, 0.5, 0.6)
SWITCH_DENSITIES = (0.05, 0.1, 0.2, 0.3)
BITDELTA_MULTIPLIERS = (0.75, 1.0, 1.25)


# --- formulas ------------------------------------------------------------------------------------
def tall_mask(tau: Tensor, tau_mtl: Tensor, lam: float) -> Tensor:
    """TALL's mask of task t: |τ_t| ≥ λ·|τ_MTL − τ_t| (boolean)."""
    return tau.float().abs() >= lam * (tau_mtl.float() - tau.float()).abs()


def tall_task(pre: Tensor, tau_mtl: Tensor, mask: Tensor) -> Tensor:
    """θ_pre + m_t ⊙ τ_MTL."""
    return (pre.float() + mask * tau_mtl.float()).to(pre.dtype)


def packed_mask_bits(mask: Tensor) -> int:
    """Bits of a bit-packed mask as stored: one bit per value, the tensor padded once to a whole byte."""
    return 8 * pack_bits(mask.reshape(-1).to(torch.uint8), 1).numel()


def _meta_dtype(x: Tensor) -> torch.dtype:
    return x.dtype if x.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32


def switch_delta(tau: Tensor, density: float) -> tuple[Tensor, int]:
    """T-Switch-like: (decoded delta_switch of τ at density ρ, one scale per tensor; its stored bits)."""
    enc = encode_switch(tau, DeltaSwitchSpec(density, "tensor"), _meta_dtype(tau))
    return decode(enc).to(tau.dtype), 8 * tensor_bytes(to_tensors(enc, "t"))


def bitdelta_delta(tau: Tensor, multiplier: float = 1.0) -> tuple[Tensor, int]:
    """BitDelta: (decoded 1-bit delta_quant of τ with its per-row scales × multiplier, rounded to the scale
    dtype as stored; its stored bits)."""
    enc = encode_quant(tau, DeltaQuantSpec(1), _meta_dtype(tau))
    if multiplier != 1.0:
        enc = dataclasses.replace(enc, scale=(enc.scale.double() * multiplier).to(enc.scale.dtype))
    return decode(enc).to(tau.dtype), 8 * tensor_bytes(to_tensors(enc, "t"))


# --- models ---------------------------------------------------------------------------------------
class PayloadModel:
    """θ̂_pre (the base at `storage`) plus one payload per task at a per-task grid value. `state(w)` is the
    model of the argmax task at its chosen value (EMR's routing); built states are cached, T at most."""
    key_name = ""
    param = ""
    grid: Sequence[float] = ()

    def __init__(self, plan, base, tasks: Sequence, storage: str = "fp32"):
        self.plan, self.tasks, self.storage = plan, tasks, storage
        names = [n for c in plan.components for n in c.tensors]
        self.pre, self.base_bits = stored_state({n: base.get(n) for n in names}, storage)
        self.choice: list[float] = [self.grid[0]] * len(tasks) if self.grid else []
        self._states: dict[tuple, dict[str, Tensor]] = {}
        self._bits: dict[tuple, int] = {}

    def tau(self, t: int, name: str) -> Tensor:
        return self.tasks[t].get(name).float() - self.pre[name].float()

    def delta(self, t: int, name: str, value: float) -> tuple[Tensor, int]:
        raise NotImplementedError

    def shared_bits(self) -> int:
        """Bits stored once besides the base (TALL: τ_MTL)."""
        return 0

    def task_state(self, t: int, value: float) -> dict[str, Tensor]:
        k = (t, value)
        if k not in self._states:
            if len(self._states) >= len(self.tasks):
                self._states.pop(next(iter(self._states)))
            state, bits = {}, 0
            for n, p in self.pre.items():
                d, b = self.delta(t, n, value)
                state[n], bits = (p.float() + d.float()).to(p.dtype), bits + b
            self._states[k], self._bits[k] = state, bits
        return self._states[k]

    def payload_bits(self, t: int, value: float) -> int:
        if (t, value) not in self._bits:
            self.task_state(t, value)
        return self._bits[(t, value)]

    @staticmethod
    def key(weights: Sequence[float]) -> tuple:
        return (int(np.argmax(weights)),)

    def state(self, weights: Sequence[float]) -> dict[str, Tensor]:
        t = int(np.argmax(weights))
        return self.task_state(t, self.choice[t])

    def bits(self, values: Optional[Sequence[float]] = None) -> dict:
        """Stored bits of each part at per-task values (default: the chosen ones)."""
        values = self.choice if values is None else values
        per_task = [self.payload_bits(t, v) for t, v in enumerate(values)]
        return {"base": self.base_bits, "shared": self.shared_bits(), "per_task": sum(per_task),
                "per_task_each": per_task}


class TallModel(PayloadModel):
    key_name, param, grid = "tall", "lambda", TALL_LAMBDAS

    def __init__(self, plan, base, tasks: Sequence, storage: str = "fp32"):
        super().__init__(plan, base, tasks, storage)
        self.mtl, self._mtl_bits = {}, 0
        for n in self.pre:
            self.mtl[n], b = stored(sum(self.tau(t, n) for t in range(len(tasks))), storage)
            self._mtl_bits += b

    def shared_bits(self) -> int:
        return self._mtl_bits

    def delta(self, t: int, name: str, value: float) -> tuple[Tensor, int]:
        mask = tall_mask(self.tau(t, name), self.mtl[name], value)
        return mask * self.mtl[name].float(), packed_mask_bits(mask)


class SwitchModel(PayloadModel):
    key_name, param, grid = "tswitch", "density", SWITCH_DENSITIES

    def delta(self, t: int, name: str, value: float) -> tuple[Tensor, int]:
        return switch_delta(self.tau(t, name), value)


class BitDeltaModel(PayloadModel):
    key_name, param, grid = "bitdelta", "scale_multiplier", BITDELTA_MULTIPLIERS

    def delta(self, t: int, name: str, value: float) -> tuple[Tensor, int]:
        return bitdelta_delta(self.tau(t, name), value)


MODELS = {"tall": ("TALL masks", TallModel), "tswitch": ("T-Switch-like", SwitchModel),
          "bitdelta": ("BitDelta", BitDeltaModel)}
