"""`predict` (route and predict a stream of inputs) and `evaluate` (routed vs oracle-routed scores)."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer

from mergetool.cli._errors import handles_errors
from mergetool.core.errors import DataError, MergetoolError
from mergetool.evaluation.data import jsonl_records
from mergetool.library.location import check_output
from mergetool.pipeline.rundir import write_json_atomic
from mergetool.recipe import load_recipe

LibArg = Annotated[Path, typer.Argument(help="Expert library folder.", show_default=False)]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda")]
SecondOpinionOpt = Annotated[Optional[float], typer.Option(
    "--second-opinion", help="Router probability in (0, 1]: inputs routed with less also run the runner-up "
    "chain with its own head, and keep the (task, label) of larger router probability x head confidence. "
    "Default: off.", show_default=False)]


def read_inputs(src: str, text_field: str, pair_field: Optional[str], skip_bad: bool,
                bad: Counter) -> Iterator[tuple[int, tuple]]:
    """(line number, (text, pair)) per jsonl line or csv row; bad lines raise DataError or are counted.
    `src` was checked by check_input (this generator runs only when iterated)."""
    where = "<stdin>" if src == "-" else src
    if src != "-":
        f = Path(src).open(encoding="utf-8", newline="")
    elif hasattr(sys.stdin, "buffer"):  # strict UTF-8: Python's own stdin may decode with surrogateescape
        f = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", newline="")
    else:
        f = sys.stdin
    try:
        with f:
            yield from _parse_inputs(f, src, where, text_field, pair_field, skip_bad, bad)
    except UnicodeDecodeError as e:
        raise DataError(f"the input is not UTF-8 text ({e.reason} at byte {e.start} of a read)", file=where,
                        key="--input", fix="convert the input to UTF-8") from None


def check_input(src: str) -> None:
    """--input is - (stdin) or an existing file."""
    if src != "-" and not Path(src).is_file():
        what = "is a directory" if Path(src).is_dir() else "not found"
        raise DataError(f"input file {what}", file=src, key="--input", fix="give a jsonl or csv file, or -")


def _parse_inputs(f, src: str, where: str, text_field: str, pair_field: Optional[str], skip_bad: bool,
                  bad: Counter) -> Iterator[tuple[int, tuple]]:
    """The records of an opened input (jsonl, or csv by name or by a first line that is not JSON)."""
    first = f.readline()
    rest = f
    is_csv = src.lower().endswith(".csv") or (src == "-" and first.strip() and not first.lstrip().startswith("{"))
    if is_csv:
        reader = csv.DictReader(_chain(first, rest))
        fields = reader.fieldnames or []
        if fields and text_field not in fields:
            raise DataError(f"the csv header has no column {text_field!r} (it has {fields[:8]})", file=where,
                            line=1, key="--text-field", fix="pass --text-field COLUMN")
        records = ((reader.line_num, row) for row in reader)
    else:
        records = _jsonl(_chain(first, rest), where, skip_bad, bad)
    for line, rec in records:
        item = _item(rec, text_field, pair_field)
        if isinstance(item, str):
            if not skip_bad:
                raise DataError(f"line {line} {item}", file=where, line=line, key="--text-field",
                                fix="fix the line, pass --text-field NAME, or --skip-bad")
            bad["lines"] += 1
            continue
        yield line, item


def _chain(first: str, rest) -> Iterator[str]:
    if first:
        yield first
    yield from rest


def _jsonl(lines, where: str, skip_bad: bool, bad: Counter) -> Iterator[tuple[int, dict]]:
    def skip(i: int, why: str) -> None:
        bad["lines"] += 1

    try:
        yield from jsonl_records(lines, file=where, on_bad=skip if skip_bad else None)
    except DataError as e:
        e.fix = "one JSON object per line, or --skip-bad"
        raise


def _item(rec: dict, text_field: str, pair_field: Optional[str]):
    """(text, pair), or why not (a string)."""
    out = []
    for name in (text_field, pair_field):
        if name is None:
            out.append(None)
            continue
        v = rec.get(name)
        if v is None or (v == "" and name == pair_field):
            return f"has no field {name!r}"
        if not isinstance(v, (str, int, float)) or isinstance(v, bool):
            return f"field {name!r} is not text"
        out.append(str(v))
    return tuple(out)


def _check_output(output: Optional[Path], src: str) -> None:
    """--output must be a file in an existing folder, and never the input itself."""
    if output is None:
        return
    check_output(output, "--output")
    if src != "-" and output.exists() and Path(src).exists() and os.path.samefile(output, src):
        raise MergetoolError("--output is the input file; writing it would destroy the input", key="--output",
                             fix="write the predictions to another file")


def _count_lines(src: str) -> Optional[int]:
    if src == "-":
        return None
    with open(src, "rb") as f:
        n = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    return max(0, n - 1) if src.lower().endswith(".csv") else n


@handles_errors
def predict(
    lib: LibArg,
    input: Annotated[str, typer.Option("--input", help="jsonl or csv file, or - for stdin.", show_default=False)],
    output: Annotated[Optional[Path], typer.Option("--output", help="JSONL predictions (default: stdout).",
                                                   show_default=False)] = None,
    text_field: Annotated[str, typer.Option("--text-field", help="Field or column holding the text.")] = "text",
    pair_field: Annotated[Optional[str], typer.Option("--text-pair-field", help="Second text, for pair tasks.",
                                                      show_default=False)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Inputs per forward pass.", min=1)] = 64,
    task: Annotated[Optional[str], typer.Option("--task", help="Skip routing: use this task.",
                                                show_default=False)] = None,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Skip bad lines (counted) instead of failing.")] = False,
    device: DeviceOpt = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    second_opinion: SecondOpinionOpt = None,
) -> None:
    """Route each input to a task, run it through that task's expert chain, write JSONL in input order."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from mergetool.inference.runtime import ExpertLibrary  # lazy: loads torch
    from mergetool.inference.second_opinion import check_threshold

    check_threshold(second_opinion, "--second-opinion")
    lib_ = ExpertLibrary.load(lib, device=device)
    lib_.second_opinion = second_opinion
    if task is not None:
        lib_.manifest.task(task)
    elif lib_.manifest.router is None:
        raise MergetoolError("this library has no router", file=str(lib), key="--task", fix="pass --task T")
    bad: Counter = Counter()
    check_input(input)
    _check_output(output, input)
    records = read_inputs(input, text_field, pair_field, skip_bad, bad)
    # written beside the target and renamed into place at the end: a failure never leaves a cut file
    # behind, nor destroys what was at --output before
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}") if output else None
    out = tmp.open("w", encoding="utf-8") if tmp else sys.stdout
    finished = False
    console = Console(stderr=True, quiet=quiet)
    chunk = max(256, 16 * batch_size)
    done, routed = 0, Counter()
    try:
        with Progress(TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=True) as bar:
            job = bar.add_task("predict", total=_count_lines(input))
            while True:
                part = [r for _, r in zip(range(chunk), records)]
                if not part:
                    break
                results = lib_.predict([item for _, item in part], batch_size=batch_size, task=task)
                for (line, _), r in zip(part, results):
                    out.write(json.dumps({"line": line, **r}) + "\n")
                    routed[r["task"]] += 1
                out.flush()
                done += len(part)
                bar.update(job, completed=done + bad["lines"])
        finished = done > 0
    finally:
        if tmp:
            out.close()
            if finished:
                os.replace(tmp, output)
            else:
                tmp.unlink(missing_ok=True)
    if not done:
        raise MergetoolError(f"no inputs to predict in {input}" + (f" ({bad['lines']} bad line(s) skipped)"
                                                                    if bad["lines"] else ""),
                             key="--input", fix="give a file with one input per line (jsonl) or row (csv)")
    msg = f"{done} prediction(s)" + (f" -> {output}" if output else "")
    if bad["lines"]:
        msg += f"; skipped {bad['lines']} bad line(s)"
    if lib_.stats["truncated"]:
        msg += f"; truncated {lib_.stats['truncated']} input(s) to {lib_.max_length} tokens"
    if lib_.stats["second_opinion"]:
        msg += (f"; second opinion on {lib_.stats['second_opinion']} input(s), "
                f"{lib_.stats['second_opinion_changed']} changed")
    if routed:
        msg += "; tasks: " + ", ".join(f"{t} {n}" for t, n in sorted(routed.items()))
    typer.echo(msg, err=True)


