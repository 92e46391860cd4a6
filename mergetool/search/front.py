"""Pareto front (maximise P, minimise C), hypervolume, outputs and the budget pick.

Hypervolume reference point: (P_ref, C_ref) = (0, T + 1) unless the settings give one.
HV is computed by pymoo on the minimisation objectives (-P, C) with reference (-P_ref, C_ref),
i.e. the area between the front and the point (P = 0, C = T + 1). C_ref = T + 1 lies above every
feasible cost: C is normalised by the pre-trained model size (Eq. 8), so keeping one full copy
per task plus the shared rest costs at most about T + 1. The point is fixed per T, so HV is
comparable across runs, seeds and ablations; its maximum is 1 * (T + 1) for P in [0, 1].
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from mergetool.core.budget import best_within


def hv_reference(T: int, ref: Optional[Sequence[float]] = None) -> tuple[float, float]:
    """(P_ref, C_ref): the given one, else (0, T + 1)."""
    if ref is not None:
        return float(ref[0]), float(ref[1])
    return 0.0, float(T) + 1.0


def objectives(records: Sequence[dict]) -> np.ndarray:
    """Minimisation objectives F = [-P, C], one row per record."""
    if not records:
        return np.zeros((0, 2))
    return np.asarray([[-float(r["performance"]), float(r["storage_cost"])] for r in records], dtype=np.float64)


def nondominated(records: Sequence[dict]) -> list[dict]:
    """Records no other record dominates (pymoo non-dominated sorting), cheapest first.

    Exact objective ties keep only the earliest record (lowest i), so every front point is distinct.
    """
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    if not records:
        return []
    idx = NonDominatedSorting().do(objectives(records), only_non_dominated_front=True)
    front = sorted((records[int(j)] for j in idx), key=lambda r: (r["storage_cost"], -r["performance"], r["i"]))
    out: list[dict] = []
    for r in front:
        if not out or (r["storage_cost"], r["performance"]) != (out[-1]["storage_cost"], out[-1]["performance"]):
            out.append(r)
    return out


def front_entry(r: dict) -> dict:
    return {
        "id": int(r["i"]),
        "grouping": r["grouping"],
        "performance": r["performance"],
        "storage_cost": r["storage_cost"],
        "per_task": r["per_task"],
        **({"codecs": r["codecs"]} if "codecs" in r else {}),  # a search over a codec menu: labels per component
    }


def pareto_front(records: Sequence[dict]) -> list[dict]:
    """front.json entries {id, grouping, performance, storage_cost, per_task}, cheapest first."""
    return [front_entry(r) for r in nondominated(records)]


def hypervolume(records: Sequence[dict], ref: tuple[float, float]) -> float:
    """HV of the records' front w.r.t. (P_ref, C_ref); 0 when no point beats the reference."""
    from pymoo.indicators.hv import HV

    F = objectives(records)
    r = np.array([-ref[0], ref[1]], dtype=np.float64)
    F = F[np.all(F < r, axis=1)]
    if len(F) == 0:
        return 0.0
    return float(HV(ref_point=r)(F))


def hv_curve(records: Sequence[dict], ref: tuple[float, float]) -> list[tuple[int, float]]:
    """(n, HV of the first n evaluations) for n = 1..N, records in "i" order (non-decreasing)."""
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    ordered = sorted(records, key=lambda r: r["i"])
    curve: list[tuple[int, float]] = []
    front: list[dict] = []
    hv = 0.0
    for n, rec in enumerate(ordered, start=1):
        cand = front + [rec]
        idx = NonDominatedSorting().do(objectives(cand), only_non_dominated_front=True)
        if any(int(j) == len(cand) - 1 for j in idx):  # HV changes only if rec joins the front
            front = [cand[int(j)] for j in idx]
            hv = hypervolume(front, ref)
        curve.append((n, hv))
    return curve


def pick(front: Sequence[dict], budget: Optional[float]) -> dict:
    """Best-performing front point with C <= budget (ties: cheaper, then lower id)."""
    return front[best_within(front, budget, cost=lambda r: r["storage_cost"], performance=lambda r: r.get("performance"),
                             tie=lambda r: r.get("id", r.get("i", 0)), what="configuration on the front")]


def write_front_json(front: Sequence[dict], path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(list(front), indent=1) + "\n", encoding="utf-8")
    return path


def write_hv_csv(curve: Sequence[tuple[int, float]], path) -> Path:
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["evaluations", "hv"])
        for n, hv in curve:
            w.writerow([n, repr(float(hv))])
    return path


def plot_pareto(records: Sequence[dict], front: Sequence[dict], path, title: str = "Pareto front") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    ax.scatter([r["storage_cost"] for r in records], [r["performance"] for r in records], s=10, c="0.7", label="evaluated")
    ax.step([r["storage_cost"] for r in front], [r["performance"] for r in front], where="post", c="C3", lw=1)
    ax.scatter([r["storage_cost"] for r in front], [r["performance"] for r in front], s=24, c="C3", label="Pareto front")
    ax.set_xlabel("storage cost C (x pre-trained size)")
    ax.set_ylabel("performance P")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_hv(curve: Sequence[tuple[int, float]], path, title: str = "Hypervolume") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    ax.plot([n for n, _ in curve], [h for _, h in curve], c="C0")
    ax.set_xlabel("real evaluations")
    ax.set_ylabel("hypervolume")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def write_artifacts(records: Sequence[dict], out_dir, ref: tuple[float, float], plots: bool = True) -> dict[str, str]:
    """front.json, hv.csv and (optionally) pareto.png, hv.png under out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    front = pareto_front(records)
    curve = hv_curve(records, ref)
    paths = {"front": write_front_json(front, out / "front.json"), "hv": write_hv_csv(curve, out / "hv.csv")}
    if plots:
        paths["pareto_png"] = plot_pareto(records, front, out / "pareto.png")
        paths["hv_png"] = plot_hv(curve, out / "hv.png")
    return {k: str(v) for k, v in paths.items()}
