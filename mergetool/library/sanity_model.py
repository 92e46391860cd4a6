"""Sanity of what a library's tensors go into: each task's model, the router and its features.

`check_models` builds every task's model from its config on the meta device (no memory, no init), as
the runtime builds it (the manifest's architecture, else AutoModelForSequenceClassification), and
checks, for every solution's chain, that each tensor the runtime would put into it has a place of the
same shape and kind (floating or not), and that the model gets every tensor it needs: a model that
lacks its head would otherwise run with a classifier transformers initialised at random.

`check_router` checks router.json (types, ranges, its agreement with the manifest and the tasks), the
router's weights (names, floating dtypes, shapes from router.json) and its input size against the base
config; `check_features` the `base`/`embeddings` features' weights against the base model.
"""

from __future__ import annotations

from typing import Callable, Iterator, NamedTuple, Optional

import torch

from mergetool.core.compat import skip_weight_init
from mergetool.core.errors import LibraryError
from mergetool.library.manifest import MANIFEST, Manifest, StoredTensor, Task
from mergetool.library.sanity_tensors import FLOATING, is_floating
from mergetool.models.source import max_length_of

Fail = Callable[..., LibraryError]
ROUTER_FORMAT = 1


class Load(NamedTuple):
    """A tensor the runtime puts into a task's model: its module name, shape, dtype and origin."""

    name: str
    shape: tuple
    dtype: str
    where: str
    file: str


def build_model(architecture: Optional[str], config, name: str, fail: Fail, *, auto: str):
    """The model `config` describes, on the meta device; `auto`: the transformers auto class used when
    the architecture is not a transformers class (as the runtime does)."""
    import transformers

    cls = getattr(transformers, architecture, None) if architecture else None
    if cls is not None and not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise fail("a task's architecture is not a transformers model class", MANIFEST)
    try:
        with torch.device("meta"), skip_weight_init():
            module = cls(config) if cls is not None else getattr(transformers, auto).from_config(config)
            module.tie_weights()  # tied aliases share one tensor, as after from_pretrained
            return module
    except Exception as exc:  # noqa: BLE001 - an untrusted config that does not build, whatever the reason
        raise fail(f"{name} does not describe a model transformers can build ({type(exc).__name__})",
                   name) from None


def places(module: torch.nn.Module) -> dict[str, tuple[tuple, bool]]:
    """Every parameter and buffer name (tied aliases too) -> (shape, floating)."""
    out = {}
    for n, t in list(module.named_parameters(remove_duplicate=False)) + list(
            module.named_buffers(remove_duplicate=False)):
        out[n] = (tuple(t.shape), t.is_floating_point())
    return out


def task_loads(m: Manifest, t: Task, chain: list[str]) -> Iterator[Load]:
    """What the runtime puts into task t's model for this chain (see inference.runtime._entry)."""
    names, experts = t.original_names, m.expert_map()
    frozen = m.adapter.tensors if m.adapter else {}

    def load(n: str, st: StoredTensor, where: str) -> Load:
        return Load(names.get(n, n), tuple(st.shape), st.dtype, where, st.shard)

    for n, st in frozen.items():
        if n in names:
            yield load(n, st, "a frozen base tensor")
    for eid in chain:
        e = experts[eid]
        where = f"a tensor of expert {e.id}"
        if not e.adapter:
            yield from (load(n, st, where) for n, st in e.tensors.items())
            continue
        for w, slot in e.adapter.items():  # the effective (dense) weights
            yield load(w, frozen[w], where)
            bias = w.removesuffix("weight") + "bias"
            if slot.vector is not None and slot.dim == 0 and bias in frozen:
                yield load(bias, frozen[bias], where)
    for n, st in t.heads.items():
        yield load(n, st, f"a head tensor of task {t.name!r}")
    for n, st in m.buffers.items():
        yield load(n, st, "a buffer")


def check_task_model(m: Manifest, t: Task, config, chains: list[list[str]], fail: Fail) -> None:
    """Task t's model (built from its config) against every chain it may run with."""
    module = build_model(t.architecture, config, t.config, fail, auto="AutoModelForSequenceClassification")
    where = places(module)
    state = module.state_dict(keep_vars=True)
    cls = type(module).__name__
    for chain in chains:
        loaded = set()
        for ld in task_loads(m, t, chain):
            shape, floating = where.get(ld.name, (None, None))
            if shape != ld.shape:
                raise fail(f"{t.config} does not match the library's tensors: {ld.where} has no place of its shape "
                           f"in the {cls} it describes (hidden_size or another dimension differs)", t.config)
            if floating != is_floating(ld.dtype):
                raise fail(f"{ld.where} is {'not ' if floating else ''}floating point, unlike the weight it replaces "
                           f"in the {cls}", ld.file)
            loaded.add(ld.name)
        done = {id(state[n]) for n in loaded if n in state}
        missing = [n for n, v in state.items() if n not in loaded and id(v) not in done]
        if missing:
            prefix = (getattr(module, "base_model_prefix", "") or "") + "."
            head = ", its task head among them," if any(not n.startswith(prefix) for n in missing) else ""
            raise fail(f"task {t.name!r}: the library holds no tensors for {len(missing)} of its {cls}'s weights "
                       f"(first: {missing[0]}){head} so transformers would initialise them at random", MANIFEST)


