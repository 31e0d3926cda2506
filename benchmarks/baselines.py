"""Floors measured in the same run as the sync, over the same bytes and bucket plan.

CPU: a raw gloo broadcast from the trainer to k plain processes (no vLLM, no packing, no
checksums): what the wire alone costs. GPU: a raw device-to-device copy of the same bytes.
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time

import torch

from weightsync.transport.broadcast import free_port, open_group
from weightsync.types import TransferPlan


def _raw_receiver(port: int, rank: int, world: int, sizes: list[int], rounds: int) -> None:
    group = open_group("gloo", "127.0.0.1", port, rank, world, 120)
    bufs = [torch.empty(n, dtype=torch.uint8) for n in sizes]
    for _ in range(rounds):
        for b in bufs:
            group.start(b, 120).wait(120, "raw receive")
    group.close()


def raw_gloo_broadcast(plan: TransferPlan, receivers: int, rounds: int) -> list[float]:
    """Seconds per round to broadcast every bucket of ``plan`` to ``receivers`` processes."""
    sizes = [b.nbytes for b in plan.buckets]
    port = free_port("127.0.0.1")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_raw_receiver, args=(port, r, receivers + 1, sizes, rounds + 1))
             for r in range(1, receivers + 1)]
    for p in procs:
        p.start()
    group = open_group("gloo", "127.0.0.1", port, 0, receivers + 1, 120)
    bufs = [torch.randint(0, 255, (n,), dtype=torch.uint8) for n in sizes]
    times = []
    for i in range(rounds + 1):  # first round warms up
        t = time.perf_counter()
        pending = [group.start(b, 120) for b in bufs]
        for p in pending:
            p.wait(120, "raw broadcast")
        if i:
            times.append(time.perf_counter() - t)
    group.close()
    for p in procs:
        p.join(60)
    return times


def raw_device_copy(nbytes: int, rounds: int) -> list[float]:
    """Seconds for one device-to-device copy of ``nbytes`` (the GPU floor).

    Where two buffers of ``nbytes`` do not fit next to the engine and the trainer (7B on one
    GPU), the same bytes are copied in equal chunks between two smaller buffers, back to back.
    """
    free = torch.cuda.mem_get_info()[0]
    chunk = min(nbytes, max(1 << 20, int(free * 0.8) // 2))
    n = -(-nbytes // chunk)
    chunk = -(-nbytes // n)
    src = torch.empty(chunk, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for i in range(rounds + 1):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            dst.copy_(src)
        torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t)
    return times


def summary(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    p95 = xs[min(len(xs) - 1, round(0.95 * (len(xs) - 1)))]
    return {"p50": statistics.median(xs), "p95": p95, "n": len(xs)}
