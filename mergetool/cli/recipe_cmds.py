"""`validate`, `plan` and `schema`: everything about a recipe before any merging happens."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from mergetool.cli._errors import handles_errors
from mergetool.recipe import json_schema, load_recipe

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)]


@handles_errors
def validate(recipe: RecipeArg) -> None:
    """Check a recipe: schema, merge method, data files and models (exit 0, or 2 with one line per problem)."""
    from mergetool.pipeline.checks import check_recipe  # lazy: loads torch

    r = load_recipe(recipe)
    plan = check_recipe(r)
    typer.echo(f"ok: {recipe} is valid: T={plan.T} tasks, L={plan.L} components, d={plan.d:,} parameters")


@handles_errors
def plan(
    recipe: RecipeArg,
    as_json: Annotated[bool, typer.Option("--json", help="Emit the plan as JSON.")] = False,
    values: Annotated[bool, typer.Option(help="Scan every tensor for NaN/Inf and unequal buffers.")] = True,
) -> None:
    """Show the component plan: components, task-specific tensors, T, L, d and the search-space size."""
    from mergetool.pipeline.checks import check_recipe  # lazy: loads torch

    p = check_recipe(load_recipe(recipe), check_values=values)
    if as_json:
        typer.echo(json.dumps(p.to_json(), indent=2))
        return
    console = Console()
    table = Table(title=f"components ({p.preset} preset, {p.granularity} granularity)")
    for col in ("component", "kind", "layer", "tensors", "parameters", "share"):
        table.add_column(col, justify="right" if col in ("layer", "tensors", "parameters", "share") else "left")
    total = sum(c.params for c in p.components)
    for c in p.components:
        table.add_row(c.name, c.kind, "" if c.layer is None else str(c.layer), str(len(c.tensors)),
                      f"{c.params:,}", f"{100 * c.params / max(total, 1):.2f}%")
    console.print(table)
    for task, names in p.task_specific.items():
        heads = f"{len(names)} tensors, {p.head_params(task):,} parameters: {', '.join(names)}" if names else "none"
        console.print(f"task-specific [bold]{task}[/]: {heads}")
    if p.base_only:
        console.print(f"base-only (in no task model, not merged): {', '.join(p.base_only)}")
    if p.buffers:
        console.print(f"non-float buffers (checked equal): {', '.join(p.buffers)}")
    if p.adapter:
        console.print(f"PEFT {p.adapter['type']}: frozen base component of {p.adapter['frozen_params']:,} "
                      "parameters, stored once")
    console.print(f"T = {p.T} tasks, L = {p.L} components, d = {p.d:,} parameters (b+ = {p.base_bits} bits)")
    console.print(f"search space: log10(Bell(T)^L) = {p.search_space_log10:.2f}")
    console.print(f"individual models: C = {p.individual_cost:.3f}")


def schema(
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write to a file instead of stdout.")] = None,
) -> None:
    """Print the recipe JSON Schema (for editor autocompletion)."""
    text = json.dumps(json_schema(), indent=2)
    if out:
        out.write_text(text + "\n")
    else:
        typer.echo(text)


def register(app: typer.Typer) -> None:
    app.command()(validate)
    app.command()(plan)
    app.command()(schema)
