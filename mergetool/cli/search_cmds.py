"""`search` (Algorithm 1 on a recipe) and `front` (the Pareto front of a run)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mergetool.cli._errors import handles_errors
from mergetool.core.errors import MergetoolError
from mergetool.pipeline.figures import draw_pareto, redraw_figures
from mergetool.pipeline.rundir import prepare_run, read_front, read_json_record, read_references, resolve_run
from mergetool.recipe import load_recipe
from mergetool.recipe.loader import parse_recipe
from mergetool.search import run_search
from mergetool.search.executors import make_executor
from mergetool.search.front import pick
from mergetool.search.genome import codec_summary

BUDGETS = (0.25, 0.5, 1.0, 2.0)


@handles_errors
def search(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)],
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in the recipe's output folder.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Start over, deleting a previous search.")] = False,
    evaluations: Annotated[Optional[int], typer.Option(help="Real evaluations (overrides search.evaluations).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Overrides search.seed.")] = None,
    no_surrogate: Annotated[bool, typer.Option("--no-surrogate", help="Ablation: evaluate offspring directly.")] = False,
    init: Annotated[Optional[str], typer.Option(help="Ablation: kmeans | random.")] = None,
    granularity: Annotated[Optional[str], typer.Option(help="Ablation: component | layer | kind | model.")] = None,
    crossover: Annotated[Optional[str], typer.Option(help="Ablation: one_point | uniform.")] = None,
    no_racing: Annotated[bool, typer.Option("--no-racing", help="Ablation: every candidate on all validation "
                                            "inputs (no subset first).")] = False,
    precision: Annotated[Optional[str], typer.Option(help="fp32 | bf16 (screening under bf16 autocast; the "
                                                     "front is re-scored at fp32). Overrides search.precision.")] = None,
    build_for_cost: Annotated[bool, typer.Option("--build-for-cost", help="Ablation: build (merge, quantise, hold) "
                                                 "each screened candidate's experts to know C, instead of "
                                                 "counting C from Q's decision.")] = False,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Search Pareto-optimal groupings G (surrogate-assisted NSGA-II) and write RUN/search/."""
    from mergetool.evaluation.runner import pick_device  # lazy: loads torch
    from mergetool.pipeline.checks import check_recipe  # lazy: loads torch
    from mergetool.pipeline.session import (  # lazy: loads torch
        MergeProblem,
        Session,
        picked,
        references,
        settings_for,
        test_scores,
        write_summary,
    )

    r = _override(load_recipe(recipe), evaluations, seed, no_surrogate, init, granularity, crossover,
                  no_racing=no_racing, precision=precision)
    plan = check_recipe(r)
    dev = pick_device(device)  # an unknown device is refused before the run folder is written
    executor = make_executor(r.search.executor, r.search.ray.address, r.search.ray.num_workers)
    executor.connect()  # an unreachable cluster is refused before the run folder is written
    run_dir = prepare_run(r, resume=resume, force=force)
    console = Console(stderr=True, quiet=quiet)
    console.print(f"run: {run_dir}  (T={plan.T}, L={plan.L}, search space 10^{plan.search_space_log10:.1f})")
    session = Session(r, device=device, plan=plan)
    session.store.count_cost = not build_for_cost
    _warn_slow_bf16(r.search.precision, dev)
    search_dir = run_dir / "search"
    with _progress(console) as bar:
        task = bar.add_task("references", total=None, hv=0.0, best=0.0, hits=0.0)
        refs = references(session, search_dir, lambda what: bar.update(task, description=what))
        session.release()  # the references' evaluators and fp32 experts are not used by the search
        settings = settings_for(r)
        bar.update(task, description="search", total=settings.evaluations, completed=0)

        def on_progress(done, budget, hv, best_p, hit_rate):
            bar.update(task, completed=done, total=budget, hv=hv, best=best_p or 0.0, hits=hit_rate or 0.0)

        with executor:
            result = run_search(MergeProblem(session), settings, search_dir / "evaluations.jsonl",
                                progress=on_progress, executor=executor)
        bar.update(task, description="test split")
        baselines = read_json_record(run_dir / "baselines" / "baselines.json")
        tests = test_scores(session, search_dir, picked(result.front, refs, baselines))  # G1, G2, G3
    stats = {"evaluations": result.evaluations, "evaluated in this process": result.evaluated_now,
             "replayed from the journal": result.replayed, "generations": result.generations,
             "candidates screened by the surrogate": result.screened,
             "racing": _racing_line(settings, result),
             "surrogate Kendall tau (predicted vs real P)": _fmt(result.kendall_tau),
             "hypervolume": f"{result.hv:.4f} (reference P=0, C=T+1={result.hv_ref[1]:g})",
             "init": result.init_used, "stopped": result.stopped,
             "cache": json.dumps(session.evaluator("validation").counts | session.store.stats())}
    summary = write_summary(run_dir, result.front, refs, stats, baselines, tests)
    _print_front(Console(), result.front, refs)
    Console().print(f"wrote {search_dir} (summary: {summary})")
    for path in redraw_figures(run_dir, recipe=r, plan=plan).values():
        typer.echo(f"wrote {path}")


