"""Open and verify an expert library; assemble a task's state dict from it.

Opening checks, before any tensor is read: the manifest's format_version and names (manifest.py),
that the folder holds exactly the listed files (allow-list, no sub-folders, no symlink leaving the
folder), their sizes, and that every shard has a valid safetensors header. `verify=True` also checks
every sha256. Tensors are only ever read through safetensors: nothing is unpickled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from mergetool.core.budget import best_within
from mergetool.core.errors import LibraryError
from mergetool.core.safejson import UnsafeJSON, parse_json
from mergetool.library.manifest import MANIFEST, Manifest, Solution, StoredTensor
from mergetool.library.safetensors_io import DTYPE_NAMES, data_bytes, read_header
from mergetool.library.verify import REEXPORT, verify_folder
from mergetool.merge.adapters.ia3 import ia3_dense
from mergetool.merge.adapters.lora import lora_dense
from mergetool.merge.codecs import decode_base
from mergetool.merge.codecs import from_tensors as codec_from_tensors
from mergetool.merge.delta_experts import dense_from_delta
from mergetool.merge.quantize import dequantize, from_tensors

DTYPES = {str(d).removeprefix("torch."): d for d in DTYPE_NAMES}


def _fail(msg: str, where, fix: str = REEXPORT) -> LibraryError:
    return LibraryError(msg, file=str(where), fix=fix)


def select_solution(m: Manifest, *, budget: Optional[float] = None, solution: Optional[int] = None) -> int:
    """Index of the solution to use: by id, by budget (best P with C <= budget), else the default."""
    if solution is not None:
        for i, s in enumerate(m.solutions):
            if s.id == solution:
                return i
        raise LibraryError(f"solution {solution} is not in this library", key="--solution",
                           fix=f"use one of {', '.join(str(s.id) for s in m.solutions)}")
    if budget is None:
        return m.default_solution
    return best_within(m.solutions, budget, cost=lambda s: s.storage.storage_cost, performance=lambda s: s.performance,
                       what="solution in this library", error=LibraryError)


class LibraryFiles:
    """A checked library and one chosen solution (its chains)."""
    def __init__(self, path: Path, manifest: Manifest, index: int):
        self.path, self.manifest, self.index = Path(path), manifest, index
        self._handles: dict[str, object] = {}
        self._base: dict[str, torch.Tensor] = {}  # decoded stored base tensors (v2), shared by a component's experts

    @classmethod
    def load(cls, path, *, budget: Optional[float] = None, solution: Optional[int] = None,
             verify: bool = True) -> "LibraryFiles":
        path = Path(path)  # a local folder; `hub:` references go through mergetool.library.hub.open_library
        m = verify_folder(path, hashes=verify)
        return cls(path, m, select_solution(m, budget=budget, solution=solution))

    @property
    def solution(self) -> Solution:
        return self.manifest.solutions[self.index]

    @property
    def tasks(self) -> list[str]:
        return [t.name for t in self.manifest.tasks]

    def chain(self, task: str) -> list[str]:
        self.manifest.task(task)
        return self.solution.chains[task]

    def config(self, task: Optional[str] = None) -> dict:
        """The task model's config.json (num_labels, id2label), or the base's without a task."""
        name = self.manifest.task(task).config if task else self.manifest.base.config
        try:
            data = parse_json((self.path / name).read_bytes())
        except (UnsafeJSON, OSError) as exc:
            raise _fail(f"{name} is not valid, safe JSON: {exc}", self.path / name) from None
        if not isinstance(data, dict):
            raise _fail(f"{name} is not a JSON object", self.path / name)
        return data

    def _open(self, shard: str):
        if shard not in self._handles:
            from safetensors import safe_open

            read_header(self.path / shard)
            try:
                self._handles[shard] = safe_open(str(self.path / shard), framework="pt")
            except Exception as exc:  # noqa: BLE001 - safetensors raises its own and OS errors: all mean unreadable
                raise _fail(f"cannot read {shard}: {exc}", self.path / shard) from None
        return self._handles[shard]

    def read(self, st: StoredTensor) -> torch.Tensor:
        """One stored tensor, dequantised, checked against its manifest entry."""
        if st.codec is not None:
            raise _fail("a codec-stored tensor is read through its expert", self.path / st.shard)
        t = dequantize(from_tensors(self._parts(st), st.prefix, st.info()))
        if list(t.shape) != st.shape:
            raise _fail(f"tensor {st.prefix!r} has shape {list(t.shape)}, expected {st.shape}", self.path / st.shard)
        return t

    def _parts(self, st: StoredTensor) -> dict[str, torch.Tensor]:
        h = self._open(st.shard)
        keys = [st.prefix + k for k in st.keys]
        missing = [k for k in keys if k not in h.keys()]
        if missing:
            raise _fail(f"{st.shard} lacks tensors {missing[:3]}", self.path / st.shard)
        return {k: h.get_tensor(k) for k in keys}

    def stored_base(self, name: str) -> torch.Tensor:
        """decode(stored base) of one tensor (v2), float32, decoded once and kept: the reference of every
        delta expert of its component."""
        if name not in self._base:
            st = self.manifest.stored_base.get(name)
            if st is None:
                raise _fail("a delta expert's tensor has no stored base tensor", self.path / MANIFEST)
            self._base[name] = decode_base(codec_from_tensors(self._parts(st), st.prefix, st.codec))
        return self._base[name]

    def expert_state(self, eid: str) -> dict[str, torch.Tensor]:
        """An expert's tensors, dequantised; for adapter experts the effective base weights (as
        ExpertStore's `dense()`): W0 + scaling·B@A (LoRA) or W0 scaled by the vector (IA3); for delta experts
        (v2) decode(stored base) + decode(delta) in the tensor's dtype, bitwise as `dense()`."""
        e = self.manifest.expert(eid)
        if e.codec != "full":
            return {n: dense_from_delta(self.stored_base(n), codec_from_tensors(self._parts(st), st.prefix, st.codec),
                                        DTYPES[st.dtype]) for n, st in e.tensors.items()}
        stored = {n: self.read(st) for n, st in e.tensors.items()}
        if not e.adapter:
            return stored

        try:
            out = ia3_dense({w: (s.vector, s.dim) for w, s in e.adapter.items() if s.vector}, stored, self.frozen)
        except ValueError as exc:
            raise _fail(f"expert {eid}: {exc}", self.path / MANIFEST) from None
        for w, s in e.adapter.items():
            if s.a:
                out[w] = lora_dense(self._frozen_or_fail(w), stored[s.a], stored[s.b], s.scaling)
        return out

    def frozen(self, name: str) -> Optional[torch.Tensor]:
        """A frozen base tensor of an adapter library (None when the library has no such tensor)."""
        st = self.manifest.adapter.tensors.get(name) if self.manifest.adapter else None
        return None if st is None else self.read(st)

    def _frozen_or_fail(self, name: str) -> torch.Tensor:
        t = self.frozen(name)
        if t is None:
            raise _fail(f"the library stores no frozen base tensor {name!r}", self.path / MANIFEST)
        return t

    def frozen_state(self) -> dict[str, torch.Tensor]:
        """Every frozen base tensor (empty for libraries of full fine-tunes)."""
        return {n: self.read(st) for n, st in self.manifest.adapter.tensors.items()} if self.manifest.adapter else {}

    def task_state(self, task: str, *, original_names: bool = True) -> dict[str, torch.Tensor]:
        """The task's full state dict: its chain of experts (dequantised), heads and buffers."""
        t = self.manifest.task(task)
        state = {n: v for n, v in self.frozen_state().items() if n in t.original_names}  # adapters: W0
        for eid in self.chain(task):
            state.update(self.expert_state(eid))
        for n, st in list(t.heads.items()) + list(self.manifest.buffers.items()):
            state[n] = self.read(st)
        if original_names:
            state = {t.original_names.get(n, n): v for n, v in state.items()}
        return state

    def disk_report(self) -> dict[str, dict]:
        """Per file: bytes on disk and tensor-data bytes (safetensors only)."""
        rep = {}
        for name in sorted(self.manifest.files):
            p = self.path / name
            rep[name] = {"bytes": p.stat().st_size,
                         "data_bytes": data_bytes(p) if name.endswith(".safetensors") else None}
        return rep


def load_task_state(lib_dir, task: str, *, budget: Optional[float] = None, solution: Optional[int] = None,
                    original_names: bool = True, verify: bool = True) -> dict[str, torch.Tensor]:
    """A task's dequantised state dict from a verified library (the runtime builds on this).

    Keys are the task model's own tensor names (ready for `load_state_dict`), or the normalised
    names with original_names=False. Raises LibraryError on any integrity problem."""
    return LibraryFiles.load(lib_dir, budget=budget, solution=solution, verify=verify).task_state(
        task, original_names=original_names)
