"""The figures a run's front is read by, drawn from the run directory (never from the search layer).

    search/pareto.png     every evaluation, the Pareto front and every reference and baseline point
                          (search/reference.json, baselines/baselines.json), each labelled with its name
                          and C, as the paper's Fig. 3 does; validation P, the split the front is chosen on
    search/relations.png  the paper's Fig. 5: per component kind, a graph of the tasks whose edge weight is
                          the share of (front solution, component of that kind) pairs in which the two
                          tasks share an expert (the same group in G)

The component kinds come from the plan. The search command passes its plan and they are cached in
search/components.json; otherwise the plan is built from the models' headers (no weights are loaded) and
cached. When the models cannot be read, every component falls into one kind ("all components").
"""

from __future__ import annotations

import math
import os
import tempfile
from contextlib import suppress
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from mergetool.core.errors import MergetoolError
from mergetool.core.safejson import is_number
from mergetool.pipeline.rundir import (
    read_front,
    read_json_record,
    read_references,
    resolve_run,
    write_json_atomic,
)
from mergetool.search.journal import read_journal

COMPONENTS = "components.json"  # under search/: {"components": [{name, kind}]} in the plan's order
UNKNOWN_KIND = "all components"
REFERENCES = {"individual": ("Individual (fp32)", "individual"),
              "static_merge": ("All-shared merge (fp32)", "static")}
KIND_STYLE = {  # kind -> (legend label, marker, colour); C3 (red) is the front's
    "individual": ("individual models", "s", "C0"), "pretrained": ("pre-trained", "X", "C1"),
    "static": ("static merges", "D", "C2"), "dynamic": ("dynamic merges (routed)", "^", "C4"),
}
MARKERS = "vP*hp<>8"
COLOURS = ("C5", "C6", "C8", "C9", "C7")  # other kinds, in order of appearance
OFFSETS = [(8, 6), (8, -14), (-8, 6), (-8, -14), (10, 20), (10, -28), (-10, 20), (-10, -28),
           (14, 34), (14, -42), (-14, 34), (-14, -42), (18, 48), (18, -56), (-18, 48), (-18, -56),
           (24, -72), (30, -90), (36, -108), (-24, -72), (-30, -90), (24, 62), (-24, 62), (42, -126)]


def redraw_figures(run_dir, *, recipe=None, plan=None) -> dict[str, Path]:
    """Draw search/pareto.png and search/relations.png of a run; {"pareto": path, "relations": path}."""
    run_dir = Path(run_dir)
    if recipe is None:
        run_dir, recipe = resolve_run(run_dir)
    front = read_front(run_dir)
    return {"pareto": draw_pareto(run_dir, front), "relations": draw_relations(run_dir, front, recipe, plan)}


# --- pareto.png -----------------------------------------------------------------------------------

def reference_points(references: Optional[dict], baselines: Optional[dict]) -> list[dict]:
    """{name, kind, storage_cost, performance} of every baseline (baselines.json's methods, and their
    `variants` at other base storages, named "name [storage]") and reference (reference.json) with a
    validation score; a reference equal to a baseline point is listed once."""
    points = []
    for m in _methods(baselines):
        name, kind = str(m.get("name") or m.get("key") or m.get("id") or "?"), str(m.get("kind") or "baseline")
        variants = m.get("variants") if isinstance(m.get("variants"), dict) else {}  # other base storages
        for label, v in [(name, m)] + [(f"{name} [{k}]", v) for k, v in variants.items() if isinstance(v, dict)]:
            val = v.get("validation")
            if isinstance(val, dict) and is_number(val.get("performance")) and is_number(v.get("storage_cost")):
                points.append({"name": label, "kind": kind, "storage_cost": float(v["storage_cost"]),
                               "performance": float(val["performance"])})
    for key, ref in (references or {}).items():
        name, kind = REFERENCES.get(key, (key, "reference"))
        p = {"name": name, "kind": kind, "storage_cost": float(ref["storage_cost"]),
             "performance": float(ref["validation"]["performance"])}
        if not any(math.isclose(p["storage_cost"], q["storage_cost"], rel_tol=1e-9)
                   and math.isclose(p["performance"], q["performance"], rel_tol=1e-9) for q in points):
            points.append(p)
    return points


def _methods(baselines: Optional[dict]) -> list[dict]:
    if baselines is None:
        return []
    methods = baselines.get("methods")
    if not isinstance(methods, list):
        raise MergetoolError("baselines.json has no list of methods", file="baselines/baselines.json",
                             fix="re-run `mergetool baselines`")
    return [m for m in methods if isinstance(m, dict)]


