"""`export`, `inspect` and `export-model`: expert libraries on disk."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from mergetool.cli._errors import handles_errors
from mergetool.core.budget import best_within
from mergetool.core.errors import LibraryError, MergetoolError
from mergetool.core.grouping import validate
from mergetool.core.safejson import UnsafeJSON, parse_json
from mergetool.library.card import group_letters
from mergetool.library.location import check_output
from mergetool.pipeline.rundir import read_front, resolve_run
from mergetool.search.front import pick

RunArg = Annotated[Optional[Path], typer.Argument(
    help="Run directory (with run.json), or a recipe whose `output` is the run directory. Default: .",
    show_default=False)]
LibArg = Annotated[Path, typer.Argument(help="Expert library folder.", show_default=False)]
BudgetOpt = Annotated[Optional[str], typer.Option(
    "--budget", help="Storage budget in full-precision base models (1.0 = one base model).", show_default=False)]
SolutionOpt = Annotated[Optional[int], typer.Option("--solution", help="A front.json solution id.", show_default=False)]


def parse_budget(text: Optional[str]) -> Optional[float]:
    if text is None:
        return None
    try:
        b = float(text)
    except ValueError:
        raise LibraryError(f"budget {text!r} is not a number", key="--budget",
                           fix="give the budget in base models, e.g. --budget 1.5") from None
    if not math.isfinite(b) or b <= 0:
        raise LibraryError(f"budget must be a positive number, got {text!r}", key="--budget",
                           fix="give the budget in base models, e.g. --budget 1.5")
    return b


def read_grouping(path: Path, plan) -> tuple[np.ndarray, Optional[list]]:
    """(G, codec labels per component or None) from {"tasks", "components", "grouping", "codecs"} (or a bare
    T x L list), rows/columns in plan order."""
    try:
        data = parse_json(Path(path).read_bytes())
    except FileNotFoundError:
        raise LibraryError("grouping file not found", file=str(path), key="--grouping") from None
    except (OSError, UnsafeJSON) as exc:
        raise LibraryError(f"grouping file is not JSON: {exc}", file=str(path), key="--grouping",
                           fix='write {"grouping": [[...], ...]} (T rows of L group ids)') from None
    tasks = comps = codecs = None
    if isinstance(data, dict):
        tasks, comps, codecs, data = data.get("tasks"), data.get("components"), data.get("codecs"), data.get("grouping")
    if codecs is not None and (not isinstance(codecs, list) or len(codecs) != plan.L
                               or not all(isinstance(c, str) for c in codecs)):
        raise LibraryError(f"codecs must list {plan.L} codec labels, one per component", file=str(path), key="codecs",
                           fix="give the labels front.json shows, e.g. \"full\" or \"delta_quant:2\"")
    try:
        G = validate(data, plan.T, plan.L)
    except (ValueError, TypeError):
        G = None
    except MergetoolError as e:
        raise LibraryError(e.message, file=str(path), key="grouping", fix=e.fix) from None
    if G is None:
        raise LibraryError(f"grouping must be a {plan.T} x {plan.L} matrix of group ids", file=str(path),
                           key="grouping", fix="one row per task, one column per component, 0-based ids")
    expected = (("tasks", tasks, list(plan.tasks)), ("components", comps, [c.name for c in plan.components]))
    for what, given, want in expected:
        if given is None:
            continue
        if not isinstance(given, list) or sorted(map(str, given)) != sorted(want):
            raise LibraryError(f"{what} {given} do not match the recipe's {want}", file=str(path), key=what,
                               fix=f"list the recipe's {what}")
        order = [given.index(n) for n in want]
        G = G[order] if what == "tasks" else G[:, order]
        if what == "components" and codecs is not None:
            codecs = [codecs[j] for j in order]
    return G, codecs


def menu_indices(recipe, labels: Optional[list], where: str) -> Optional[list[int]]:
    """Codec labels (front.json, a grouping file) as indices into the recipe's codec menu."""
    if labels is None:
        return None
    menu = [c.label for c in recipe.codecs]
    unknown = [c for c in labels if c not in menu]
    if unknown:
        raise LibraryError(f"codec {unknown[0]!r} is not in the recipe's codec menu ({', '.join(menu)})", file=where,
                           key="codecs", fix="export with the recipe the run was searched with")
    return [menu.index(c) for c in labels]


