"""Train the router at export (or reuse the run's cached one) and measure its routing accuracy.

Training data: each task's `router` split (at most router.max_per_task inputs per task, a seeded
subset), labelled with the task; never the validation or test data. Routing accuracy is measured on
the test split. Features come from the runtime itself, on the unfinished library, so the router is
trained on exactly what it will see.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from mergetool.core.errors import DataError, MergetoolError
from mergetool.evaluation.data import iter_records
from mergetool.inference.runtime import ExpertLibrary
from mergetool.library.manifest import Manifest, RouterInfo
from mergetool.library.reader import LibraryFiles
from mergetool.library.verify import sha256_file
from mergetool.models.source import ModelSource, max_length_of
from mergetool.pipeline.rundir import recipe_hash
from mergetool.recipe.schema import DataSplit, Recipe
from mergetool.routing.backbone import stage_of
from mergetool.routing.features import resolve, write_features
from mergetool.routing.router import CONFIG, WEIGHTS, Router

BATCH = 32  # router minibatch
INFO = "info.json"  # cache entry: what RouterInfo needs besides the files


def read_texts(spec: DataSplit, key: str, cap: Optional[int] = None, seed: int = 0) -> list[tuple]:
    """(text, text_pair) per record of a split; its `limit`, then at most `cap`, as seeded subsets."""
    rows = []
    for line, rec in iter_records(spec.path, key=key):
        for col in (spec.text, spec.text_pair):
            if col and rec.get(col) is None:
                raise DataError(f"record {line} has no column {col!r}", file=spec.path, key=key, line=line,
                                fix="set the split's `text` column")
        rows.append((str(rec[spec.text]), str(rec[spec.text_pair]) if spec.text_pair else None))
    if not rows:
        raise DataError("data file is empty", file=spec.path, key=key, fix="add examples")
    for n, s in ((spec.limit, spec.seed), (cap, seed)):
        if n is not None and n < len(rows):
            rows = [rows[i] for i in sorted(random.Random(s).sample(range(len(rows)), n))]
    return rows


def fit(X: torch.Tensor, y: torch.Tensor, tasks: Sequence[str], hidden: Sequence[int], epochs: int, lr: float,
        seed: int) -> Router:
    """Adam on cross-entropy, minibatches of 32, seeded init and order; features standardised."""
    X, y = X.detach().float().cpu().clone(), y.clone()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        router = Router(X.shape[1], hidden, tasks)
    router.mean.copy_(X.mean(0))
    router.std.copy_(X.std(0, unbiased=False).clamp_min(1e-6))
    opt = torch.optim.Adam(router.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    router.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a small MLP: extra threads only add synchronisation
    try:
        for _ in range(epochs):
            perm = torch.randperm(len(y), generator=g)
            for s in range(0, len(y), BATCH):
                idx = perm[s:s + BATCH]
                loss = torch.nn.functional.cross_entropy(router(X[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return router.eval()


class RouterBuilder:
    """`export_library(..., router=RouterBuilder(...))`: writes the router into the library folder."""
    def __init__(self, recipe: Recipe, base: ModelSource, *, cache_dir: Optional[Path] = None,
                 device: str = "auto", progress: Optional[Callable[[str], None]] = None):
        self.recipe, self.base, self.cache_dir, self.device = recipe, base, cache_dir, device
        self.say = progress or (lambda _m: None)
        self.cached = False

    def check(self) -> None:
        """Every task needs a `router` split (before any expert is built)."""
        for name in self.recipe.task_names:
            if self.recipe.tasks[name].router is None:
                raise MergetoolError(f"task {name!r} has no `router` split: every library ships a router trained on it",
                                     file=self.recipe.path, key=f"tasks.{name}.router",
                                     fix="add `router: {path: ...}` (data that is neither validation nor test)")

    def __call__(self, folder: Path, draft: Manifest) -> RouterInfo:
        self.check()
        cfg, names = self.recipe.router, [t.name for t in draft.tasks]
        kind, k = resolve(cfg.features, draft)
        storage = write_features(kind, self.base.path, folder)
        max_length = max_length_of([t.max_length for t in self.recipe.tasks.values()],
                                   json.loads((folder / draft.base.config).read_text()))
        key = self._key(kind, k, draft)
        entry = self.cache_dir / key if self.cache_dir else None
        self.cached = bool(entry and all((entry / f).is_file() for f in (WEIGHTS, CONFIG, INFO)))
        if self.cached:
            self.say(f"router: reusing {entry}")
            for f in (WEIGHTS, CONFIG):
                shutil.copyfile(entry / f, folder / f)
            info = json.loads((entry / INFO).read_text())
        else:
            rt = ExpertLibrary(LibraryFiles(folder, draft, draft.default_solution), device=self.device,
                               features=(kind, k, storage.file), pooling=cfg.pooling)
            info = self._train(rt, names, kind, k, max_length, folder)
            if entry is not None:
                tmp = entry.with_name(f".{key}.tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                for f in (WEIGHTS, CONFIG):
                    shutil.copyfile(folder / f, tmp / f)
                (tmp / INFO).write_text(json.dumps(info, indent=1) + "\n")
                shutil.rmtree(entry, ignore_errors=True)
                tmp.rename(entry)
        return RouterInfo(weights=WEIGHTS, config=CONFIG, features=kind, requested=cfg.features, prefix_stages=k,
                          pooling=cfg.pooling,
                          hidden=list(cfg.hidden), epochs=cfg.epochs, lr=cfg.lr, max_per_task=cfg.max_per_task,
                          seed=self.recipe.search.seed, max_length=max_length, feature_storage=storage, **info)

    def _train(self, rt, names: list[str], kind: str, k: int, max_length: int, folder: Path) -> dict:
        cfg, seed = self.recipe.router, self.recipe.search.seed
        X, y, counts = [], [], {}
        for t, name in enumerate(names):
            rows = read_texts(self.recipe.tasks[name].router, f"tasks.{name}.router", cfg.max_per_task, seed)
            counts[name] = len(rows)
            X.append(rt.features_of(rt.encode(rows)[0])[0])
            y += [t] * len(rows)
        self.say(f"router: {kind} features" + (f" ({k} shared stages)" if kind == "prefix" else "")
                 + f", training on {sum(counts.values())} inputs")
        router = fit(torch.cat(X), torch.tensor(y), names, cfg.hidden, cfg.epochs, cfg.lr, seed)
        if not all(torch.isfinite(p).all() for p in router.parameters()):  # never cache or ship a NaN router
            raise MergetoolError(f"router training diverged (NaN or inf weights) with lr {cfg.lr:g}", key="router.lr",
                                 fix="lower router.lr (default 5e-4)")
        extra = {"features": kind, "prefix_stages": k, "max_length": max_length, "seed": seed}
        router.save(folder, extra if cfg.pooling == "mean" else {**extra, "pooling": cfg.pooling})
        rt.use_router(router)
        per_task, tests, hits = {}, {}, 0
        for name in names:
            spec = self.recipe.tasks[name].test
            if spec is None:
                continue
            rows = read_texts(spec, f"tasks.{name}.test")
            routed = rt.route(rows)
            tests[name] = len(rows)
            right = sum(r == name for r in routed)
            per_task[name], hits = right / max(1, len(rows)), hits + right
        acc = hits / sum(tests.values()) if tests else None
        if acc is not None:
            self.say(f"router: routing accuracy {acc:.4f} on the test split")
        return {"train_examples": counts, "test_examples": tests, "routing_accuracy": acc,
                "routing_accuracy_per_task": per_task or None}

    def _key(self, kind: str, k: int, draft: Manifest) -> str:
        """Everything the router depends on: recipe, router settings, features, prefix experts, data."""
        n = 10**6
        prefix = [[l, draft.expert(draft.chains[draft.tasks[0].name][l]).group_members]
                  for l, c in enumerate(draft.components) if any(stage_of(x, n) < k for x in c.tensors)]
        splits = {}
        for name in self.recipe.task_names:
            for s in ("router", "test"):
                spec = getattr(self.recipe.tasks[name], s)
                if spec is not None:
                    splits[f"{name}.{s}"] = [spec.model_dump(mode="json"), _sha(Path(spec.path))]
        settings = self.recipe.router.model_dump(mode="json")
        if settings.get("pooling") == "mean":  # the default: keys (and cached routers) from before it stay valid
            settings.pop("pooling")
        data = {"format": 1, "recipe": recipe_hash(self.recipe), "router": settings,
                "features": kind, "prefix_stages": k, "prefix": prefix, "splits": splits,
                "tasks": [t.name for t in draft.tasks]}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:20]


def _sha(path: Path) -> str:
    if not path.is_file():
        return "missing"

    return sha256_file(path)
