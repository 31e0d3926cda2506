"""Condense a GPU run's raw figures (gpu-results.json) into the summary the README quotes.

    python -m tests.gpu.report runs/gpu/gpu-results.json   # prints the summary, adds it to the file
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

PHASES = ("pause", "sleep", "wake_weights", "transfer", "reload", "reset_caches", "fingerprint",
          "wake_kv", "resume", "total")


def _median_phases(runs: list[dict]) -> dict[str, float]:
    return {p: round(statistics.median(r["seconds"][p] for r in runs), 4)
            for p in PHASES if all(p in r["seconds"] for r in runs)}


def summarize(results: dict) -> dict:
    data, out = results.get("data", {}), {}
    tests = results.get("tests", {})
    outcomes = [t["outcome"] for t in tests.values()]
    out["tests"] = {k: outcomes.count(k) for k in ("passed", "skipped")}
    out["tests"]["failed"] = len(outcomes) - out["tests"]["passed"] - out["tests"]["skipped"]
    cycles = data.get("cycles") or []
    if cycles:
        groups: dict[str, list[dict]] = {}
        for c in cycles:
            groups.setdefault(f"sleep{c['sleep_level']}_{c['layout']}", []).append(c)
        free = [c["free_after_sleep"] for c in cycles]
        out["cycles"] = {
            "n": len(cycles),
            "median_seconds": {k: _median_phases(v) for k, v in sorted(groups.items())},
            "free_after_sleep_bytes": {"first": free[0], "min": min(free), "max": max(free),
                                       "max_drift_vs_first": max(abs(f - free[0]) / free[0]
                                                                 for f in free)},
            "max_logprob_diff": max(c["parity"]["max_logprob_diff"] for c in cycles),
            "tokens_equal_every_cycle": all(c["parity"]["tokens_equal"] for c in cycles),
            "output_changed_every_cycle": all(c["changed"] for c in cycles),
        }
    bf16 = data.get("bf16_syncs") or []
    if len(bf16) > 2:
        warm = bf16[2:]  # the first of each sleep level pays one-time costs
        out["bf16_warm_median_seconds"] = {
            f"sleep{lvl}": _median_phases([r for r in warm if r["sleep_level"] == lvl])
            for lvl in (1, 2)}
        out["bf16_first_sync_seconds"] = bf16[0]["seconds"]
    moe = data.get("moe_fast_path")
    if moe:  # kept even when the test stopped part way: rows are added as it goes
        rows = moe["syncs"]
        out["moe_fast_path"] = {
            "first_layout": moe.get("first", {}).get("layout"),
            "later_layouts": [r["auto"]["layout"] for r in rows],
            "layout_notes": sorted({str(r["auto"]["layout_note"]) for r in rows}),
            "same_fingerprint_as_checkpoint_layout": [r.get("same_fingerprint") for r in rows]}
    if "moe_sync" in data:
        out["moe_bit_identical_to_own_load"] = data["moe_sync"].get("bit_identical_to_own_load")
    return out


if __name__ == "__main__":
    path = Path(sys.argv[1])
    results = json.loads(path.read_text())
    results["summary"] = summarize(results)
    path.write_text(json.dumps(results, indent=1, sort_keys=True))
    print(json.dumps(results["summary"], indent=1))