@handles_errors
def export(
    run: RunArg = None,
    budget: BudgetOpt = None,
    solution: SolutionOpt = None,
    grouping: Annotated[Optional[Path], typer.Option(
        "--grouping", help="Explicit G: JSON {tasks, components, grouping}.", show_default=False)] = None,
    all_: Annotated[bool, typer.Option("--all", help="Export the whole front as one library.")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", help="Library folder (default RUN/libraries/...).",
                                                show_default=False)] = None,
    shard_size: Annotated[str, typer.Option("--shard-size", help="Largest expert shard, e.g. 2GB or 500MB.")] = "2GB",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing library.")] = False,
    device: Annotated[str, typer.Option(help="Router training device: auto | cpu | cuda")] = "auto",
) -> None:
    """Export an expert library under a storage budget (or for --solution, --grouping, --all).

    The library always ships a router: trained on the recipe's `router` splits, or reused from
    RUN/router/ when nothing it depends on changed."""
    from mergetool.evaluation.runner import pick_device  # lazy: loads torch
    from mergetool.library.writer import SolutionIn, check_target, export_library, parse_size  # lazy: loads torch
    from mergetool.models.plan import open_models  # lazy: loads torch
    from mergetool.pipeline.checks import check_recipe  # lazy: loads torch
    from mergetool.pipeline.router_training import RouterBuilder  # lazy: loads torch

    B = parse_budget(budget)
    size = parse_size(shard_size)
    if sum(x is not None and x is not False for x in (solution, grouping, all_ or None)) > 1:
        raise LibraryError("--solution, --grouping and --all exclude each other", key="export")
    if B is None and solution is None and grouping is None and not all_:
        raise LibraryError("nothing chosen to export", key="export",
                           fix="give --budget B, --solution ID, --grouping G.json or --all")
    run_dir, recipe = resolve_run(run)  # run.json's recipe: the one the search used
    if out is None:
        name = ("all" if all_ else f"grouping-{grouping.stem}" if grouping else
                f"solution-{solution}" if solution is not None else f"budget-{B:g}")
        out = run_dir / "libraries" / name
    check_output(Path(out), "--out", folder=True, may_be_a_library=True)
    check_target(Path(out), force)
    say = lambda msg: typer.echo(msg, err=True)  # noqa: E731
    sources = open_models(recipe)
    # the recipe's checks (data, labels, method) before anything is written; weights' values as the search did
    plan = check_recipe(recipe, check_values=False, sources=sources)
    pick_device(device)  # an unknown device is refused before any expert is built
    router = RouterBuilder(recipe, sources[0], cache_dir=run_dir / "router", device=device, progress=say)
    router.check()  # a router split per task, before any expert is built
    default = 0
    if grouping is not None:
        G, labels = read_grouping(grouping, plan)
        sols = [SolutionIn(G, codecs=menu_indices(recipe, labels, str(grouping)))]
    else:
        front = read_front(run_dir, key="--budget", otherwise=", or pass --grouping G.json")
        if all_:
            chosen = [r for r in front if B is None or r["storage_cost"] <= B] or [pick(front, B)]
        elif solution is not None:
            chosen = [r for r in front if r["id"] == solution]
            if not chosen:
                raise LibraryError(f"solution {solution} is not on the front", key="--solution",
                                   fix=f"use one of {', '.join(str(r['id']) for r in front)}")
            if B is not None and chosen[0]["storage_cost"] > B:
                raise LibraryError(f"solution {solution} costs C = {chosen[0]['storage_cost']:.6g} > budget {B:g}",
                                   key="--budget", fix="raise the budget or pick another solution")
        else:
            chosen = [pick(front, B)]
        sols = []
        for r in chosen:
            try:
                G = validate(r["grouping"], plan.T, plan.L)
            except MergetoolError as e:
                raise LibraryError(f"front solution {r['id']}: {e.message}", key="front.json", fix=e.fix) from None
            sols.append(SolutionIn(G, id=r["id"], performance=r.get("performance"), per_task=r.get("per_task"),
                                   expected_cost=r["storage_cost"],
                                   codecs=menu_indices(recipe, r.get("codecs"), "front.json")))
        default = best_within(sols, None, cost=lambda s: s.expected_cost, performance=lambda s: s.performance)
    m = export_library(recipe, plan, sources, sols, Path(out), shard_size=size, force=force, default=default,
                       budget=None if all_ else B, progress=say, router=router)
    s = m.solutions[m.default_solution]
    typer.echo(f"wrote {out}: {len(m.experts)} experts, {len(m.solutions)} solution(s)")
    typer.echo(f"storage cost C = {m.storage_cost:.6f} (experts only; {m.storage.storage_cost_with_heads:.6f} "
               f"with heads); d = {plan.d:,}, b+ = {plan.base_bits}")
    if s.performance is not None:
        typer.echo(f"solution {s.id}: P = {s.performance:.4f}")
    typer.echo(_router_line(m.router) + (" (cached)" if router.cached else ""))
    for name, entry in m.files.items():
        typer.echo(f"  {name:<40} {entry.bytes:>14,} bytes")
    typer.echo(f"  {'total':<40} {sum(e.bytes for e in m.files.values()):>14,} bytes (manifest.json excluded)")