def draw_pareto(run_dir, front: Optional[list] = None) -> Path:
    """search/pareto.png: the evaluations, the front and every reference and baseline point."""
    run_dir = Path(run_dir)
    search = run_dir / "search"
    front = read_front(run_dir) if front is None else front
    records = read_journal(search / "evaluations.jsonl")
    refs = read_references(search / "reference.json")
    points = reference_points(refs, read_json_record(run_dir / "baselines" / "baselines.json"))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=130)
    scored = lambda rs: [r for r in rs if is_number(r.get("performance"))]  # noqa: E731
    rec, fr = scored(records), sorted(scored(front), key=lambda r: r["storage_cost"])
    if rec:
        ax.scatter([r["storage_cost"] for r in rec], [r["performance"] for r in rec], s=8, c="0.75",
                   label="evaluated", zorder=1)
    if fr:
        ax.step([r["storage_cost"] for r in fr], [r["performance"] for r in fr], where="post", c="C3", lw=1, zorder=2)
        ax.scatter([r["storage_cost"] for r in fr], [r["performance"] for r in fr], s=22, c="C3",
                   label="Pareto front (MERGE)", zorder=3)
    _reference_markers(ax, points)
    ax.set_xlabel("storage cost C (x pre-trained size)")
    ax.set_ylabel("performance P (validation)")
    ax.set_title("Pareto front and reference points (validation)")
    ax.grid(alpha=0.3)
    ax.margins(x=0.08, y=0.1)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    _label_points(fig, ax, points, avoid=[(r["storage_cost"], r["performance"]) for r in fr])
    return _save(fig, search / "pareto.png")


def _reference_markers(ax, points: list[dict]) -> None:
    present = list(dict.fromkeys(p["kind"] for p in points))
    extra = [k for k in present if k not in KIND_STYLE]  # kinds a newer baselines.json may bring
    for kind in [k for k in KIND_STYLE if k in present] + extra:
        i = extra.index(kind) if kind in extra else 0
        label, marker, colour = KIND_STYLE.get(kind) or (kind, MARKERS[i % len(MARKERS)], COLOURS[i % len(COLOURS)])
        sel = [p for p in points if p["kind"] == kind]
        ax.scatter([p["storage_cost"] for p in sel], [p["performance"] for p in sel], s=46, marker=marker,
                   c=colour, edgecolors="k", linewidths=0.5, label=label, zorder=4)


def _label_points(fig, ax, points: list[dict], avoid: Sequence[tuple[float, float]] = ()) -> None:
    """Annotate each point with "name (C=…)" at the offset whose box overlaps least (none, if one can) the
    earlier labels and the markers (the points' and `avoid`'s), inside the axes; the first such offset."""
    if not points:
        return
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    taken = []
    for xy in [(p["storage_cost"], p["performance"]) for p in points] + list(avoid):
        x, y = ax.transData.transform(xy)
        taken.append(_box(x - 5, y - 5, x + 5, y + 5))
    for p in sorted(points, key=lambda p: (p["storage_cost"], -p["performance"])):
        text = f"{p['name']} (C={p['storage_cost']:.2f})"
        best = None
        for dx, dy in OFFSETS:
            a = _annotate(ax, p, text, dx, dy)
            b = _text_box(a, renderer)
            outside = b.width * b.height - _overlap(b, inside)
            score = 4 * outside + sum(_overlap(b, t) for t in taken)
            if best is None or score < best[0]:
                if best is not None:
                    best[1].remove()
                best = (score, a, b)
            else:
                a.remove()
            if score == 0:
                break
        taken.append(best[2])


def _overlap(a, b) -> float:
    """The area two boxes share."""
    return max(0.0, min(a.x1, b.x1) - max(a.x0, b.x0)) * max(0.0, min(a.y1, b.y1) - max(a.y0, b.y0))


def _annotate(ax, p: dict, text: str, dx: float, dy: float):
    return ax.annotate(text, (p["storage_cost"], p["performance"]), xytext=(dx, dy), textcoords="offset points",
                       ha="left" if dx >= 0 else "right", va="bottom" if dy >= 0 else "top", fontsize=7,
                       zorder=5, bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8},
                       arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.4", "shrinkA": 0, "shrinkB": 3})


def _text_box(annotation, renderer):
    """The label's own box (an Annotation's extent also covers its arrow, down to the point)."""
    from matplotlib.text import Text

    annotation.update_positions(renderer)
    return Text.get_window_extent(annotation, renderer).padded(2)


def _box(x0, y0, x1, y1):
    from matplotlib.transforms import Bbox

    return Bbox([[x0, y0], [x1, y1]])


# --- relations.png --------------------------------------------------------------------------------

def relation_weights(groupings: Sequence, component_kinds: Sequence[str]) -> dict[str, np.ndarray]:
    """{kind: T×T array}: entry (a, b) is the share of (solution, component of that kind) pairs in which
    tasks a and b share an expert (the same group). Kinds in order of first appearance; the diagonal is 1.
    ValueError when a grouping is not T×L with L = len(component_kinds), T the same for all."""
    kinds = list(component_kinds)
    if not groupings:
        return {}
    try:
        G = np.stack([np.asarray(g, dtype=np.int64) for g in groupings])
    except (TypeError, ValueError, OverflowError):
        raise ValueError("the groupings are not integer arrays of one shape") from None
    if G.ndim != 3 or G.shape[2] != len(kinds) or 0 in G.shape:
        raise ValueError(f"groupings of shape {G.shape[1:]} do not match {len(kinds)} components")
    same = G[:, :, None, :] == G[:, None, :, :]  # (solutions, T, T, L)
    out = {}
    for kind in dict.fromkeys(kinds):
        idx = [l for l, k in enumerate(kinds) if k == kind]
        out[kind] = same[..., idx].mean(axis=(0, 3))
    return out