@handles_errors
def front(
    run: Annotated[Optional[Path], typer.Argument(help="Run directory or recipe (default: current folder).")] = None,
    plots: Annotated[bool, typer.Option("--plots", help="Also redraw relations.png (which tasks share experts, "
                                        "per component kind) and print the figures' paths.")] = False,
) -> None:
    """Print a run's Pareto front (C, P, per task, the pick per budget) and redraw pareto.png (with the
    reference and baseline points)."""
    run_dir, recipe = resolve_run(run)
    fr = read_front(run_dir)
    _print_front(Console(), fr, read_references(run_dir / "search" / "reference.json"))
    if not plots:
        draw_pareto(run_dir, fr)
        return
    for path in redraw_figures(run_dir, recipe=recipe).values():
        typer.echo(f"wrote {path}")


def _override(r, evaluations, seed, no_surrogate, init, granularity, crossover=None, *, no_racing=False,
              precision=None):
    search = {k: v for k, v in {"evaluations": evaluations, "seed": seed, "init": init, "crossover": crossover,
                                "surrogate": "none" if no_surrogate else None, "precision": precision}.items()
              if v is not None}
    if no_racing:
        search["racing"] = None
    if not search and not granularity:
        return r
    import yaml


    data = yaml.safe_load(r.text)
    data.setdefault("search", {}).update(search)
    if granularity:
        data.setdefault("components", {})["granularity"] = granularity
    return parse_recipe(yaml.safe_dump(data, sort_keys=False), r.path)


def _warn_slow_bf16(precision: str, dev) -> None:
    from mergetool.evaluation.runner import bf16_native  # lazy: loads torch

    if precision == "bf16" and not bf16_native(dev):
        typer.echo(f"warning: precision bf16 on {dev.type} without bf16 hardware (no avx512_bf16/AMX) is "
                      "emulated and slower than fp32 (5-6x on a 2-core AVX2 CPU); use precision fp32 here", err=True)


def _racing_line(settings, result) -> str:
    if not settings.racing:
        return f"off; {result.examples} validation inputs run"
    r = settings.racing
    return (f"{result.evaluations} full and {result.partial} partial evaluations (subset {r.fraction:g} of the "
            f"inputs, confidence {r.confidence:g}, margin {r.margin:g}); {result.examples} validation inputs run")


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("HV {task.fields[hv]:.3f}  best P {task.fields[best]:.4f}  "
                               "cache hits {task.fields[hits]:.0%}"), TimeElapsedColumn(),
                    console=console, transient=False)


def _print_front(console: Console, fr: list[dict], refs: Optional[dict]) -> None:
    table = Table(title="Pareto front (validation)")
    coded = any(f.get("codecs") for f in fr)
    for col in ("id", "C", "P", "per task") + (("codecs (components)",) if coded else ()) + ("picked at budget",):
        table.add_column(col)
    picks: dict = {}
    for b in BUDGETS:
        try:
            picks.setdefault(pick(fr, b)["id"], []).append(f"{b:g}")
        except MergetoolError:  # nothing on the front fits that budget: no pick to show
            continue
    for f in sorted(fr, key=lambda f: f["storage_cost"]):
        tasks = " ".join(f"{k}={v:.3f}" for k, v in f["per_task"].items())
        table.add_row(str(f["id"]), f"{f['storage_cost']:.4f}", f"{f['performance']:.4f}", tasks,
                      *((codec_summary(f.get("codecs")),) if coded else ()), ", ".join(picks.get(f["id"], [])))
    console.print(table)
    if refs:
        for name, ref in refs.items():
            console.print(f"{name}: C={ref['storage_cost']:.3f}  P={ref['validation']['performance']:.4f}")


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def register(app: typer.Typer) -> None:
    app.command()(search)
    app.command()(front)
