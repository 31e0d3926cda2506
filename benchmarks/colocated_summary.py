"""One picture of the colocated loop's sync across shapes and memory shares: per run, the
phases from the sync call until the engine serves again (p50, stacked), next to what the
engine's sleep freed. Reads the JSONs ``benchmarks.run --colocated`` wrote.

    python -m benchmarks.colocated_summary benchmarks/results/colocated-gpu-*.json \
        --out benchmarks/results/colocated-gpu.png
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from benchmarks.run import PHASES

app = typer.Typer(add_completion=False)


@app.command()
def main(files: list[Path], out: Path = typer.Option(...)) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = []
    for f in files:
        d = json.loads(f.read_text())
        r = d["runs"][0]
        freed = [b for s in r["sleeps"] for b in s["freed_bytes"] if b is not None]
        runs.append((f"{d['shape']} @ {d['gpu_memory_utilization']:.2f}\n"
                     f"({d['versions'].get('commit') or '?'})",
                     {p: r["phases"][p]["p50"] * 1e3 for p in PHASES if p in r["phases"]},
                     r["total"]["p50"] * 1e3, sorted(freed)[len(freed) // 2] / (1 << 30)))
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    labels = [r[0] for r in runs]
    bottom = [0.0] * len(runs)
    for p in PHASES:
        vals = [r[1].get(p, 0.0) for r in runs]
        if any(vals):
            a.bar(labels, vals, bottom=bottom, label=p)
            bottom = [x + y for x, y in zip(bottom, vals, strict=True)]
    a.plot(labels, [r[2] for r in runs], "k_", ms=30, mew=2, label="sync total (coordinator)")
    a.axhline(40, color="red", ls="--", lw=1, label="target 40 ms (0.5B)")
    a.set_ylabel("ms, p50 of 10 syncs into a sleeping engine")
    a.set_xlabel("shape @ vLLM memory share")
    a.set_title("colocated loop: sync call -> serving again (engine asleep at level 2)")
    a.legend(fontsize=7)
    b.bar(labels, [r[3] for r in runs], color="gray")
    b.set_ylabel("GiB freed by sleep(2)")
    b.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    typer.echo(f"wrote {out}")


if __name__ == "__main__":
    app()
