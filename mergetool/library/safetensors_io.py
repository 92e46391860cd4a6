"""Safetensors written tensor by tensor, and headers checked before anything is read.

`StreamWriter` never holds a shard in memory: tensor data goes to one temporary file per element
size as it arrives; `close` writes the header and then the data, largest elements first, so every
tensor stays aligned to its element size. `ShardSet` rolls over to a new shard at a byte budget.
`read_header` checks that a file really is safetensors (never unpickled) before it is opened.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Optional

import torch

from mergetool.core.errors import LibraryError
from mergetool.core.safejson import UnsafeJSON, parse_json

DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
MAX_HEADER = 100_000_000


class StreamWriter:
    """One safetensors file, filled with `add` and finished with `close`."""

    def __init__(self, path: Path, metadata: Optional[dict[str, str]] = None):
        self.path = Path(path)
        self.metadata = {"format": "pt", **(metadata or {})}
        self.entries: dict[int, list[tuple[str, str, list[int], int]]] = {}  # elem size -> entries
        self._parts: dict[int, object] = {}
        self.data_bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> int:
        """Append one tensor; returns its data bytes."""
        if any(key in (e[0] for e in group) for group in self.entries.values()):
            raise ValueError(f"duplicate tensor key {key!r}")
        t = tensor.detach().to("cpu").contiguous()
        size = t.element_size()
        if size not in self._parts:
            self._parts[size] = open(self.path.with_name(f"{self.path.name}.part{size}"), "wb")
        raw = t.reshape(-1).view(torch.uint8).numpy()
        self._parts[size].write(memoryview(raw))
        n = raw.nbytes
        self.entries.setdefault(size, []).append((key, DTYPE_NAMES[t.dtype], list(t.shape), n))
        self.data_bytes += n
        return n

    def close(self) -> int:
        """Write header + data; returns the data bytes (the file is 8 + header + data bytes)."""
        header: dict = {"__metadata__": self.metadata}
        offset = 0
        sizes = sorted(self.entries, reverse=True)
        for size in sizes:
            for key, dtype, shape, n in self.entries[size]:
                header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
                offset += n
        text = json.dumps(header, separators=(",", ":")).encode("utf-8")
        text += b" " * (-len(text) % 8)  # data starts 8-byte aligned, as safetensors does
        for f in self._parts.values():
            f.close()
        with open(self.path, "wb") as out:
            out.write(len(text).to_bytes(8, "little"))
            out.write(text)
            for size in sizes:
                part = self.path.with_name(f"{self.path.name}.part{size}")
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 22)
                part.unlink()
        return self.data_bytes


class ShardSet:
    """Shards `{stem}-0000k-of-0000n.safetensors`: a group of tensors never spans two shards."""

    def __init__(self, folder: Path, stem: str, max_bytes: int):
        self.folder, self.stem, self.max_bytes = Path(folder), stem, max_bytes
        self.writers: list[StreamWriter] = []

    def add_group(self, tensors: dict[str, torch.Tensor]) -> int:
        """Write tensors to the current shard (or a new one past the budget); returns its index."""
        n = sum(t.numel() * t.element_size() for t in tensors.values())
        cur = self.writers[-1] if self.writers else None
        if cur is None or (cur.data_bytes and cur.data_bytes + n > self.max_bytes):
            cur = StreamWriter(self.folder / f".{self.stem}-{len(self.writers)}.pending")
            self.writers.append(cur)
        for k, t in tensors.items():
            cur.add(k, t)
        return len(self.writers) - 1

    def close(self) -> list[str]:
        """Finish every shard and give it its final name; returns the names by index."""
        total = len(self.writers)
        names = []
        for i, w in enumerate(self.writers):
            w.close()
            name = f"{self.stem}-{i + 1:05d}-of-{total:05d}.safetensors"
            w.path.rename(self.folder / name)
            names.append(name)
        return names


def _bad(path: Path, what: str) -> LibraryError:
    return LibraryError(f"{path.name} is not a valid safetensors file: {what}", file=str(path),
                        fix="re-export the library; never load it with pickle")


def _dim(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry_span(info) -> Optional[tuple[int, int]]:
    """(start, end) of a well-formed header entry: a known dtype, non-negative integer dims, integer
    offsets spanning exactly dtype size x elements; None otherwise."""
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        return None
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES or not isinstance(shape, list):
        return None
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_dim(s) for s in shape + offsets):
        return None
    start, end = offsets
    if end - start != math.prod(shape) * DTYPE_SIZES[dtype]:
        return None
    return start, end


def read_header(path: Path) -> dict:
    """The parsed header of a safetensors file, after checking its structure against the file size.

    The header is untrusted JSON (bounded size and depth, finite numbers); `__metadata__` maps strings to
    strings; every entry has a known dtype, non-negative integer dims and offsets that match them, and
    the entries tile the data exactly. Errors never quote the header."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _bad(path, "shorter than 8 bytes")
        n = int.from_bytes(head, "little")
        if n < 2 or n > min(MAX_HEADER, size - 8):
            raise _bad(path, "no safetensors header (pickle, zip or corrupt data?)")
        raw = f.read(n)
    if not raw.startswith(b"{"):
        raise _bad(path, "header is not a JSON object")
    try:
        header = parse_json(raw, max_bytes=MAX_HEADER)
    except UnsafeJSON as exc:
        raise _bad(path, f"header is not valid, safe JSON: {exc}") from None
    if not isinstance(header, dict):
        raise _bad(path, "header is not a JSON object")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _bad(path, "__metadata__ must map strings to strings")
    spans = []
    for i, (key, info) in enumerate(header.items()):
        if key == "__metadata__":
            continue
        span = _entry_span(info)
        if span is None:
            raise _bad(path, f"header entry {i + 1} is malformed (dtype, integer shape or data offsets)")
        spans.append(span)
    pos = 0
    for start, end in sorted(spans):
        if start != pos:
            raise _bad(path, "tensor data is not contiguous")
        pos = end
    if pos != size - 8 - n:
        raise _bad(path, f"data holds {size - 8 - n} bytes but the header describes {pos}")
    return header


def data_bytes(path: Path) -> int:
    """Bytes of tensor data in a safetensors file (the file size minus the 8-byte length and header)."""
    header = read_header(path)
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")
