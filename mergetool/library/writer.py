"""Export an expert library (format v1, or v2 for delta-coded experts), streaming one component at a time.

Experts come from `ExpertStore` (the same code the search scores), built with a cache of one
expert, so peak memory is about (T + 1) tensors of the largest component plus one expert.
Everything is written into a temporary folder next to the target, then renamed into place (staging).
PEFT adapter zoos (LoRA, IA3) also store the frozen base once (`frozen-*.safetensors`), and each
expert's slots say how its factors or vectors turn into base weights (manifest.AdapterSlot).
Delta-coded experts (a recipe codec other than `full`) make a format v2 library: each expert stores its
codec's tensors, and the base components they need are stored once (`base-*.safetensors`, writer_codecs).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from mergetool.core.errors import LibraryError
from mergetool.core.grouping import canonical
from mergetool.core.grouping import experts as expert_keys
from mergetool.core.grouping import members as group_members
from mergetool.core.storage import storage_cost
from mergetool.core.version import __version__
from mergetool.evaluation.runner import adapter_layout
from mergetool.library.card import render_card
from mergetool.library.manifest import (
    MANIFEST,
    README,
    TOKENIZER_FILES,
    AdapterSlot,
    Base,
    FileEntry,
    FrozenBase,
    Manifest,
    RouterInfo,
    Solution,
    Storage,
    StoredComponent,
    StoredExpert,
    StoredTensor,
    Task,
)
from mergetool.library.safetensors_io import ShardSet, StreamWriter
from mergetool.library.staging import make_tmp, recover, swap_in
from mergetool.library.verify import sha256_file, verify_folder
from mergetool.library.writer_codecs import BUG, delta_entries, write_stored_base
from mergetool.merge.experts import ExpertStore
from mergetool.merge.quantize import to_tensors
from mergetool.models.plan import Plan
from mergetool.models.source import ModelSource
from mergetool.recipe.schema import Recipe

EXTRA_FILES = ("preprocessor_config.json", "generation_config.json")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


@dataclass
class SolutionIn:
    """A grouping to export, with its front.json scores when it came from the search."""

    grouping: np.ndarray
    id: Optional[int] = None
    performance: Optional[float] = None
    per_task: Optional[dict] = None
    expected_cost: Optional[float] = None  # front.json's C, checked against the experts written
    codecs: Optional[list[int]] = None  # the recipe menu's codec per component (None: the menu's first)


def parse_size(text: str) -> int:
    """'2GB' -> 2·10⁹ bytes, '500MiB' -> 500·2²⁰, '1000' -> 1000; LibraryError otherwise."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else None
    if not m or unit not in _UNITS or float(m.group(1)) * _UNITS[unit] < 1:
        raise LibraryError(f"cannot read shard size {text!r}", key="--shard-size",
                           fix="use a size such as 2GB, 500MB or 1GiB")
    return int(float(m.group(1)) * _UNITS[unit])


def check_target(out: Path, force: bool, key: str = "--out") -> None:
    """Refuse an existing target unless --force; never replace a folder that is not a library. What a
    killed export left beside the target is cleaned first (an interrupted replacement is restored)."""
    recover(out)
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise LibraryError(f"{out} already exists", key=key, fix=f"choose another {key} or pass --force")
    if not out.is_dir() or out.is_symlink() or (any(out.iterdir()) and not (out / MANIFEST).is_file()):
        raise LibraryError(f"{out} exists and is not an expert library; --force only replaces libraries",
                           key=key, fix=f"choose another {key}")


def export_library(recipe: Recipe, plan: Plan, sources: tuple[ModelSource, Sequence[ModelSource]],
                   solutions: Sequence[SolutionIn], out: Path, *, shard_size: int = 2 * 10**9,
                   force: bool = False, default: int = 0, budget: Optional[float] = None,
                   progress: Optional[Callable[[str], None]] = None,
                   router: Optional[Callable[[Path, Manifest], RouterInfo]] = None) -> Manifest:
    """Write a library holding every expert of `solutions` (each stored once); returns its manifest.

    `router(folder, draft)` (see mergetool.pipeline.router_training.RouterBuilder) writes the router files into
    the unfinished library folder, given the draft manifest, and returns their RouterInfo."""
    out = Path(out).absolute()
    check_target(out, force)
    if not solutions:
        raise LibraryError("nothing to export", key="solutions")
    tmp = make_tmp(out)
    try:
        job = _Job(recipe, plan, sources[0], sources[1], tmp, shard_size, progress or (lambda _m: None))
        manifest = _write(job, solutions, default=default, budget=budget, router=router)
        swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


