"""Tensor-parallel CPU engines: how to bind their workers' threads when several engines share
a few cores. Writes JSON + PNG under benchmarks/results/.

    python -m benchmarks.tp_cpu --binds derived,nobind --syncs 8

For each binding, one fleet of two TP=2 engines and one TP=1 engine (five vLLM workers) on the
tiny model: how long the three take to start together, p50/p95 of a whole sync to all three
(gloo collective and chain), and generation throughput with all three generating at once.
``derived`` is what ``EngineSpec(cpu_threads_bind=None)`` does for a TP engine (the cores split
between its workers: "0|1" on two cores, so every TP engine pins its worker 0 to core 0 and its
worker 1 to core 1); ``nobind`` leaves placement to the OS; anything else is passed as is.
The TP=1 engine is always "nobind".
"""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

import typer

from benchmarks.baselines import summary
from benchmarks.meta import commit, run_meta

app = typer.Typer(add_completion=False)
PROMPTS = ["hello world", "the quick brown fox", "one two three", "a b c d"]


def _fleet_run(bind: str, model_dir: Path, syncs: int, gen_tokens: int) -> dict:
    import ray

    from weightsync.config import BroadcastSettings, EngineSpec, TransferConfig
    from weightsync.coordinator import SyncCoordinator
    from weightsync.engine.actor import start_engines, stop_engines
    from weightsync.testing.reference import load_trainer_model, perturb_

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    specs = [EngineSpec(name=n, model=str(model_dir), dtype="float32", cpu_kvcache_gib=0.25,
                        tensor_parallel_size=tp, max_model_len=512, enforce_eager=True,
                        cpu_threads_bind=None if bind == "derived" or tp == 1 else bind)
             for n, tp in (("tp2-a", 2), ("tp2-b", 2), ("tp1-c", 1))]
    t = time.perf_counter()
    actors = start_engines(specs)
    out: dict = {"bind": bind, "boot_s": time.perf_counter() - t}
    policy = load_trainer_model(model_dir)
    try:
        for broadcast in ("collective", "chain"):
            coord = SyncCoordinator(actors, TransferConfig(
                bucket_bytes=1 << 20, broadcast=BroadcastSettings(mode=broadcast)))
            totals, transfers = [], []
            for i in range(syncs + 1):  # sync 0 builds the group
                perturb_(policy, scale=1e-3, seed=i)
                res = coord.sync(policy)
                if i:
                    totals.append(res.seconds["total"])
                    transfers.append(max(e.seconds["transfer"] for e in res.engines))
            coord.close()
            out[broadcast] = {"total": summary(totals), "transfer": summary(transfers)}
        t = time.perf_counter()
        outs = ray.get([a.generate.remote(PROMPTS, max_tokens=gen_tokens, ignore_eos=True)
                        for a in actors], timeout=600)
        took = time.perf_counter() - t
        n = sum(len(o.token_ids) for per in outs for o in per)
        out["generate"] = {"tokens": n, "seconds": took, "tokens_per_s": n / took}
    finally:
        stop_engines(actors)
        ray.shutdown()
    return out


@app.command()
def main(binds: str = typer.Option("derived,nobind"), syncs: int = typer.Option(8, min=1),
         gen_tokens: int = typer.Option(64, min=1),
         out: Path = typer.Option(Path("benchmarks/results/tp-cpu.json")),
         workdir: Path = typer.Option(Path("runs/bench"))) -> None:
    import os
    import platform

    from weightsync.testing.models import build_text_model

    model_dir = build_text_model(workdir / "tiny-qwen2-tp")
    result = {"meta": run_meta("tp-cpu", device="cpu"),
              "date": dt.date.today().isoformat(), "commit": commit(),
              "python": platform.python_version(), "cpus": os.cpu_count(),
              "fleet": "2x TP=2 + 1x TP=1 (tiny qwen2, fp32)", "syncs": syncs, "runs": []}
    out.parent.mkdir(parents=True, exist_ok=True)
    for bind in binds.split(","):
        result["runs"].append(_fleet_run(bind, model_dir, syncs, gen_tokens))
        out.write_text(json.dumps(result, indent=2))  # a later failure keeps what ran
        typer.echo(json.dumps(result["runs"][-1]))
    plot(result, out.with_suffix(".png"))
    typer.echo(f"wrote {out} and {out.with_suffix('.png')}")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    names = [r["bind"] for r in runs]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    axes[0].bar(names, [r["boot_s"] for r in runs])
    axes[0].set_title("3 engines start (s)")
    w = 0.35
    xs = range(len(runs))
    for k, b in enumerate(("collective", "chain")):
        axes[1].bar([x + k * w for x in xs], [r[b]["total"]["p50"] * 1e3 for r in runs], w,
                    label=f"{b} p50")
    axes[1].set_xticks([x + w / 2 for x in xs], names)
    axes[1].set_title("sync to all three (ms)")
    axes[1].legend(fontsize=8)
    axes[2].bar(names, [r["generate"]["tokens_per_s"] for r in runs])
    axes[2].set_title("generate, all three at once (tok/s)")
    fig.suptitle(f"{result['fleet']} on {result['cpus']} CPUs, commit {result['commit']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    app()
