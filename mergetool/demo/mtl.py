"""Traditional multi-task learning (the paper's Table I "Traditional MTL" row, issue #18): one encoder trained
on every task's labelled train split at once, with one classification head per task.

`train_mtl` fine-tunes the base with the demo zoo's own optimiser (training.optimizer_and_schedule: AdamW, weight
decay 0.01, 10 % warm-up then linear decay, batch 32, gradient clipping 1.0): each batch holds one task's
inputs, the batches of all tasks shuffled together (seeded), so every task is seen in proportion to its data.
The result is written as one ordinary checkpoint per task (the shared encoder and that task's head), so
`mergetool baselines --mtl DIR` scores it with the evaluator every other row uses. `build_mtl` trains it on
the demo zoo and caches it in ZOO/mtl/ like the zoo (a settings hash in mtl.json; written in a temp dir, then
renamed into place).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import time
from pathlib import Path
from typing import Mapping, Optional

from mergetool.core.errors import MergetoolError
from mergetool.demo import training, zoo
from mergetool.evaluation.data import iter_records

MTL_EPOCHS = 2  # the zoo's default for three of its four tasks
MTL_LR = 1e-4  # within the zoo's per-task range (8e-5 .. 1.5e-4)


def train_mtl(base: Path, data: Mapping[str, Mapping[str, Path]], classes: Mapping[str, list[str]], out: Path, *,
              epochs: int = MTL_EPOCHS, lr: float = MTL_LR, seed: int = 0, device=None,
              batch_size: int = training.BATCH_SIZE, progress=None) -> dict:
    """Train the shared encoder and the heads on data[task]["train"]; write out/<task>/; per-task accuracies.
    `progress`: a rich Progress (training.progress_bar) to show the steps on."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    device = device or torch.device("cpu")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    with training.quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(base)
        models, shared = {}, None
        for task, names in classes.items():
            m = AutoModelForSequenceClassification.from_pretrained(
                base, num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
            if shared is None:
                shared = m.base_model
            else:
                setattr(m, m.base_model_prefix, shared)  # one encoder, a head per task
            models[task] = m.to(device)
    container = torch.nn.ModuleDict(models)  # its parameters count the shared encoder once
    pad_id = tokenizer.pad_token_id or 0
    encoded = {}
    for task in classes:
        encoded[task] = {}
        for split in ("train", "validation", "test"):
            rows = [rec for _, rec in iter_records(data[task][split])] if split in data[task] else []
            ids = tokenizer([r["text"] for r in rows], truncation=True, max_length=training.MAX_LENGTH)["input_ids"] if rows else []
            encoded[task][split] = (ids, [classes[task].index(r["label"]) for r in rows])
    steps = sum(math.ceil(len(encoded[t]["train"][0]) / batch_size) for t in classes) * epochs
    optimizer, schedule = training.optimizer_and_schedule(container, lr, max(1, steps))
    bar = progress.add_task("mtl", total=steps) if progress is not None else None
    for epoch in range(epochs):
        container.train()
        plan = [(t, b) for t in classes
                for b in training.length_batches([len(x) for x in encoded[t]["train"][0]], batch_size, rng)]
        rng.shuffle(plan)
        for task, batch in plan:
            ids, y = encoded[task]["train"]
            inputs = training.collate([ids[i] for i in batch], pad_id, device)
            loss = models[task](**inputs, labels=torch.tensor([y[i] for i in batch], device=device)).loss
            training.train_step(loss, container, optimizer, schedule)
            if bar is not None:
                progress.update(bar, advance=1, description=f"mtl ep {epoch + 1}/{epochs} {task} loss {loss.item():.3f}")
    metrics = {}
    for task, m in models.items():
        metrics[task] = {f"{split}_accuracy": round(training.accuracy(m, *encoded[task][split], pad_id, device), 4)
                         for split in ("validation", "test") if encoded[task][split][0]}
        m.to("cpu")
        with training.quiet_transformers():
            m.save_pretrained(out / task, safe_serialization=True)
            tokenizer.save_pretrained(out / task)
    return {"tasks": metrics, "steps": steps, "epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed}


def mtl_dir(zoo_dir: Optional[Path] = None) -> Path:
    return (zoo_dir or zoo.default_zoo_dir()) / "mtl"


def build_mtl(zoo_dir: Optional[Path] = None, *, device: str = "auto", seed: int = 0, epochs: int = MTL_EPOCHS,
              lr: float = MTL_LR, force: bool = False, progress: bool = True) -> Path:
    """The demo zoo's MTL model in ZOO/mtl/<task>/ (cached by settings hash); returns ZOO/mtl."""
    folder = zoo_dir or zoo.default_zoo_dir()
    manifest = zoo.read_manifest(folder)
    tasks = manifest.get("tasks") or {}
    if not tasks:
        raise MergetoolError(f"no demo zoo in {folder}", key="zoo", fix="build it first: python examples/build_demo_zoo.py")
    settings = {"tasks": sorted(tasks), "epochs": epochs, "lr": lr, "seed": seed,
                "experts": {t: tasks[t].get("settings_hash") for t in sorted(tasks)}}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    final = mtl_dir(folder)
    record = final / "mtl.json"
    if not force and record.is_file() and json.loads(record.read_text()).get("settings_hash") == digest:
        return final
    with zoo.locked(folder):
        tmp = folder / f".tmp-mtl-{digest}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            start = time.time()
            data = {t: {s: zoo.split_path(t, s, folder) for s in ("train", "validation", "test")} for t in tasks}
            with training.progress_bar(progress) as bar:
                result = train_mtl(zoo.base_model_path(), data, {t: tasks[t]["classes"] for t in tasks}, tmp,
                                   epochs=epochs, lr=lr, seed=seed, device=zoo.resolve_device(device), progress=bar)
            result.update(settings_hash=digest, seconds=round(time.time() - start, 1))
            (tmp / "mtl.json").write_text(json.dumps(result, indent=2) + "\n")
            zoo.install_atomically(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final
