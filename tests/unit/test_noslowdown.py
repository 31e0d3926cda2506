"""#29's no-slowdown summary (``benchmarks.noslowdown``): each job's ratio and the phases that
moved, from ``benchmarks.run`` results files of both trees, with the new run's ``meta``."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.noslowdown import plot, summarize


def _run(tree: Path, name: str, total: float, phases: dict[str, float], meta=None) -> None:
    tree.mkdir(parents=True, exist_ok=True)
    doc = {"runs": [{"total": {"p50": total, "p95": total * 1.1, "n": 30},
                     "phases": {p: {"p50": v} for p, v in phases.items()}}]}
    if meta is not None:
        doc["meta"] = meta
    (tree / name).write_text(json.dumps(doc))


def test_the_ratio_and_the_phases_that_moved(tmp_path):
    meta = {"commit": "abc1234", "device": "H100", "date": "d", "shape": "moe", "colocated": 0}
    _run(tmp_path / "new", "moe.json", 0.021, {"reload": 0.0095, "transfer.finite": 0.0036},
         meta)
    _run(tmp_path / "old", "moe.json", 0.0175, {"reload": 0.0056})
    _run(tmp_path / "unchecked", "moe.json", 0.0175 * 1.05, {"reload": 0.0058})
    _run(tmp_path / "new", "only-new.json", 0.01, {}, meta)  # (no old run: no ratio)
    out = summarize(tmp_path, ["moe-30b-a3b-4l"])
    row = out["results"]["moe.json"]
    assert abs(row["ratio_new_over_old_p50"] - 1.2) < 1e-9
    assert abs(row["phase_delta_p50_s"]["reload"] - 0.0039) < 1e-9
    assert row["phase_delta_p50_s"]["transfer.finite"] == 0.0036  # new in this tree
    assert abs(row["ratio_unchecked_over_old_p50"] - 1.05) < 1e-9  # the check off
    assert "ratio_new_over_old_p50" not in out["results"]["only-new.json"]
    # the new run's meta (what test_results_meta requires), without one job's own settings
    assert out["meta"] == {"commit": "abc1234", "device": "H100", "date": "d",
                           "benchmark": "noslowdown", "old_tree": "3959233"}
    plot(out, tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 0