def check_models(m: Manifest, configs: dict, fail: Fail) -> None:
    for t in m.tasks:
        chains = []
        for s in m.solutions:
            if s.chains[t.name] not in chains:
                chains.append(s.chains[t.name])
        check_task_model(m, t, configs[t.name], chains, fail)


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_router(m: Manifest, docs: dict, headers: dict[str, dict], base, fail: Fail) -> None:
    """router.json and router.safetensors against each other, the manifest, the tasks and the base."""
    info, tasks = m.router, [t.name for t in m.tasks]
    cfg = docs.get(info.config)

    def bad(what: str, fix: Optional[str] = None) -> LibraryError:
        return fail(f"{info.config}: {what}", info.config, *([fix] if fix else []))

    if not isinstance(cfg, dict):
        raise bad("the router config is not a JSON object")
    if cfg.get("format") != ROUTER_FORMAT or isinstance(cfg.get("format"), bool):
        raise bad("unknown router format", "upgrade mergetool or re-export the library")
    in_dim, hidden, names = cfg.get("in_dim"), cfg.get("hidden"), cfg.get("tasks")
    if not _count(in_dim):
        raise bad("in_dim must be a positive integer")
    if not (isinstance(hidden, list) and len(hidden) == 2 and all(_count(h) for h in hidden)):
        raise bad("hidden must be two positive integers")
    if hidden != info.hidden:
        raise bad("hidden differs from the manifest's router.hidden")
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names) and sorted(names) == sorted(tasks)):
        raise bad("tasks must be the library's tasks, each once")
    for key in ("features", "prefix_stages", "max_length", "pooling"):
        if key in cfg and (cfg[key] != getattr(info, key) or isinstance(cfg[key], bool)):
            raise bad(f"{key} differs from the manifest's router.{key}")
    if "seed" in cfg and (not isinstance(cfg["seed"], int) or isinstance(cfg["seed"], bool)):
        raise bad("seed must be an integer")
    _check_lengths(m, base, docs[m.base.config], in_dim, fail)
    _check_router_weights(info.weights, headers, in_dim, hidden, len(tasks), info.config, fail)


def _check_lengths(m: Manifest, base, base_dict: dict, in_dim: int, fail: Fail) -> None:
    """The router's input size and max_length against the base config."""
    info = m.router
    size = getattr(base, "hidden_size", None)
    width = 2 if info.pooling == "mean_max" else 1  # mean and max side by side
    if info.features in ("prefix", "base") and isinstance(size, int) and size * width != in_dim:
        raise fail(f"hidden_size in {m.base.config} differs from the router's input size in {info.config}",
                   m.base.config)
    if max_length_of([info.max_length], base_dict) < info.max_length:  # the runtime's own rule
        raise fail(f"router.max_length is longer than the position table in {m.base.config}", MANIFEST)


def _check_router_weights(name: str, headers: dict, in_dim: int, hidden: list, n_tasks: int, config: str,
                          fail: Fail) -> None:
    header = headers.get(name)
    if header is None:
        raise fail(f"the router's weights {name} are not a safetensors file", MANIFEST)
    h1, h2 = hidden
    want = {"mean": [in_dim], "std": [in_dim], "net.0.weight": [h1, in_dim], "net.0.bias": [h1],
            "net.2.weight": [h2, h1], "net.2.bias": [h2], "net.4.weight": [n_tasks, h2], "net.4.bias": [n_tasks]}
    got = {k: v for k, v in header.items() if k != "__metadata__"}
    if set(got) != set(want):
        raise fail(f"{name} does not hold exactly the router's tensors", name)
    if any(got[k]["dtype"] not in FLOATING or got[k]["shape"] != want[k] for k in want):
        raise fail(f"{name}: a tensor is not floating point or its shape does not match {config}", name)


def check_features(m: Manifest, headers: dict[str, dict], base, fail: Fail) -> None:
    """The `base`/`embeddings` router features' weights fit the base model its config describes."""
    info = m.router
    if info.features == "prefix":
        return
    file = info.feature_storage.file
    header = headers.get(file) if file else None
    if header is None:
        raise fail(f"the {info.features} router features need their safetensors weights file", MANIFEST)
    where = places(build_model(None, base, m.base.config, fail, auto="AutoModel"))
    for i, (k, v) in enumerate(x for x in header.items() if x[0] != "__metadata__"):
        shape, floating = where.get(k, (None, None))
        if shape != tuple(v["shape"]) or floating != (v["dtype"] in FLOATING):
            raise fail(f"{file} does not match {m.base.config}: its tensor {i + 1} has no place of its shape "
                       "and dtype in the base model", file)
