"""Tensors read in flat element ranges, without memory maps, so export holds only what it computes.

`LazyTensor` reads a slice of a safetensors tensor with `os.preadv` straight into a fresh buffer.
Pages of the file stay in the OS page cache and never count towards the process's RSS (memory-
mapped reads do, until the map is closed). Pickled `.bin` checkpoints fall back to a full read.
`TensorLike` is what the merge kernels accept: a plain tensor or a LazyTensor.
"""

from __future__ import annotations

import json
import math
import os
from functools import lru_cache
from pathlib import Path
from typing import Union

import torch

from mergetool.models.source import ModelSource


@lru_cache(maxsize=64)
def _data_starts(path: str, mtime_ns: int) -> dict[str, int]:
    """Absolute byte offset of every tensor's data in a safetensors file."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return {k: 8 + n + v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


class LazyTensor:
    """One tensor of a model; `read(start, stop)` returns elements [start, stop) of its flat view."""

    def __init__(self, src: ModelSource, name: str):
        meta = src.meta(name)
        self.name, self.shape, self.dtype = name, tuple(meta.shape), meta.dtype
        self.numel = math.prod(self.shape)
        self._src = src
        path, key = src.location(name)
        self._path = str(path) if Path(path).suffix == ".safetensors" else None
        self._offset = _data_starts(self._path, os.stat(self._path).st_mtime_ns)[key] if self._path else 0

    def read(self, start: int, stop: int) -> torch.Tensor:
        if self._path is None:
            return self._src.get(self.name).reshape(-1)[start:stop]
        size = torch.empty((), dtype=self.dtype).element_size()
        buf = torch.empty((stop - start) * size, dtype=torch.uint8)
        fd = os.open(self._path, os.O_RDONLY)
        try:
            done, view = 0, memoryview(buf.numpy())
            while done < len(view):  # preadv may return short reads
                got = os.preadv(fd, [view[done:]], self._offset + start * size + done)
                if got <= 0:
                    raise OSError(f"{self._path}: unexpected end of file reading {self.name}")
                done += got
        finally:
            os.close(fd)
        return buf.view(self.dtype)

    def full(self) -> torch.Tensor:
        return self.read(0, self.numel).reshape(self.shape)


TensorLike = Union[torch.Tensor, LazyTensor]


def as_tensor(t: TensorLike) -> torch.Tensor:
    return t.full() if isinstance(t, LazyTensor) else t


def numel(t: TensorLike) -> int:
    return t.numel if isinstance(t, LazyTensor) else t.numel()


def read(t: TensorLike, start: int, stop: int) -> torch.Tensor:
    """Elements [start, stop) of t's flat view (a view for plain tensors)."""
    return t.read(start, stop) if isinstance(t, LazyTensor) else t.reshape(-1)[start:stop]


def unit_ranges(t: TensorLike, per_channel: bool, chunk: int = 1 << 22) -> torch.Tensor:
    """max − min per quantisation unit (per row, or the whole tensor) in float64, read in row chunks."""
    if not isinstance(t, LazyTensor):
        units = t.reshape(t.shape[0], -1) if per_channel else t.reshape(1, -1)
        return units.amax(dim=1).double() - units.amin(dim=1).double()
    rows = t.shape[0] if per_channel else 1
    width = t.numel // rows if rows else 0
    step = max(1, chunk // max(width, 1)) if per_channel else 1
    out = []
    for r in range(0, rows, step):
        if per_channel:
            part = t.read(r * width, min(rows, r + step) * width).reshape(-1, width)
            out.append(part.amax(dim=1).double() - part.amin(dim=1).double())
        else:
            lo, hi = math.inf, -math.inf
            for s in range(0, t.numel, chunk):
                part = t.read(s, min(t.numel, s + chunk))
                lo, hi = min(lo, float(part.min())), max(hi, float(part.max()))
            out.append(torch.tensor([hi - lo], dtype=torch.float64) if t.numel else torch.zeros(1, dtype=torch.float64))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)
