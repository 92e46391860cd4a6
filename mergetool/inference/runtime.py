"""Inference over an expert library (Algorithm 2): route inputs, assemble chains, predict in batches.

    lib = ExpertLibrary.load("lib/")             # checksums verified
    lib.predict(["some text", ...])              # [{task, label, label_id, score}, ...] in input order
    model = lib.assemble("task0")                # a plain transformers module for that task's chain

Tasks with identical chains share one assembled backbone; backbones of different chains share the
parameters of the experts they have in common. Inputs are grouped by chain and each group runs in
batches, so the backbone runs Σ_chains ⌈n_chain / batch_size⌉ times per chunk of inputs; every input
then gets its own task's head. With `prefix` features the shared stages run once per batch, the
router reads their pooled output, and each chain continues from those hidden states.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from torch import nn

from mergetool.core.compat import skip_weight_init
from mergetool.core.errors import LibraryError, MergetoolError
from mergetool.evaluation import stages
from mergetool.evaluation.runner import instantiate, pick_device
from mergetool.inference.inputs import Inputs, encode, length_batches, pad, per_input, read_items
from mergetool.inference.second_opinion import check_threshold, reconsider, result, store, unsure
from mergetool.library.hub import open_library
from mergetool.library.reader import LibraryFiles
from mergetool.models.source import max_length_of
from mergetool.recipe.loader import parse_recipe
from mergetool.routing import backbone as bb
from mergetool.routing.features import config_from_dict, load_extractor, shared_prefix
from mergetool.routing.router import Router


@dataclass
class _Chain:
    backbone: nn.Module
    modules: dict = field(default_factory=dict)  # task -> its module (sharing `backbone`)


class ExpertLibrary:
    """A verified expert library, ready to route and predict."""
    chunk_size = 4096  # inputs routed and grouped together (bounds the cached prefix states)

    def __init__(self, store: LibraryFiles, *, device: str = "auto", max_resident_models: int = 4,
                 features: Optional[tuple[str, int, Optional[str]]] = None, pooling: Optional[str] = None,
                 second_opinion: Optional[float] = None):
        self.store, self.manifest, self.path = store, store.manifest, store.path
        self.device = pick_device(device)
        self.max_resident_models = max(1, int(max_resident_models))
        info = self.manifest.router
        if features is None and info is not None:
            features = (info.features, info.prefix_stages, info.feature_storage.file)
        self.features, self.prefix_stages, self._feature_file = features or (None, 0, None)
        self.pooling = pooling or (info.pooling if info is not None else "mean")  # of the router features
        self.second_opinion = check_threshold(second_opinion)  # predict's default threshold; None: off
        if self.features == "prefix" and shared_prefix(self.manifest) < self.prefix_stages:
            raise LibraryError(f"the chains do not share the router's {self.prefix_stages} prefix stages",
                               key="router.prefix_stages", fix="re-export the library")
        self._resident: OrderedDict[tuple, _Chain] = OrderedDict()
        self._params: dict[str, dict[str, nn.Parameter]] = {}
        self._tokenizer = self._router = self._extractor = None
        self._frozen_params: Optional[dict] = None
        self.stats: Counter = Counter()

    @classmethod
    def load(cls, path, device: str = "auto", *, budget: Optional[float] = None, solution: Optional[int] = None,
             verify: bool = True, max_resident_models: int = 4) -> "ExpertLibrary":
        """Open and check a library (sha256 of every file unless verify=False)."""
        return cls(open_library(path, budget=budget, solution=solution, verify=verify),
                   device=device, max_resident_models=max_resident_models)

    # --- chains and assembly --------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        return self.store.tasks

    def chain(self, task: str) -> tuple[str, ...]:
        return tuple(self.store.chain(task))

    def assemble(self, task: str) -> nn.Module:
        """The task's model (its own head on its chain's shared backbone), in eval mode."""
        return self._module(self._entry(task), task)

    def _entry(self, task: str) -> _Chain:
        chain = self.chain(task)
        if chain in self._resident:
            self._resident.move_to_end(chain)
            return self._resident[chain]
        module = self._new_module(task)
        names = self.manifest.task(task).original_names
        loaded = set()
        for n, p in self._frozen().items():  # adapter libraries: the shared frozen base, under the experts
            if n in names:
                loaded.add(bb.put(module, names[n], p))
        for eid in chain:
            for n, p in self._expert(eid).items():
                loaded.add(bb.put(module, names.get(n, n), p))
        for n, st in self.manifest.buffers.items():
            loaded.add(bb.put(module, names.get(n, n), self.store.read(st).to(self.device)))
        loaded |= self._load_head(module, task)
        missing = bb.unloaded(module, loaded)
        if missing:
            raise LibraryError(f"the library holds no tensors for {missing[:3]} of task {task!r}",
                               key="experts", fix="re-export the library")
        entry = _Chain(bb.backbone_of(module), {task: module.to(self.device)})
        self._resident[chain] = entry
        while len(self._resident) > self.max_resident_models:
            self._resident.popitem(last=False)
        used = {e for c in self._resident for e in c}
        self._params = {e: p for e, p in self._params.items() if e in used}
        return entry

    def _module(self, entry: _Chain, task: str) -> nn.Module:
        if task not in entry.modules:
            module = self._new_module(task)
            bb.set_backbone(module, entry.backbone)
            own = {k for k in module.state_dict() if not k.startswith(module.base_model_prefix + ".")}
            missing = sorted(own - self._load_head(module, task))
            if missing:
                raise LibraryError(f"the library holds no tensors for {missing[:3]} of task {task!r}",
                                   key="heads", fix="re-export the library")
            entry.modules[task] = module.to(self.device)
        return entry.modules[task]

    def _new_module(self, task: str) -> nn.Module:
        import transformers

        t = self.manifest.task(task)
        config = config_from_dict(self.store.config(task))
        cls = getattr(transformers, t.architecture, None) if t.architecture else None
        if cls is not None:
            module = instantiate(cls, config, skip_init=True)
        else:
            with skip_weight_init():
                module = transformers.AutoModelForSequenceClassification.from_config(config)
        return module.eval()

    def _expert(self, eid: str) -> dict[str, nn.Parameter]:
        if eid not in self._params:
            self._params[eid] = {n: nn.Parameter(t.to(self.device, torch.float32 if t.is_floating_point() else t.dtype),
                                                 requires_grad=False)
                                 for n, t in self.store.expert_state(eid).items()}
        return self._params[eid]

    def _frozen(self) -> dict[str, nn.Parameter]:
        if self._frozen_params is None:
            self._frozen_params = {n: nn.Parameter(t.to(self.device), requires_grad=False)
                                   for n, t in self.store.frozen_state().items()}
        return self._frozen_params

    def _load_head(self, module: nn.Module, task: str) -> set:
        t = self.manifest.task(task)
        return {bb.put(module, t.original_names.get(n, n), nn.Parameter(self.store.read(st).to(self.device),
                                                                      requires_grad=False))
                for n, st in t.heads.items()}

    @property
    def resident_chains(self) -> int:
        """Assembled chains held in memory (at most max_resident_models)."""
        return len(self._resident)

    def resident_bytes(self) -> int:
        """Bytes of every distinct tensor held by resident models, the router and its extractor."""
        mods = [m for c in self._resident.values() for m in c.modules.values()]
        mods += [m for m in (self._router, getattr(self._extractor, "module", None)) if m is not None]
        seen = {}
        for m in mods:
            for t in list(m.parameters()) + list(m.buffers()):
                s = t.untyped_storage()
                seen[(s.device, s.data_ptr())] = s.nbytes()
        return sum(seen.values())

    # --- inputs ---------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(str(self.path))
            except (OSError, ValueError) as exc:
                raise LibraryError(f"the library has no usable tokenizer: {str(exc)[:160]}", file=str(self.path),
                                   fix="export from models saved with their tokenizer") from None
        return self._tokenizer

    @property
    def max_length(self) -> int:
        info = self.manifest.router
        if info is not None:
            return info.max_length
        try:
            lengths = [t.max_length for t in parse_recipe(self.manifest.recipe).tasks.values()]
        except MergetoolError:
            lengths = []
        return max_length_of(lengths, self.store.config())

    def encode(self, items: list[tuple]) -> tuple[list[dict], list[bool]]:
        """Token ids per input (truncated to max_length) and whether each was truncated."""
        return encode(self.tokenizer, self.max_length, items)

    def _pad(self, encs: list[dict], rows: Sequence[int]) -> dict[str, torch.Tensor]:
        return pad(encs, rows, self.tokenizer.pad_token_id or 0, self.device)

    # --- routing --------------------------------------------------------------------------------
    def use_router(self, router) -> None:
        """Route with `router` (a trained `routing.router.Router`) instead of the library's stored one."""
        self._router = router.to(self.device)

    def _load_router(self):
        if self._router is None:
            info = self.manifest.router
            if info is None:
                raise LibraryError("this library has no router", file=str(self.path),
                                   fix="pass task=... (--task), or re-export the library")
            router, cfg = Router.load(self.path, info.weights, info.config)
            if sorted(router.tasks) != sorted(self.tasks):
                raise LibraryError("the router's tasks differ from the library's", file=str(self.path / info.config),
                                   fix="re-export the library")
            self._router = router.to(self.device)
        return self._router

    def features_of(self, encs: list[dict], batch_size: int = 64) -> tuple[torch.Tensor, Optional[tuple]]:
        """Router features h(x) in input order and, for `prefix`, the prefix hidden states of every
        input's real tokens: (flat tokens + one zero row, start per input, length per input)."""
        if self.features is None:
            raise LibraryError("this library has no router features", file=str(self.path),
                               fix="pass task=... (--task), or re-export the library")
        if self.features != "prefix" and self._extractor is None:
            self._extractor = load_extractor(self.features, self.path, self._feature_file, self.store.config(),
                                             self.device, self.pooling)
        n = len(encs)
        order = sorted(range(n), key=lambda i: -len(encs[i]["input_ids"]))
        feats, tokens = [], []
        starts, lens = torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)
        offset = 0
        with torch.inference_mode():
            for rows in length_batches(order, [len(e["input_ids"]) for e in encs], batch_size):
                batch = self._pad(encs, rows)
                if self.features != "prefix":
                    feats.append(self._extractor(batch))
                    self.stats["feature_calls"] += 1
                    continue
                t0 = time.perf_counter()
                h = self._prefix(batch)  # the chains' own first stages, reused by them below
                self.stats["prefix_s"] += time.perf_counter() - t0
                mask = batch["attention_mask"]
                feats.append(bb.pool(h, mask, self.pooling))
                tokens.append(h[mask.bool()])  # real tokens, row after row (right padding)
                row_lens = mask.sum(1).cpu()
                idx = torch.tensor(rows)
                starts[idx], lens[idx] = offset + torch.cumsum(row_lens, 0) - row_lens, row_lens
                offset += int(row_lens.sum())
            if not feats:
                return torch.zeros(0), None
            where = torch.empty(n, dtype=torch.long)
            where[torch.tensor(order)] = torch.arange(n)
            f = torch.cat(feats)[where.to(feats[0].device)]
            if not tokens:
                return f, None
            flat = torch.cat(tokens + [tokens[0].new_zeros((1, tokens[0].shape[-1]))])
        return f, (flat, starts, lens)

    def _prefix(self, batch: dict) -> torch.Tensor:
        backbone = self._entry(self.tasks[0]).backbone  # every chain shares these stages
        h = stages.encoder_embed(backbone, batch)
        h = stages.encoder_layers(backbone, h, stages.encoder_mask(backbone, batch["attention_mask"], h), 0,
                                  self.prefix_stages - 1)
        self.stats["prefix_calls"] += 1
        return h

    @property
    def router_tasks(self) -> list[str]:
        """The tasks in the order of the router's outputs."""
        return self._load_router().tasks

    def route(self, inputs: Inputs, batch_size: int = 64) -> list[str]:
        """The task the router picks for each input."""
        encs, _ = self.encode(read_items(inputs))
        return self._route(encs, batch_size)[0]

    def _route(self, encs: list[dict], batch_size: int) -> tuple[list[str], Optional[tuple], Optional[list]]:
        """The router's task per input, the prefix states, and its probabilities per input."""
        router = self._load_router()
        feats, states = self.features_of(encs, batch_size)
        if not encs:
            return [], states, []
        with torch.inference_mode():
            probs = torch.softmax(router(feats).float(), -1).cpu()
        return [router.tasks[i] for i in probs.argmax(-1).tolist()], states, probs.tolist()

    # --- prediction -----------------------------------------------------------------------------
    def predict(self, inputs: Inputs, batch_size: int = 64, task: Union[None, str, Sequence] = None, *,
                head: Optional[Sequence] = None, return_logits: bool = False,
                second_opinion: Optional[float] = None) -> list[dict]:
        """{task, label, label_id, score} per input, in input order; `"truncated": True` on inputs cut to
        max_length; with return_logits, also the head's `logits` and (routed inputs) the router's `routing`
        probabilities per task.

        inputs: texts, (text, text_pair) tuples or {"text", "text_pair"} dicts. task: None routes each
        input; a task name skips routing; a list gives each input's task (oracle routing), None entries
        being routed; it picks the chain and the head. head: a task per input (None: the chain's) whose
        head runs on that input's chain, e.g. the true task on the routed chain (backbone-routed); a result's
        `task` is then the head's and `chain` the chain's. second_opinion: a threshold in (0, 1] (default
        self.second_opinion; None = off), see mergetool.inference.second_opinion."""
        if batch_size < 1:
            raise MergetoolError(f"batch size must be positive, got {batch_size}", key="batch_size")
        threshold = check_threshold(second_opinion) if second_opinion is not None else self.second_opinion
        items = read_items(inputs)
        task = per_input(self.manifest, task, len(items), "task")
        head = per_input(self.manifest, head, len(items), "head")
        out: list[dict] = []
        for s in range(0, len(items), self.chunk_size):
            part = task if task is None or isinstance(task, str) else task[s:s + self.chunk_size]
            heads = None if head is None else head[s:s + self.chunk_size]
            out += self._predict_chunk(items[s:s + self.chunk_size], batch_size, part, heads, return_logits,
                                       threshold)
        return out

    def _predict_chunk(self, items, batch_size, task, head, return_logits, threshold) -> list[dict]:
        t0 = time.perf_counter()
        encs, truncated = self.encode(items)
        self.stats["truncated"] += sum(truncated)
        t1 = time.perf_counter()
        given = [task] * len(items) if task is None or isinstance(task, str) else task
        states = probs = None
        tasks = given
        if any(t is None for t in given):  # route (all inputs: prefix states are per input and reused)
            routed, states, probs = self._route(encs, batch_size)
            tasks = [r if t is None else t for t, r in zip(given, routed)]
        heads = tasks if head is None else [h or t for h, t in zip(head, tasks)]
        t2 = time.perf_counter()
        logits = self.run_chains(range(len(items)), encs, tasks, heads, states, batch_size)
        asked: list = []
        if threshold is not None and probs is not None:
            own = [g is None and (head is None or head[i] is None) for i, g in enumerate(given)]
            tasks, heads, asked = reconsider(self, unsure(probs, own, threshold), encs, tasks, heads, probs, logits,
                                             states, batch_size)
        t3 = time.perf_counter()
        self.stats.update(tokenize_s=t1 - t0, route_s=t2 - t1, chain_s=t3 - t2, inputs=len(items))
        out = [result(self.manifest.task(h).labels, h, lg, return_logits) for h, lg in zip(heads, logits)]
        for i, res in enumerate(out):
            if truncated[i]:
                res["truncated"] = True
            if heads[i] != tasks[i]:
                res["chain"] = tasks[i]
            if return_logits and probs is not None and given[i] is None:
                res["routing"] = dict(zip(self._router.tasks, probs[i]))
                if i in asked:
                    res["second_opinion"] = True
        return out

    def run_chains(self, rows, encs: list[dict], tasks: list, heads: list, states, batch_size: int) -> list:
        """(logits, arg max, probability) of `rows` (None elsewhere): tasks[i]'s chain, heads[i]'s head."""
        groups: dict[tuple, list[int]] = {}
        for i in rows:
            groups.setdefault(self.chain(tasks[i]), []).append(i)
        logits: list = [None] * len(encs)
        lengths = [len(e["input_ids"]) for e in encs]
        with torch.inference_mode():
            for rs in groups.values():
                rs = sorted(rs, key=lambda i: -lengths[i])
                for batch in length_batches(rs, lengths, batch_size):
                    self._run_chain(batch, encs, tasks, heads, states, logits)
        return logits

    def _run_chain(self, rows, encs, tasks, heads, states, logits) -> None:
        entry = self._entry(tasks[rows[0]])
        by_task: dict[str, list[int]] = {}
        for j, i in enumerate(rows):
            by_task.setdefault(heads[i], []).append(j)
        modules = {t: self._module(entry, t) for t in by_task}
        if all(bb.has_head(m) for m in modules.values()):
            if states is not None:
                h, mask = bb.repad(states, rows)
                ext = stages.encoder_mask(entry.backbone, mask, h)
                h = stages.encoder_layers(entry.backbone, h, ext, self.prefix_stages - 1, bb.n_layers(entry.backbone))
                seq, pooled = bb.finish(entry.backbone, h)
            else:
                seq, pooled = bb.full(entry.backbone, self._pad(encs, rows))
            self.stats["backbone_calls"] += 1
            for t, pos in by_task.items():
                if len(pos) == len(rows):
                    out = bb.head(modules[t], seq, pooled)
                else:
                    sel = torch.tensor(pos, device=seq.device)
                    out = bb.head(modules[t], seq[sel], None if pooled is None else pooled[sel])
                store(out, pos, rows, logits)
            return
        batch = self._pad(encs, rows)  # no split head for this architecture: one pass per task
        for t, pos in by_task.items():
            sel = torch.tensor(pos, device=self.device)
            out = modules[t](**{k: v[sel] for k, v in batch.items()}).logits
            self.stats["backbone_calls"] += 1
            store(out, pos, rows, logits)
