"""#29's no-slowdown check, summarized: the same ``scripts/gpu_bench.sh`` jobs run in this tree
and in the tree of 3959233 on one machine in one call (``scripts/gpu_noslowdown.sh``), each
job's sync-total p50 in both trees and their ratio (new / old), with the phases that moved.
Writes a JSON (``meta``: the new tree's run's, benchmark ``noslowdown``) and a PNG.

    python -m benchmarks.noslowdown RESULTS_DIR OUT.json colocated-0.5b moe-30b-a3b-4l

``RESULTS_DIR`` holds ``new/*.json`` and ``old/*.json`` (``benchmarks.run`` results files), and
``unchecked/*.json`` where this tree also ran with the finite check off (``--no-check-finite``:
3959233 had no such check), compared with the old tree as ``ratio_unchecked_over_old_p50``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OLD_TREE = "3959233"  # the commit #29 was filed at


def summarize(res: Path, jobs: list[str]) -> dict[str, Any]:
    """Each results file found in both trees: p50/p95 of the sync total, the ratio, and every
    phase's p50 in both (the phases that exist in either)."""
    runs: dict[str, dict[str, dict]] = {}
    for tree in ("new", "old", "unchecked"):
        for path in sorted((res / tree).glob("*.json")):
            runs.setdefault(path.name, {})[tree] = json.loads(path.read_text())
    results: dict[str, Any] = {}
    meta: dict[str, Any] = {}
    for name, trees in runs.items():
        row: dict[str, Any] = {}
        for tree, doc in trees.items():
            run = doc["runs"][0]
            row[tree] = {"total_p50_s": run["total"]["p50"], "total_p95_s": run["total"]["p95"],
                         "n": run["total"]["n"],
                         "phases_p50_s": {p: v["p50"] for p, v in run.get("phases", {}).items()}}
        if "new" in trees:
            meta = meta or dict(trees["new"].get("meta") or {})
        if "new" in row and "old" in row:
            row["ratio_new_over_old_p50"] = row["new"]["total_p50_s"] / row["old"]["total_p50_s"]
            new, old = row["new"]["phases_p50_s"], row["old"]["phases_p50_s"]
            row["phase_delta_p50_s"] = {p: new.get(p, 0.0) - old.get(p, 0.0)
                                        for p in sorted(set(new) | set(old))}
        if "unchecked" in row and "old" in row:  # this tree without the finite check
            row["ratio_unchecked_over_old_p50"] = \
                row["unchecked"]["total_p50_s"] / row["old"]["total_p50_s"]
        results[name] = row
    for per_job in ("shape", "colocated"):  # (each job's own, in its results)
        meta.pop(per_job, None)
    meta.update(benchmark="noslowdown", old_tree=OLD_TREE)
    return {"meta": meta, "jobs": jobs, "old_tree": OLD_TREE, "results": results}


def plot(summary: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, r in summary["results"].items() if "ratio_new_over_old_p50" in r]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    xs = range(len(names))
    for off, tree in ((-0.2, "old"), (0.2, "new")):
        ax.bar([x + off for x in xs],
               [summary["results"][n][tree]["total_p50_s"] * 1e3 for n in names], 0.4,
               label=f"{tree} ({OLD_TREE if tree == 'old' else summary['meta'].get('commit', '')[:7]})")
    for x, n in zip(xs, names, strict=True):
        r = summary["results"][n]
        ax.annotate(f"{r['ratio_new_over_old_p50']:.2f}x", (x, max(
            r["new"]["total_p50_s"], r["old"]["total_p50_s"]) * 1e3), ha="center", va="bottom")
    ax.set_xticks(list(xs), [n.removesuffix(".json") for n in names], fontsize=8)
    ax.set_ylabel("sync total p50 (ms)")
    ax.set_title(f"#29 no-slowdown: this tree vs {OLD_TREE} ({summary['meta'].get('device', '')})",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    res, out, jobs = Path(argv[0]), Path(argv[1]), argv[2:]
    summary = summarize(res, jobs)
    out.write_text(json.dumps(summary, indent=1, sort_keys=True))
    plot(summary, out.with_suffix(".png"))
    print(json.dumps({k: {r: v[r] for r in ("ratio_new_over_old_p50",
                                            "ratio_unchecked_over_old_p50") if r in v}
                      for k, v in summary["results"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
