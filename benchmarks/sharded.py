"""Sharded-trainer benchmark (CPU): the same model synced into the same vLLM engine by a trainer
on one rank (a plain ``sync``) and by an FSDP2 trainer on two ranks (``ShardedSync``: every
bucket's DTensors gathered in lockstep over gloo), with each rank's extra memory. Writes JSON +
PNG under benchmarks/results/. Target: 2-rank p50 <= 1.5x the 1-rank p50.

    python -m benchmarks.sharded --shape small --syncs 5 --bucket-mib 16

Each rank is its own process (``weightsync.testing.sharded_trainer``); sync 0 warms up (first
reload, group setup) and is left out of the p50s. Extra memory per rank: the bytes of gathered
full tensors it held at once (counted by the source) and its peak RSS above its RSS before the
sync (the kernel's high-water mark, reset per sync), p50 over the timed syncs.
"""

from __future__ import annotations

import datetime as dt
import json
import statistics
import time
from pathlib import Path

import typer

from benchmarks.baselines import summary
from benchmarks.meta import commit, run_meta
from benchmarks.run import SHAPES, _versions

app = typer.Typer(add_completion=False)


def _ranks(world: int, model_dir: Path, gcs: str, namespace: str, engine: str, syncs: int,
           bucket_bytes: int, out: Path) -> dict[int, dict]:
    from tests.unit.test_sharded_protocol import run_ranks

    return run_ranks(out, ["--model", str(model_dir), "--ray", gcs, "--namespace", namespace,
                           "--engines", engine, "--bucket-bytes", str(bucket_bytes),
                           "--syncs", str(syncs + 1), "--timeout", "180"],
                     world=world, timeout=1800)


