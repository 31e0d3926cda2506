"""The CPU broadcast leg alone, against the raw gloo broadcast of the same bytes: what the
transport adds (packing, per-bucket checksums on both ends, buffer handling) when every
process has a core, without vLLM. Writes JSON + PNG under benchmarks/results/.

    python -m benchmarks.transport --mib 130 --receivers 1,2,4,8 --rounds 5

``--chain-mib`` sends the leg down a chain (``BroadcastSettings(mode="chain")``, in
``TransferConfig.broadcast``); the raw baseline stays gloo's own broadcast.

Each round: the sender packs and broadcasts every bucket (``BroadcastSender.send``: packing
overlaps the previous bucket's broadcast, checksums computed as it goes); every receiver takes
the buckets into last round's buffers and checksums each one as an engine's worker does
(``BroadcastReceiver.receive`` + ``packing.checksum``), then reports. ``verified`` ends when the
last receiver has checked its last bucket and its checksums equal the sender's; ``sender`` when
the sender's last broadcast completed, which is how the raw baseline (``baselines``) is timed.
"""

from __future__ import annotations

import datetime as dt
import json
import multiprocessing as mp
import os
import platform
import time
from pathlib import Path

import torch
import typer

from benchmarks.baselines import raw_gloo_broadcast, summary
from benchmarks.meta import commit, run_meta
from weightsync.transport.broadcast import BroadcastReceiver, BroadcastSender, free_port, open_group
from weightsync.transport.packing import checksum, plan_buckets, spec_of

app = typer.Typer(add_completion=False)


def _weights(mib: int) -> dict[str, torch.Tensor]:
    """fp32 tensors of a small transformer's sizes, about ``mib`` MiB in all."""
    g = torch.Generator().manual_seed(0)
    out, used, i = {}, 0, 0
    while used < mib << 20:
        for name, shape in (("qkv", (768, 512)), ("o", (512, 512)), ("gate_up", (3072, 512)),
                            ("down", (512, 1536)), ("norm", (512,))):
            out[f"{i}.{name}"] = torch.randn(*shape, generator=g)
            used += out[f"{i}.{name}"].numel() * 4
        i += 1
    return out


def _receiver(port: int, rank: int, world: int, plan_json: str, rounds: int, q) -> None:
    from weightsync.types import TransferPlan

    torch.set_num_threads(1)
    plan = TransferPlan.model_validate_json(plan_json)
    rx = BroadcastReceiver(open_group("gloo", "127.0.0.1", port, rank, world, 120))
    pool: list[torch.Tensor] | None = None
    for _ in range(rounds):
        got = [(buf, checksum(buf)) for _, buf in rx.receive(plan, 120, pool)]
        pool = [b for b, _ in got]
        q.put((rank, time.perf_counter(), [c for _, c in got]))
    rx.close()


def _ours(plan, weights, receivers: int, rounds: int) -> tuple[list[float], list[float]]:
    port = free_port("127.0.0.1")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_receiver, args=(port, r, receivers + 1,
                                                 plan.model_dump_json(), rounds + 1, q))
             for r in range(1, receivers + 1)]
    for p in procs:
        p.start()
    tx = BroadcastSender(open_group("gloo", "127.0.0.1", port, 0, receivers + 1, 120))
    sender, verified = [], []
    for i in range(rounds + 1):  # round 0 warms up (allocations, connections)
        t = time.perf_counter()
        sums = tx.send(plan, weights, 120)
        sent = time.perf_counter()
        reports = [q.get(timeout=120) for _ in range(receivers)]
        if any(r[2] != sums for r in reports):
            raise RuntimeError("a receiver's checksums differ from the sender's")
        if i:
            sender.append(sent - t)
            verified.append(max(r[1] for r in reports) - t)
    tx.close()
    for p in procs:
        p.join(60)
    return sender, verified


@app.command()
def main(mib: int = typer.Option(130), bucket_mib: int = typer.Option(32),
         receivers: str = typer.Option("1,2,4,8"), rounds: int = typer.Option(5, min=1),
         chain_mib: float = typer.Option(0, help="> 0: a chain broadcast in chunks of this "
                                         "size instead of gloo's broadcast"),
         out: Path = typer.Option(None)) -> None:
    torch.set_num_threads(1)
    weights = _weights(mib)
    plan = plan_buckets([spec_of(n, t) for n, t in weights.items()], bucket_mib << 20, 1)
    plan = plan.model_copy(update={"chain_chunk": int(chain_mib * (1 << 20))})
    result = {"meta": run_meta("transport", device="cpu"),
              "date": dt.date.today().isoformat(), "commit": commit(), "cpus": os.cpu_count(),
              "torch": torch.__version__, "python": platform.python_version(),
              "bytes": plan.total_bytes, "buckets": len(plan.buckets), "rounds": rounds,
              "broadcast": "chain" if plan.chain_chunk else "gloo", "chain_chunk": plan.chain_chunk,
              "runs": []}
    for k in sorted(int(x) for x in receivers.split(",")):
        raw = summary(raw_gloo_broadcast(plan, k, rounds))
        sender, verified = (summary(x) for x in _ours(plan, weights, k, rounds))
        run = {"receivers": k, "raw": raw, "sender": sender, "verified": verified,
               "sender_vs_raw": sender["p50"] / raw["p50"],
               "verified_vs_raw": verified["p50"] / raw["p50"]}
        result["runs"].append(run)
        print(json.dumps({k: (round(v["p50"] * 1e3, 1) if isinstance(v, dict) else v)
                          for k, v in run.items()}), flush=True)
    chain = f"-chain{plan.chain_chunk >> 20}" if plan.chain_chunk else ""
    out = out or Path("benchmarks/results") / f"transport-cpu{os.cpu_count()}{chain}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    _plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [r["receivers"] for r in result["runs"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("raw", "raw gloo broadcast"), ("sender", "weightsync leg (sender)"),
                       ("verified", "weightsync leg (every receiver verified)")):
        ax.plot(ks, [r[key]["p50"] * 1e3 for r in result["runs"]], marker="o", label=label)
    ax.set_xlabel("receivers")
    ax.set_ylabel("ms per sync (p50)")
    ax.set_xticks(ks)
    how = f"chain, {result['chain_chunk'] >> 20} MiB chunks" if result["chain_chunk"] else "gloo"
    ax.set_title(f"{result['bytes'] / 1e6:.0f} MB, leg: {how}, {result['cpus']} CPUs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    app()
