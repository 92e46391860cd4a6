"""The benchmark scripts read baselines.json as `mergetool baselines` writes it (entry + variants by storage)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
codec_goals = pytest.importorskip("codec_goals")
table1 = pytest.importorskip("table1")

from mergetool.baselines.common import entry  # noqa: E402
from mergetool.baselines.routed import _add  # noqa: E402


def _scored(oracle: float, backbone: float, e2e: float) -> dict:
    s = lambda p: {"performance": p, "per_task": {"a": p}}  # noqa: E731
    prot = {"oracle": {"validation": s(oracle + 0.01), "test": s(oracle)},
            "backbone_routed": {"validation": s(backbone + 0.01), "test": s(backbone)},
            "end_to_end": {"validation": s(e2e + 0.01), "test": s(e2e)}}
    return {"validation": prot["backbone_routed"]["validation"], "test": prot["backbone_routed"]["test"],
            "protocols": prot}


def _baselines() -> dict:
    run = SimpleNamespace(out=[])
    variants = [{"storage_cost": c, "storage_breakdown": {"storage": st}, **_scored(*ps),
                 "routing": {"accuracy": {"test": 0.98}}}
                for c, st, ps in ((1.25, "fp32", (0.80, 0.79, 0.78)), (0.75, "fp16", (0.70, 0.69, 0.68)))]
    _add(run, "TALL masks", "tall", {}, variants)
    run.out.append(entry("TA (tuned)", "ta", "static", 1.0, (0.60, {"a": 0.60}), (0.55, {"a": 0.55})))
    run.out.append(entry("Individual (fp32)", "individual", "individual", 4.0, (0.9, {"a": 0.9}), (0.9, {"a": 0.9})))
    return {"methods": run.out}


def test_codec_goals_reads_every_variant_under_every_protocol():
    points = {p["name"]: p for p in codec_goals.baseline_points(_baselines())}
    assert set(points) == {"TALL masks [fp32]", "TALL masks [fp16]", "TA (tuned)"}  # references are not points
    assert points["TALL masks [fp16]"]["C"] == 0.75
    assert points["TALL masks [fp16]"]["test"] == {"oracle": 0.70, "backbone_routed": 0.69, "end_to_end": 0.68}
    assert points["TA (tuned)"]["test"] == {"oracle": 0.55}


def test_table1_rows_show_three_protocols_per_storage():
    rows = [r for m in _baselines()["methods"] for r in table1.baseline_rows(m)]
    assert rows[0] == "| TALL masks | 1.2500 | 0.8100 | 0.8000 | 0.7900 | 0.7800 |"
    assert rows[1] == "| TALL masks [fp16] | 0.7500 | 0.7100 | 0.7000 | 0.6900 | 0.6800 |"
    assert rows[2] == "| TA (tuned) | 1.0000 | 0.6000 | 0.5500 | – | – |"