@app.command()
def main(shape: str = typer.Option("small"), syncs: int = typer.Option(5, min=1),
         bucket_mib: int = typer.Option(16, min=1),
         cpu_kv_gib: float = typer.Option(0.5), out: Path = typer.Option(None),
         workdir: Path = typer.Option(Path("runs/bench"))) -> None:
    import ray

    from weightsync.config import EngineSpec
    from weightsync.engine.actor import start_engines
    from weightsync.testing.models import build_text_model

    model_dir = build_text_model(workdir / f"qwen2-{shape}-float32", dtype="float32",
                                 **SHAPES[shape])
    namespace = "weightsync-bench-sharded"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace=namespace)
    (actor,) = start_engines([EngineSpec(name="bench-sharded", model=str(model_dir),
                                         dtype="float32", cpu_kvcache_gib=cpu_kv_gib,
                                         max_model_len=512, enforce_eager=True)])
    gcs = ray.get_runtime_context().gcs_address
    out = out or Path("benchmarks/results") / f"sharded-cpu-{shape}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"meta": run_meta("sharded", device="cpu", shape=shape),
              "date": dt.date.today().isoformat(), "versions": _versions(), "device": "cpu",
              "shape": shape, "model": SHAPES[shape], "dtype": "float32",
              "bucket_mib": bucket_mib, "syncs": syncs, "engines": 1, "runs": []}
    try:
        for world in (1, 2):
            t = time.perf_counter()
            reports = _ranks(world, model_dir, gcs, namespace, "bench-sharded", syncs,
                             bucket_mib << 20, workdir / f"sharded-{world}")
            bad = [r for r in reports.values() if r["rc"] != 0 or
                   not all(s["ok"] for s in r.get("syncs", [{"ok": False}]))]
            if bad:
                raise RuntimeError(f"world {world} failed: {bad[0]['log']}")
            timed = {r: rep["syncs"][1:] for r, rep in reports.items()}
            first = timed[0][0]["result"]
            run = {
                "ranks": world, "bytes": first["nbytes"],
                "buckets": len(first["sender_checksums"]),
                "sync_wall": summary([s["seconds"] for s in timed[0]]),
                "coordinator_total": summary([s["result"]["seconds"]["total"]
                                              for s in timed[0]]),
                "transfer": summary([max(e["seconds"]["transfer"]
                                         for e in s["result"]["engines"]) for s in timed[0]]),
                "reload": summary([max(e["seconds"].get("reload", 0.0)
                                       for e in s["result"]["engines"]) for s in timed[0]]),
                "layout": first["layout"],
                "per_rank": {r: {
                    "rss_peak_extra_p50": statistics.median(s["rss_peak_extra"] for s in ss),
                    "rss_peak_extra_first_sync": reports[r]["syncs"][0]["rss_peak_extra"],
                    "peak_gathered_bytes": max(s.get("peak_gathered_bytes", 0) for s in ss),
                } for r, ss in timed.items()},
                "wall_s": time.perf_counter() - t,
            }
            result["runs"].append(run)
            out.write_text(json.dumps(result, indent=2))  # a later failure keeps what ran
            typer.echo(json.dumps({k: v for k, v in run.items() if k != "per_rank"}))
        one, two = result["runs"]
        result["ratio_2_vs_1"] = two["sync_wall"]["p50"] / one["sync_wall"]["p50"]
        result["target_ratio"] = 1.5
        result["bucket_bytes"] = bucket_mib << 20
        out.write_text(json.dumps(result, indent=2))
        plot(result, out.with_suffix(".png"))
        typer.echo(f"ratio {result['ratio_2_vs_1']:.2f}x; wrote {out} and "
                   f"{out.with_suffix('.png')} (commit {commit()})")
    finally:
        try:
            ray.get(actor.shutdown.remote(), timeout=60)
        finally:
            ray.kill(actor)
            ray.shutdown()


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    xs = [f"{r['ranks']} rank{'s' if r['ranks'] > 1 else ''}" for r in runs]
    transfer = [r["transfer"]["p50"] * 1e3 for r in runs]
    reload_ = [r["reload"]["p50"] * 1e3 for r in runs]
    rest = [r["sync_wall"]["p50"] * 1e3 - t - rl for r, t, rl in zip(runs, transfer, reload_)]
    a.bar(xs, transfer, label="transfer (gather + pack + broadcast)")
    a.bar(xs, reload_, bottom=transfer, label="reload")
    a.bar(xs, rest, bottom=[t + rl for t, rl in zip(transfer, reload_)],
          label="rest (validate, pause, verify, resume)")
    a.axhline(runs[0]["sync_wall"]["p50"] * 1e3 * result["target_ratio"], ls="--", c="k",
              lw=1, label=f"target: {result['target_ratio']}x the 1-rank p50")
    a.set_ylabel("ms (p50 of sync() on the sending rank)")
    a.set_title(f"{result['shape']} ({runs[0]['bytes'] / 1e6:.0f} MB fp32, "
                f"{runs[0]['buckets']} buckets): {result['ratio_2_vs_1']:.2f}x")
    a.legend(fontsize=8)
    bucket = result["bucket_bytes"] / 1e6
    labels, gathered, rss, first = [], [], [], []
    for r in runs:
        for rank, m in r["per_rank"].items():
            labels.append(f"{r['ranks']}r/rank {rank}")
            gathered.append(m["peak_gathered_bytes"] / 1e6)
            rss.append(m["rss_peak_extra_p50"] / 1e6)
            first.append(m["rss_peak_extra_first_sync"] / 1e6)
    x = range(len(labels))
    b.bar([i - 0.27 for i in x], gathered, width=0.27, label="gather buffers (peak)")
    b.bar(list(x), first, width=0.27, label="peak RSS above pre-sync, first sync (one-time: "
                                            "packing pool, groups, buffers)")
    b.bar([i + 0.27 for i in x], rss, width=0.27, label="peak RSS above pre-sync, later "
                                                          "syncs (p50)")
    b.axhline(bucket, ls=":", c="gray", label="one bucket")
    b.axhline(2 * bucket, ls="--", c="k", lw=1, label="two buckets")
    b.set_xticks(list(x), labels)
    b.set_ylabel("MB")
    b.set_title("extra memory per rank")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    app()
