"""`baselines`: Table I's reference rows (individual, pre-trained, static and dynamic merges) for a run."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mergetool.cli._errors import handles_errors
from mergetool.core.errors import MergetoolError
from mergetool.pipeline.rundir import read_json_record, read_references, recipe_hash, resolve_run, write_json_atomic


@handles_errors
def baselines(
    run: Annotated[Optional[Path], typer.Argument(help="Recipe or run directory (default: current folder).",
                                                  show_default=False)] = None,
    split: Annotated[str, typer.Option(help="validation | test: the split the table reports. Tuning always uses "
                                            "validation; test also scores the tuned baselines on test.")]
    = "validation",
    methods: Annotated[Optional[str], typer.Option(
        help="Merging baselines to run (individual and pre-trained always run): wa, ta, ties, bc, pcb, fisher, "
             "regmean, adamerging (static; fisher, regmean and adamerging read each task's `router` split), twin, "
             "emr, tall (TALL masks), tswitch (T-Switch-like), bitdelta (BitDelta). Default: all of them, less "
             "fisher, regmean and adamerging when a task has no `router` split.", show_default=False)] = None,
    twin_ranks: Annotated[str, typer.Option("--twin-ranks", help="Twin-Merging SVD ranks tuned on validation.")]
    = "4,16,64",
    routing: Annotated[str, typer.Option(help="Routing of twin, emr, tall, tswitch, bitdelta: auto (router when every "
                                              "task has a `router` split) | router | oracle (one-hot on the true "
                                              "task). With a router, each is scored task given, backbone-routed "
                                              "and end-to-end.")] = "auto",
    base_storage: Annotated[str, typer.Option("--base-storage", help="Base precisions the routed baselines (twin, "
                                              "emr, tall, tswitch, bitdelta) are stored and scored at, each with its "
                                              "own C: fp32, fp16, int8. The first is the entry, the others its "
                                              "variants.")] = "fp32,fp16",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    no_racing: Annotated[bool, typer.Option("--no-racing", help="Score every grid point on all validation inputs "
                                            "(default: race them as the search does, with search.racing).")] = False,
    adamerging_steps: Annotated[int, typer.Option("--adamerging-steps", help="AdaMerging's Adam steps (lr 1e-3, "
                                                  "batch 16 per task, λ from 0.3: the paper's settings).")] = 500,
    mtl: Annotated[Optional[Path], typer.Option("--mtl", help="Also score a traditional multi-task model: a folder "
                                                 "with one checkpoint per task name (shared encoder, own head), as "
                                                 "`python examples/build_demo_zoo.py --mtl` writes for the demo.",
                                                 show_default=False)] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Score every baseline again (default: resume, reading back "
                                        "the baselines a stopped run finished under the same settings).")]
    = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Score the baselines of the paper's Table I and write RUN/baselines/baselines.json (C by Eq. 8).

    Each finished baseline is kept in RUN/baselines/parts/, so a stopped run resumes where it stopped."""

    from mergetool.baselines import (  # lazy: loads torch
        AdaMergingSettings,
        count_steps,
        refresh_summary,
        resolve_routing,
        run_baselines,
    )
    from mergetool.baselines.data_merges import DATA_MERGES  # lazy: loads torch
    from mergetool.pipeline.checks import check_recipe  # lazy: loads torch
    from mergetool.pipeline.session import Session, settings_for  # lazy: loads torch

    chosen, storages, ranks = checked_options(split, routing, methods, base_storage, twin_ranks, adamerging_steps)
    run_dir, recipe = resolve_run(run)
    info = run_dir / "run.json"
    record = read_json_record(info)
    if record is not None and record.get("recipe_sha256") != recipe_hash(recipe):
        raise MergetoolError(f"run directory {run_dir} belongs to a different recipe", key="RUN",
                             fix="pass the run directory itself, or the recipe that produced it")
    plan = check_recipe(recipe)
    session = Session(recipe, device=device, plan=plan)
    console = Console(stderr=True, quiet=quiet)
    if methods is None and not session.has_split("router"):  # the default set: what this recipe's data allows
        chosen = [m for m in chosen if m not in DATA_MERGES]
        console.print(f"note: {', '.join(DATA_MERGES)} left out: they need a `router` split for every task")
    routing = resolve_routing(session, routing)
    parts = run_dir / "baselines" / "parts"
    if fresh and parts.is_dir():
        shutil.rmtree(parts)
    total = count_steps(recipe, split=split, methods=chosen, twin_ranks=ranks, routing=routing, storages=storages,
                        mtl=mtl is not None)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as bar:
        task = bar.add_task("baselines", total=total)
        started = [False]

        def progress(what: str) -> None:
            bar.update(task, description=what, advance=1 if started[0] else 0)
            started[0] = True

        result = run_baselines(session, split=split, methods=chosen, twin_ranks=ranks, routing=routing,
                               storages=storages, progress=progress, parts=parts, mtl=mtl,
                               detail=lambda what: bar.update(task, description=what),
                               adamerging=AdaMergingSettings(steps=adamerging_steps, seed=recipe.search.seed),
                               racing=None if no_racing else settings_for(recipe).racing,
                               reference=read_references(run_dir / "search" / "reference.json"))
        bar.update(task, completed=total, description="done")
    path = write_json_atomic(run_dir / "baselines" / "baselines.json", result)
    print_table(Console(), result)
    if result["resumed"]:
        Console().print(f"resumed {len(result['resumed'])} finished part(s) from {parts}: "
                        f"{', '.join(result['resumed'])} (--fresh scores them again)")
    summary = refresh_summary(session, run_dir, result)
    Console().print(f"wrote {path}" + (f" (summary: {summary})" if summary else ""))
    if (run_dir / "search" / "front.json").is_file():  # the front with these baselines' points beside it
        from mergetool.pipeline.figures import draw_pareto
        from mergetool.pipeline.rundir import read_front

        Console().print(f"wrote {draw_pareto(run_dir, read_front(run_dir))}")


