"""Traditional MTL (the paper's Table I non-merging row): one encoder trained on every task, a head per task.

The model is given as a folder with one checkpoint per task name (the shared encoder and that task's head,
as `mergetool.demo.mtl` writes them). It is scored with the evaluator every other row uses, the task given,
on a recipe whose task models are those checkpoints. C = 1: one encoder is stored (checked: the checkpoints'
mergeable tensors are equal), and the heads are not counted, as for every row.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mergetool.baselines.common import entry
from mergetool.core.errors import MergetoolError
from mergetool.core.grouping import all_singletons


def mtl_recipe(recipe, folder: Path):
    """The recipe with each task model replaced by folder/<task> (refused with one line when one is missing)."""
    folder = Path(folder).expanduser().resolve()
    models = []
    for m in recipe.models:
        path = folder / m.name
        if not (path / "config.json").is_file():
            raise MergetoolError(f"the MTL folder has no checkpoint for task {m.name!r}", file=str(path), key="--mtl",
                                 fix="give the folder `mergetool.demo.mtl` writes: one checkpoint per task name")
        models.append(m.model_copy(update={"model": str(path)}))
    return recipe.model_copy(update={"models": tuple(models)})


def check_one_encoder(session) -> None:
    """Every task checkpoint holds the same mergeable tensors: one encoder, shared."""
    first = session.tasks[0]
    for src, name in zip(session.tasks[1:], session.plan.tasks[1:]):
        for n in (n for c in session.plan.components for n in c.tensors):
            if not torch.equal(first.get(n), src.get(n)):
                raise MergetoolError(f"the MTL checkpoints of {session.plan.tasks[0]!r} and {name!r} differ in {n}",
                                     key="--mtl", fix="an MTL model shares one encoder: give its per-task checkpoints")


def run_mtl(run, folder: Path) -> None:
    from mergetool.pipeline.session import Session

    folder = Path(folder).expanduser().resolve()
    run.say("traditional MTL: checking its checkpoints")
    session = Session(mtl_recipe(run.s.recipe, folder), device=run.s.device)
    check_one_encoder(session)
    G = all_singletons(run.p.T, run.p.L)

    def scored(split):
        r = session.evaluator(split, quantized=False).evaluate(G)
        return r.performance, r.per_task

    val, tst = run.evaluate(scored, "traditional MTL")
    run.out.append(entry("Traditional MTL", "mtl", "mtl", run.cost(run.p.d * run.p.base_bits), val, tst,
                         {"folder": str(folder)}))