@handles_errors
def inspect(
    lib: LibArg,
    as_json: Annotated[bool, typer.Option("--json", help="Emit JSON.")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="Check every file's sha256.")] = False,
    solution: SolutionOpt = None,
) -> None:
    """Show an expert library: tasks, components, groups, chains, storage (computed and on disk)."""
    from mergetool.library.hub import open_library  # lazy: loads torch

    L = open_library(lib, verify=verify, solution=solution)
    m, s = L.manifest, L.solution
    disk = L.disk_report()
    manifest_bytes = (L.path / "manifest.json").stat().st_size
    total = sum(v["bytes"] for v in disk.values()) + manifest_bytes
    report = {
        "path": str(lib), "format_version": m.format_version, "mergetool_version": m.mergetool_version,
        "base": m.base.model_dump(),
        "tasks": [{"name": t.name, "labels": t.labels, "heads": {n: h.shape for n, h in t.heads.items()}}
                  for t in m.tasks],
        "components": [{"name": c.name, "kind": c.kind, "tensors": len(c.tensors), "params": c.params}
                       for c in m.components],
        "solution": {"id": s.id, "performance": s.performance, "per_task": s.per_task, "grouping": s.grouping},
        "solutions": [{"id": x.id, "performance": x.performance, "storage_cost": x.storage.storage_cost}
                      for x in m.solutions],
        "groups": {c: dict(zip([t.name for t in m.tasks], letters)) for c, letters, _ in group_letters(m, s)},
        "chains": s.chains,
        "experts": [{"id": e.id, "component": m.components[e.component].name, "group_members": e.group_members,
                     "codec": e.codec, "data_bytes": e.data_bits // 8 + e.mask_bytes} for e in m.experts],
        "base_storage": m.base_storage,
        "stored_base": {"tensors": len(m.stored_base), "data_bytes": sum(st.bits for st in m.stored_base.values()) // 8},
        "storage": {"solution": s.storage.model_dump(), "library": m.storage.model_dump(),
                    "on_disk": {"files": disk, "manifest.json": manifest_bytes, "total": total,
                                "by_category": m.disk_bytes}},
        "router": m.router.model_dump() if m.router else None,
        "verified": verify,
    }
    if as_json:
        typer.echo(json.dumps(report, indent=1))
        return
    _print(report, m, s)


def _router_line(r) -> str:
    if r is None:
        return "router: none (predict needs --task)"
    stages = f" ({r.prefix_stages} shared stage{'s' * (r.prefix_stages > 1)})" if r.features == "prefix" else ""
    acc = "n/a (no test split)" if r.routing_accuracy is None else f"{r.routing_accuracy:.4f}"
    return (f"router: {r.features} features{stages} (asked: {r.requested}); MLP {r.hidden}, {r.epochs} epochs, "
            f"lr {r.lr:g}; "
            f"trained on {sum(r.train_examples.values()):,} inputs; routing accuracy on test {acc}")


def _codec_line(report: dict) -> str:
    """Each expert's codec, and how the base is stored for the delta experts (format v2)."""
    by_codec: dict[str, list[str]] = {}
    for e in report["experts"]:
        by_codec.setdefault(e["codec"], []).append(e["id"])
    line = "expert codecs: " + "; ".join(f"{c} ({' '.join(ids)})" for c, ids in by_codec.items())
    if report["base_storage"] is None:
        return line + "; base storage: none (no delta experts)"
    sb = report["stored_base"]
    return line + (f"; base storage: {report['base_storage']}, {sb['tensors']} tensors stored once, "
                   f"{sb['data_bytes']:,} bytes")


def _print(report: dict, m, s) -> None:
    from rich.console import Console
    from rich.table import Table


    con = Console()
    con.print(f"[bold]{report['path']}[/]: format v{m.format_version}, base {m.base.ref}")
    con.print(_codec_line(report))
    for t in m.tasks:
        labels = ", ".join(t.labels) if t.labels else "-"
        con.print(f"task [bold]{t.name}[/]: labels {labels}; heads {', '.join(t.heads) or '-'}")
    names = [t.name for t in m.tasks]
    which = "explicit grouping" if s.id is None else f"solution {s.id}"
    table = Table(title=f"groups per component ({which}; same letter = shared expert)")
    for col in ["component", "params"] + names + ["experts"]:
        table.add_column(col)
    for (comp, letters, n), c in zip(group_letters(m, s), m.components):
        table.add_row(comp, f"{c.params:,}", *letters, str(n))
    con.print(table)
    for task, chain in s.chains.items():
        con.print(f"chain {task}: {' '.join(chain)}")
    if len(m.solutions) > 1:
        con.print("solutions: " + "; ".join(f"{x['id']}: P={x['performance']} C={x['storage_cost']:.6f}"
                                            for x in report["solutions"]))
    st = s.storage
    con.print(f"storage cost C = {st.storage_cost:.6f} (experts only), {st.storage_cost_with_heads:.6f} with heads; "
              f"library C = {m.storage_cost:.6f}; d = {st.d:,}, b+ = {st.base_bits}")
    con.print(f"computed expert data {st.expert_data_bytes:,} bytes (C·d·b+/8 + {st.mask_bytes:,} mask bytes)")
    con.print(_router_line(m.router))
    if m.router and m.router.feature_storage.file:
        fs = m.router.feature_storage
        con.print(f"router feature extractor ({m.router.features}): {fs.file}, {fs.params:,} parameters "
                  f"({fs.share_of_base:.1%} of the base), {fs.bytes:,} bytes, stored apart from the experts")
    files = Table(title="on disk")
    for col in ("file", "bytes", "tensor data"):
        files.add_column(col, justify="left" if col == "file" else "right")
    for name, v in report["storage"]["on_disk"]["files"].items():
        files.add_row(name, f"{v['bytes']:,}", "" if v["data_bytes"] is None else f"{v['data_bytes']:,}")
    files.add_row("manifest.json", f"{report['storage']['on_disk']['manifest.json']:,}", "")
    files.add_row("total", f"{report['storage']['on_disk']['total']:,}", "")
    con.print(files)
    cats = {k: v for k, v in m.disk_bytes.items() if v and k != "total"}
    con.print("by category: " + ", ".join(f"{k} {v:,}" for k, v in cats.items()))
    con.print("checksums verified" if report["verified"] else "sizes and headers checked (--verify checks sha256)")


@handles_errors
def export_model(
    lib: LibArg,
    task: Annotated[str, typer.Option("--task", help="The task to materialise.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Output folder.", show_default=False)],
    budget: BudgetOpt = None,
    solution: SolutionOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing model folder.")] = False,
) -> None:
    """Write one task's chain, dequantised, as a plain Hugging Face checkpoint."""
    from mergetool.library.export_model import export_model as run  # lazy: loads torch
    from mergetool.library.hub import open_library  # lazy: loads torch

    B = parse_budget(budget)
    check_output(out, "--out", folder=True)
    path = run(open_library(lib, budget=B, solution=solution), task, out, force=force)
    typer.echo(f"wrote {path} (task {task})")


def register(app: typer.Typer) -> None:
    app.command()(export)
    app.command()(inspect)
    app.command("export-model")(export_model)