def checked_options(split: str, routing: str, methods: Optional[str], base_storage: str, twin_ranks: str,
                    adamerging_steps: int) -> tuple[list[str], list[str], list[int]]:
    """The command's options checked before anything is read or written: (methods, base storages, Twin ranks)."""
    from mergetool.baselines import METHODS, ROUTINGS, SPLITS, AdaMergingSettings, check_storages  # lazy: loads torch

    if split not in SPLITS:
        raise MergetoolError(f"unknown split {split!r}", key="--split", fix="use validation or test")
    if routing not in ROUTINGS:
        raise MergetoolError(f"unknown routing {routing!r}", key="--routing", fix="use auto, router or oracle")
    chosen = [m.strip().lower() for m in (methods or ",".join(METHODS)).split(",") if m.strip()]
    unknown = [m for m in chosen if m not in METHODS]
    if unknown:
        raise MergetoolError(f"unknown baseline {unknown[0]!r}", key="--methods", fix=f"choose from {', '.join(METHODS)}")
    storages = [b.strip().lower() for b in base_storage.split(",") if b.strip()]
    check_storages(storages)
    try:
        ranks = sorted({int(r) for r in twin_ranks.split(",") if r.strip()})
    except ValueError:
        ranks = []
    if not ranks or min(ranks) < 1:
        raise MergetoolError(f"bad --twin-ranks {twin_ranks!r}", key="--twin-ranks",
                             fix="give ranks ≥ 1, e.g. 4,16,64")
    AdaMergingSettings(steps=adamerging_steps).checked()
    return chosen, storages, ranks


def print_table(console: Console, result: dict) -> None:
    split = result["split"]
    table = Table(title=f"Baselines as in the paper's Table I ({split} split; C by Eq. 8)")
    for col in ("Method", "C", "P", *result["tasks"], "tuned"):
        table.add_column(col, justify="left" if col in ("Method", "tuned") else "right")
    for m in result["methods"]:
        scores = m[split] or m["validation"]
        hidden = ("method", "shared", "rescalers")
        tuned = ", ".join(f"{k}={v}" for k, v in m["params"].items() if k not in hidden) \
            if m["kind"] in ("static", "dynamic") else ""
        table.add_row(m["name"], f"{m['storage_cost']:.4f}", f"{scores['performance']:.4f}",
                      *(f"{scores['per_task'][t]:.4f}" for t in result["tasks"]), tuned)
    console.print(table)
    if result.get("routing"):
        console.print(f"Routed baselines' routing: {result['routing']}")
        for m in result["methods"]:
            acc = (m.get("routing") or {}).get("accuracy") or {}
            if acc.get(split) is not None:
                console.print(f"  {m['name']} routing accuracy ({split}): {acc[split]:.4f}")
    print_protocols(console, result)


def print_protocols(console: Console, result: dict) -> None:
    """The routed methods at every base storage: C and P under the three protocols (oracle = task given)."""
    split = result["split"]
    rows = [(m["name"], m["params"].get("base_storage", "fp32"), m) for m in result["methods"] if m.get("protocols")]
    rows += [(m["name"], storage, v) for m in result["methods"] for storage, v in (m.get("variants") or {}).items()]
    if not rows:
        return
    table = Table(title=f"Routed baselines under both routed protocols ({split} split; C counts base, payload, "
                        "router)")
    for col in ("Method", "base", "C", "oracle", "backbone-routed", "end-to-end"):
        table.add_column(col, justify="left" if col in ("Method", "base") else "right")
    fmt = lambda s: "–" if not s or not s.get(split) else f"{s[split]['performance']:.4f}"  # noqa: E731
    for name, storage, m in rows:
        prot = m["protocols"]
        table.add_row(name, storage, f"{m['storage_cost']:.4f}", fmt(prot["oracle"]), fmt(prot["backbone_routed"]),
                      fmt(prot["end_to_end"]))
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command()(baselines)
