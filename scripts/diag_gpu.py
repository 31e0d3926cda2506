"""Where the host time of a warm IPC sync goes, on the GPU box (no vLLM needed).

Times, for 0.5B-shaped kernel-layout tensors, the host side of packing and of the checksum
(eager launches), the same as one replayed CUDA graph, and a plain Ray async-actor round trip
with a plan-sized argument (the floor under the trainer's call into an engine actor). Prints
one JSON line; `benchmarks/results/host-overhead-gpu-e5b1649.json` is one run.

    PYTHONPATH=/tmp/site:$PWD python3 scripts/diag_gpu.py
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from weightsync.transport.graphs import Replay
from weightsync.transport.packing import digest_terms, pack_bucket, plan_buckets, spec_of

HIDDEN, INTER, LAYERS, VOCAB, KV = 896, 4864, 24, 151936, 128  # Qwen2.5-0.5B-shaped


def ms(xs: list[float]) -> float:
    return round(statistics.median(xs) * 1e3, 3)


def timed(fn, rounds: int = 30, sync: bool = False) -> float:
    out = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return ms(out)


def tensors() -> dict[str, torch.Tensor]:
    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=torch.bfloat16, device="cuda")

    ts = {"embed": r(VOCAB, HIDDEN)}
    for i in range(LAYERS):
        ts |= {f"{i}.qkv": r(HIDDEN + 2 * KV, HIDDEN), f"{i}.qkv_bias": r(HIDDEN + 2 * KV),
               f"{i}.o": r(HIDDEN, HIDDEN), f"{i}.gate_up": r(2 * INTER, HIDDEN),
               f"{i}.down": r(HIDDEN, INTER), f"{i}.norm1": r(HIDDEN), f"{i}.norm2": r(HIDDEN)}
    return ts


def packing() -> dict[str, float]:
    ts = tensors()
    bucket = plan_buckets([spec_of(n, t) for n, t in ts.items()], 2048 << 20, 1).buckets[0]
    views: dict = {}
    buf = pack_bucket(bucket, ts, "cuda", views=views)

    def pack() -> None:
        pack_bucket(bucket, ts, "cuda", out=buf, views=views)

    def both() -> torch.Tensor:
        pack()
        return digest_terms([buf])

    graph = Replay("diag")
    for _ in range(2):
        graph.run("k", both)  # eager + capture, then replays
    return {"pack_host_ms": timed(pack), "digest_host_ms": timed(lambda: digest_terms([buf])),
            "eager_pack_digest_wall_ms": timed(both, sync=True),
            "graph_replay_host_ms": timed(lambda: graph.run("k", both)),
            "graph_replay_wall_ms": timed(lambda: graph.run("k", both), sync=True)}


def ray_round_trip() -> dict[str, float]:
    import ray

    ray.init(num_cpus=4, num_gpus=0, include_dashboard=False, log_to_driver=False)

    @ray.remote
    class Echo:
        async def call(self, plan: str, *args) -> dict:
            return {"report": "r" * 300}

    actor = Echo.options(max_concurrency=64).remote()
    plan = "p" * 40_000  # about a 0.5B kernel-layout plan's JSON
    ray.get(actor.call.remote(plan))
    out = []
    for _ in range(200):
        t = time.perf_counter()
        ray.get(actor.call.remote(plan, "atomic", 1.0, "h" * 2000), timeout=30)
        out.append(time.perf_counter() - t)
    return {"ray_rtt_ms": ms(out)}


if __name__ == "__main__":
    result = packing()
    try:
        result |= ray_round_trip()
    except ImportError:
        pass  # Ray not installed there: the packing figures alone
    print(json.dumps(result), flush=True)