@dataclass
class _Job:
    """One export: what is written, where, and how."""

    recipe: Recipe
    plan: Plan
    base: ModelSource
    tasks: Sequence[ModelSource]
    tmp: Path
    shard_size: int
    say: Callable[[str], None]

    @property
    def names(self) -> list[str]:
        return list(self.plan.tasks)

    def release(self) -> None:
        for src in (self.base, *self.tasks):
            _release(src)  # pages mapped by earlier reads (e.g. the plan's value checks)


def _write(job: _Job, solutions: Sequence[SolutionIn], *, default: int, budget: Optional[float],
           router: Optional[Callable[[Path, Manifest], RouterInfo]]) -> Manifest:
    recipe, plan, tmp = job.recipe, job.plan, job.tmp
    job.release()
    store = ExpertStore(recipe, plan, job.base, job.tasks, cache_bytes=0)  # stream: one expert at a time
    Gs = [canonical(s.grouping) for s in solutions]
    codecs = [list(s.codecs) if s.codecs is not None else [0] * plan.L for s in solutions]
    experts, ids = _write_experts(job, store, Gs, codecs)
    delta = sorted({e.component for e in experts if e.codec != "full"})  # components whose base is stored
    stored_base, base_bits = (write_stored_base(store.stored_base, delta, tmp, job.shard_size) if delta
                              else ({}, {}))
    task_entries, head_bytes, frozen_names = _write_tasks(job, store)
    buffers = _write_buffers(job)
    frozen = _write_frozen(job.base, sorted(frozen_names), tmp, job.shard_size) if plan.adapter else None
    # configs and tokenizer: the library runs without the original models
    shutil.copyfile(job.base.path / "config.json", tmp / "config.json")
    _copy_tokenizer([s.path for s in job.tasks] + [job.base.path], tmp)

    by_id = {e.id: e for e in experts}

    def storage(eids) -> Storage:
        bits = sum(by_id[i].data_bits for i in eids)
        bits += sum(base_bits[l] for l in {by_id[i].component for i in eids if by_id[i].codec != "full"})
        masks = sum(by_id[i].mask_bytes for i in eids)
        frozen_base = bool(plan.adapter)  # the frozen base of an adapter zoo, as the search counts it
        return Storage(d=plan.d, base_bits=plan.base_bits,
                       storage_cost=storage_cost(bits, d=plan.d, base_bits=plan.base_bits, frozen_base=frozen_base),
                       storage_cost_with_heads=storage_cost(bits + 8 * head_bytes, d=plan.d, base_bits=plan.base_bits,
                                                            frozen_base=frozen_base),
                       expert_data_bytes=bits // 8 + masks, mask_bytes=masks, head_data_bytes=head_bytes)

    sols = [_solution(job, s, G, c, ids, storage, budget) for s, G, c in zip(solutions, Gs, codecs)]
    components = [StoredComponent(name=c.name, kind=c.kind, layer=c.layer, params=c.params,
                            tensors={n: list(job.tasks[0].meta(n).shape) for n in c.tensors})
                  for c in plan.components]
    all_storage = storage(by_id)
    draft = Manifest(
        format_version=2 if delta else 1, mergetool_version=__version__,
        base=Base(ref=recipe.base_model, model_type=plan.model_type, config="config.json",
                  config_sha256=sha256_file(tmp / "config.json")),
        tasks=task_entries, components=components, experts=experts, buffers=buffers, solutions=sols,
        default_solution=default, chains=sols[default].chains, storage_cost=all_storage.storage_cost,
        storage=all_storage, disk_bytes={}, quantization=asdict(store.spec),
        merge={"method": store.method, "parameters": dict(recipe.merge.parameters)},
        recipe=recipe.text, router=None, files={},
        adapter=FrozenBase(type=plan.adapter["type"], tensors=frozen) if plan.adapter else None,
        base_storage=recipe.base_storage if delta else None, stored_base=stored_base)
    return _finish(tmp, draft, router)


def _keys(G, codecs: Sequence[int]) -> list[tuple]:
    """The (component, members, codec) of every expert of one solution."""
    return [(l, m, codecs[l]) for l, m in expert_keys(G)]


def _write_experts(job: _Job, store: ExpertStore, Gs, codecs) -> tuple[list[StoredExpert], dict[tuple, str]]:
    """Every expert of every solution, component by component; one shared by several solutions (same
    members and codec) is stored once."""
    shards = ShardSet(job.tmp, "experts", job.shard_size)
    raw: list[dict] = []
    ids: dict[tuple, str] = {}
    for l, comp in enumerate(job.plan.components):
        keys = []
        for G, c in zip(Gs, codecs):
            keys += [k for k in _keys(G, c) if k[0] == l and k not in keys]
        for key in keys:
            ids[key] = f"e{len(raw)}"
            raw.append(_write_expert(job, store.expert(*key), ids[key], key, shards))
        job.release()
        job.say(f"component {l + 1}/{job.plan.L} {comp.name}: {len(keys)} expert(s)")
    shard_names = shards.close()
    for r in raw:
        for info in r["tensors"].values():
            info["shard"] = shard_names[info["shard"]]
    return [StoredExpert(**r) for r in raw], ids


def _write_expert(job: _Job, e, eid: str, key: tuple, shards: ShardSet) -> dict:
    tensors, written = delta_entries(e, eid, shards) if e.delta else ({}, 0)
    for name, qt in e.tensors.items():
        parts = to_tensors(qt, f"{eid}/{name}")
        idx = shards.add_group(parts)
        written += sum(t.numel() * t.element_size() for t in parts.values())
        tensors[name] = dict(shard=idx, prefix=f"{eid}/{name}", **qt.info())
    if written * 8 != e.bits + 8 * e.mask_bytes:  # C must be the truth about the bytes
        raise LibraryError(f"expert {eid}: {written} bytes written, {e.bits / 8 + e.mask_bytes} counted",
                           key="experts", fix=BUG)
    slots = {w: AdapterSlot(a=a, b=b, scaling=s) for w, (a, b, s) in e.lora.items()}
    slots.update({w: AdapterSlot(vector=v, dim=d) for w, (v, d) in e.ia3.items()})
    return dict(id=eid, component=key[0], group_members=[job.names[t] for t in key[1]],
                tensors=tensors, data_bits=e.bits, mask_bytes=e.mask_bytes, adapter=slots, codec=e.codec)


def _write_tasks(job: _Job, store: ExpertStore) -> tuple[list[Task], int, set]:
    """Per task: its own tensors (heads), its config and original tensor names."""
    plan, names, base = job.plan, job.names, job.base
    task_entries, head_bytes, frozen_names = [], 0, set()
    for t, src in enumerate(job.tasks):
        own = {n: v for n, v in store.own_tensors(t).items() if n not in plan.buffers}
        heads = {}
        if own:
            fname = f"heads-{names[t]}.safetensors"
            heads, data = _write_plain(job.tmp / fname, own)
            head_bytes += data
        cfg_name = f"config-{names[t]}.json"
        if plan.adapter:  # no config.json: the base's, with the task's labels and architecture
            config, original = adapter_layout(plan, src, base, job.recipe.tasks[names[t]].kind)
            (job.tmp / cfg_name).write_text(json.dumps(config, indent=1), encoding="utf-8")
            frozen_names.update(n for n in original if n in base and n not in own)
        else:
            config = src.config
            shutil.copyfile(src.path / "config.json", job.tmp / cfg_name)
            used = [n for c in plan.components for n in c.tensors] + list(own) + list(plan.buffers)
            original = {n: src.original_name(n) for n in used if n in src}
        arch = (config.get("architectures") or [None])[0]
        task_entries.append(Task(name=names[t], config=cfg_name, architecture=arch,
                                 labels=_labels(config), heads=heads, original_names=original))
    return task_entries, head_bytes, frozen_names


def _write_plain(path: Path, tensors: dict) -> tuple[dict[str, StoredTensor], int]:
    """Unquantised tensors into one safetensors file; their manifest entries and data bytes."""
    w = StreamWriter(path)
    entries = {}
    for n, v in tensors.items():
        w.add(n, v)
        entries[n] = StoredTensor(shard=path.name, prefix=n, shape=list(v.shape), dtype=_dt(v),
                                  bits=v.element_size() * 8, granularity="per_tensor", keys=[""])
    return entries, w.close()


def _write_buffers(job: _Job) -> dict[str, StoredTensor]:
    """Non-float buffers, equal in every model (checked by the plan), stored once."""
    if not job.plan.buffers:
        return {}
    return _write_plain(job.tmp / "buffers.safetensors", {n: job.tasks[0].get(n) for n in job.plan.buffers})[0]


def _solution(job: _Job, s, G, codecs: Sequence[int], ids: dict, storage: Callable,
              budget: Optional[float]) -> Solution:
    plan, names = job.plan, job.names
    chains = {names[t]: [ids[(l, group_members(G, t, l), codecs[l])] for l in range(plan.L)] for t in range(plan.T)}
    st = storage({ids[k] for k in _keys(G, codecs)})
    if s.expected_cost is not None and abs(st.storage_cost - s.expected_cost) > 1e-9 * max(1.0, s.expected_cost):
        raise LibraryError(f"solution {s.id}: the experts cost C = {st.storage_cost:.6g}, but front.json says "
                           f"{s.expected_cost:.6g}", key="front.json",
                           fix="the run was searched with another recipe; re-run the search or use --grouping")
    if budget is not None and st.storage_cost > budget:
        raise LibraryError(f"the chosen solution costs C = {st.storage_cost:.6g} > budget {budget:g}",
                           key="--budget", fix=f"raise the budget to at least {st.storage_cost:.6g}")
    return Solution(id=s.id, grouping=G.tolist(), performance=s.performance, per_task=s.per_task,
                    chains=chains, storage=st)


def _finish(tmp: Path, draft: Manifest, router) -> Manifest:
    """Router, model card, checksums, then the manifest (which the reader must accept)."""
    if router is not None:
        draft = draft.model_copy(update={"router": router(tmp, draft)})
    draft = draft.model_copy(update={"disk_bytes": disk_bytes(tmp, draft)})
    (tmp / README).write_text(render_card(draft), encoding="utf-8")
    files = {p.name: FileEntry(sha256=sha256_file(p), bytes=p.stat().st_size)
             for p in sorted(tmp.iterdir()) if p.name != MANIFEST}
    final = draft.model_copy(update={"files": files, "disk_bytes": disk_bytes(tmp, draft)})
    (tmp / MANIFEST).write_text(final.model_dump_json(indent=1) + "\n", encoding="utf-8")
    # the reader's own checks (manifest, listing, headers, sanity; checksums were just computed) before it is
    # published: a library this writer makes and the loader refuses is a bug, caught here rather than by a user
    return verify_folder(tmp, hashes=False, where=str(tmp), fix="report a bug: mergetool wrote a library it cannot read")


def disk_bytes(folder: Path, m: Manifest) -> dict[str, int]:
    """On-disk bytes per category (manifest.json excluded)."""
    cats = dict(experts=0, heads=0, buffers=0, router=0, base_features=0, other=0)
    if m.adapter:
        cats["frozen_base"] = 0
    if m.stored_base:
        cats["stored_base"] = 0
    router = {m.router.weights, m.router.config} if m.router else set()
    for p in folder.iterdir():
        if p.name == MANIFEST:
            continue
        n = p.name
        cat = ("experts" if n.startswith("experts-") else "heads" if n.startswith("heads-")
               else "buffers" if n == "buffers.safetensors" else "router" if n in router
               else "base_features" if n.startswith("base-features")
               else "frozen_base" if n.startswith("frozen-") and m.adapter
               else "stored_base" if n.startswith("base-") and m.stored_base else "other")
        cats[cat] += p.stat().st_size
    cats["total"] = sum(cats.values())
    return cats


def _write_frozen(base: ModelSource, names: list[str], tmp: Path, shard_size: int) -> dict[str, StoredTensor]:
    """The frozen base tensors the tasks' modules take, full precision, in shards."""
    shards = ShardSet(tmp, "frozen", shard_size)
    entries = {}
    for n in names:
        v = base.get(n)
        idx = shards.add_group({n: v.contiguous()})
        entries[n] = dict(shard=idx, prefix=n, shape=list(v.shape), dtype=_dt(v), bits=v.element_size() * 8,
                          granularity="per_tensor", keys=[""])
    shard_names = shards.close()
    _release(base)
    return {n: StoredTensor(**dict(e, shard=shard_names[e["shard"]])) for n, e in entries.items()}


def _release(src: ModelSource) -> None:
    """Unmap a model's safetensors files between components: otherwise their resident pages pile
    up to the size of every model. Pickled .bin checkpoints stay open (reloading them is costly)."""
    if all(Path(f).suffix == ".safetensors" for f in getattr(src, "_files", ())):
        src.close()


def _dt(t) -> str:
    return str(t.dtype).removeprefix("torch.")


def _labels(config: dict) -> Optional[list[str]]:
    id2label = config.get("id2label")
    if not isinstance(id2label, dict) or not id2label:
        return None
    try:
        return [str(id2label[k]) for k in sorted(id2label, key=lambda k: int(k))]
    except (TypeError, ValueError):
        return None


def _copy_tokenizer(dirs: Sequence[Path], dest: Path) -> None:
    """Tokenizer (and pre-processor) files from the first model folder that has any."""
    for d in dirs:
        found = [n for n in TOKENIZER_FILES + EXTRA_FILES if (Path(d) / n).is_file()]
        if any(n in TOKENIZER_FILES or n == "preprocessor_config.json" for n in found):
            for n in found:
                shutil.copyfile(Path(d) / n, dest / n)
            return