def component_kinds(run_dir, recipe, plan=None) -> Optional[list[str]]:
    """The plan's component kinds: from `plan`, else search/components.json, else the plan built from the
    models' headers (cached in components.json); None when the models cannot be read."""
    path = Path(run_dir) / "search" / COMPONENTS
    if plan is None:
        cached = _cached_components(path)
        if cached is not None:
            return cached
        from mergetool.models.plan import build_plan  # lazy: loads torch

        try:
            plan = build_plan(recipe, check_values=False)
        except MergetoolError:
            return None
    write_json_atomic(path, {"components": [{"name": c.name, "kind": c.kind} for c in plan.components]})
    return [c.kind for c in plan.components]


def _cached_components(path: Path) -> Optional[list[str]]:
    try:
        data = (read_json_record(path) or {}).get("components")
    except MergetoolError:  # unreadable: rebuilt from the plan
        return None
    if isinstance(data, list) and data and all(isinstance(c, dict) and isinstance(c.get("kind"), str) for c in data):
        return [c["kind"] for c in data]
    return None


def draw_relations(run_dir, front: list, recipe, plan=None) -> Path:
    """search/relations.png: one task graph per component kind (paper Fig. 5)."""
    groupings = [f["grouping"] for f in front]
    L = len(groupings[0][0]) if groupings and groupings[0] and isinstance(groupings[0][0], list) else 0
    kinds = component_kinds(run_dir, recipe, plan)
    note = ""
    if groupings and (kinds is None or len(kinds) != L):
        kinds, note = [UNKNOWN_KIND] * L, " (component kinds unknown: the recipe's models could not be read)"
    try:
        weights = relation_weights(groupings, kinds or [])
    except ValueError as e:
        raise MergetoolError(f"front.json: {e}", file=str(Path(run_dir) / "search" / "front.json"),
                             fix="re-run `mergetool search`") from None
    T = next(iter(weights.values())).shape[0] if weights else 0
    tasks = list(recipe.task_names) if len(recipe.task_names) == T else [f"task {t}" for t in range(T)]
    plt = _pyplot()
    cols = max(1, min(3, len(weights)))
    rows = max(1, math.ceil(len(weights) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 4.6 * rows + 0.6), dpi=120, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, (kind, W) in zip(axes.flat, weights.items()):
        _relation_graph(ax, W, tasks, f"{kind} ({kinds.count(kind)} component{'s' * (kinds.count(kind) != 1)})")
    if not weights:
        axes[0, 0].text(0.5, 0.5, "the front is empty", ha="center", va="center")
    fig.suptitle(f"Relation network by component kind: how often two tasks share an expert\n"
                 f"(share of the front's {len(groupings)} solutions x components of the kind){note}", fontsize=10)
    fig.tight_layout()
    return _save(fig, Path(run_dir) / "search" / "relations.png")


def _relation_graph(ax, W: np.ndarray, tasks: list[str], title: str) -> None:
    T = len(tasks)
    angles = [math.pi / 2 - 2 * math.pi * t / T for t in range(T)]
    xy = np.array([[math.cos(a), math.sin(a)] for a in angles]) if T > 1 else np.zeros((T, 2))
    for a in range(T):
        for b in range(a + 1, T):
            w = float(W[a, b])
            if w <= 0:
                continue
            ax.plot(*zip(xy[a], xy[b]), c="C0", lw=0.5 + 6 * w, alpha=0.15 + 0.85 * w, solid_capstyle="round",
                    zorder=1)
            mx, my = xy[a] + 0.38 * (xy[b] - xy[a])  # off the midpoint: crossing chords keep apart labels
            ax.text(mx, my, f"{w:.2f}", fontsize=7, ha="center", va="center", zorder=3,
                    bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.85})
    ax.scatter(xy[:, 0], xy[:, 1], s=260, c="C1", edgecolors="k", linewidths=0.6, zorder=2)
    for t, (x, y) in enumerate(xy):
        ha = "center" if abs(x) < 0.3 else ("left" if x > 0 else "right")
        ax.text(1.22 * x, 1.22 * y, _wrap(tasks[t]), fontsize=8, ha=ha, va="center")
    ax.set_xlim(-1.9, 1.9)
    ax.set_ylim(-1.6, 1.6)
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=9)


def _wrap(name: str) -> str:
    """A long snake_case task name on two lines, split at the underscore nearest its middle."""
    if len(name) <= 12 or "_" not in name:
        return name
    cut = min((i for i, ch in enumerate(name) if ch == "_"), key=lambda i: abs(i - len(name) / 2))
    return name[:cut] + "_\n" + name[cut + 1:]


# --- drawing --------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    """Write the figure to a temporary file beside `path`, then move it into place (never half a PNG)."""
    plt = _pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png")
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        plt.close(fig)
    return path