@handles_errors
def evaluate(
    lib: LibArg,
    recipe: Annotated[Path, typer.Option("--recipe", help="Your recipe, with the data to score on (a library's "
                                         "own recipe is never used: a library is untrusted).", show_default=False)],
    split: Annotated[str, typer.Option("--split", help="test | validation")] = "test",
    out: Annotated[Optional[Path], typer.Option("--out", help="JSON report (default: stdout).",
                                                show_default=False)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 64,
    device: DeviceOpt = "auto",
    second_opinion: SecondOpinionOpt = None,
) -> None:
    """Per-task metric with the task given (oracle) and routed under two protocols: backbone-routed (the
    router picks the chain, the input's own task head runs on it) and end-to-end (the router also picks
    the head; a misroute is wrong). Also routing accuracy per task and throughput."""
    from rich.console import Console

    from mergetool.inference.runtime import ExpertLibrary  # lazy: loads torch
    from mergetool.inference.second_opinion import check_threshold
    from mergetool.routing.evaluate import evaluate_library  # lazy: loads torch

    if split not in ("test", "validation"):
        raise MergetoolError(f"unknown split {split!r}", key="--split", fix="use test or validation")
    check_threshold(second_opinion, "--second-opinion")
    r = load_recipe(recipe)
    if out:
        check_output(out, "--out")
    lib_ = ExpertLibrary.load(lib, device=device)
    report = evaluate_library(lib_, r, split, batch_size, second_opinion)
    Console(stderr=True).print(_table(report, lib, split))
    if out:
        write_json_atomic(Path(out), report)
        typer.echo(f"wrote {out}", err=True)
    else:
        typer.echo(json.dumps(report, indent=1))


def _table(report: dict, lib: Path, split: str):
    """The console table (80 columns): per task the oracle, both routed protocols, their gaps to the oracle
    in points, and the routing accuracy; the metric and the throughput in the title."""
    from rich import box
    from rich.table import Table

    speed, rows = report["throughput"], report["tasks"]
    metrics = sorted({r["metric"] for r in rows.values()})
    title = f"{lib} on {split} ({', '.join(metrics)}): routing accuracy {_fmt(report['routing_accuracy'])}; " \
            f"inputs/s oracle {speed['oracle_inputs_per_s']:.1f}, end-to-end " \
            f"{_fmt(speed.get('end_to_end_inputs_per_s'), 1)}"
    so = report.get("second_opinion")
    if so:
        title += f"; second opinion below {so['threshold']:g}: {so['inputs']} input(s), {so['changed']} changed"
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("task", "n", "oracle", "backbone\nrouted", "end to\nend", "Δ b-r\n(pts)", "Δ e2e\n(pts)",
                "route\nacc."):
        table.add_column(col, no_wrap=col == "task")
    m = report["mean"]
    for name, r in [*rows.items(), ("mean", {**m, "n": None, "routing_accuracy": report["routing_accuracy"]})]:
        gaps = [None if k not in r or "oracle" not in r else 100 * (r[k] - r["oracle"])
                for k in ("backbone_routed", "end_to_end")]
        table.add_row(name, "" if r["n"] is None else str(r["n"]), _fmt(r.get("oracle")), _fmt(r.get("backbone_routed")),
                      _fmt(r.get("end_to_end")), *(_fmt(g, 2) for g in gaps), _fmt(r.get("routing_accuracy"), 3))
    return table


def _fmt(v, digits: int = 4) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def register(app: typer.Typer) -> None:
    app.command()(predict)
    app.command()(evaluate)
