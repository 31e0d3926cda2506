"""Where a colocated sync's fixed costs go, on the GPU box: vLLM's wake (per tag, at three
levels: ``AsyncLLM.wake_up``, the worker's ``wake_up``, the allocator's), what the allocator
holds per tag, the engine-core utility round trip, ``resume_generation``, and a plain Ray
async-actor round trip. One engine, 0.5B-shaped, in this process (``EngineHost`` without
Ray). Prints and writes one JSON.

    PYTHONPATH=/tmp/site:$PWD python3 scripts/probe_wake_gpu.py --util 0.15 --out $OUT/probe.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time

os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # callables into the worker


def ms(xs: list[float]) -> float:
    return round(statistics.median(xs) * 1e3, 3)


def _instrument(worker) -> dict:
    """In the worker: time the worker's and the allocator's wake_up; count allocations."""
    import collections

    import torch
    from vllm.device_allocator.cumem import CuMemAllocator

    a = CuMemAllocator.get_instance()

    def timed(where, inner):
        def wake(tags=None):
            t = time.perf_counter()
            inner(tags)
            torch.cuda.synchronize()
            a._probe.append((where, tags, time.perf_counter() - t))
        return wake

    if not hasattr(a, "_probe"):
        a._probe = []
        a.wake_up = timed("allocator", a.wake_up)
        worker.wake_up = timed("worker", worker.wake_up)
    counts, sizes = collections.Counter(), collections.Counter()
    for d in a.pointer_to_data.values():
        counts[d.tag] += 1
        sizes[d.tag] += d.handle[1]
    return {"allocations": dict(counts), "bytes": dict(sizes)}


def _drain(worker) -> list:
    from vllm.device_allocator.cumem import CuMemAllocator

    a = CuMemAllocator.get_instance()
    out, a._probe = list(a._probe), []
    return out


def _noop(worker) -> int:
    return 0


async def probe(util: float, cycles: int, workdir: str) -> dict:
    from weightsync.config import EngineSpec
    from weightsync.engine import vllm_compat
    from weightsync.engine.host import EngineHost
    from weightsync.testing.models import build_text_model

    model = build_text_model(f"{workdir}/qwen2-0.5b-bfloat16", hidden=896, layers=24, heads=14,
                             kv_heads=2, intermediate=4864, vocab_size=151936,
                             tie_word_embeddings=True, dtype="bfloat16", device="cuda")
    host = EngineHost(EngineSpec(name="probe", model=str(model), dtype="bfloat16",
                                 gpu_memory_utilization=util))
    await host.start()
    eng = host.engine
    held = (await eng.collective_rpc(_instrument))[0]
    rows: dict[str, list[float]] = {}

    def put(k, v):
        rows.setdefault(k, []).append(v)

    async def timed(key, coro):
        t = time.perf_counter()
        await coro
        put(key, time.perf_counter() - t)

    for _ in range(cycles):
        await timed("engine_rpc_noop", eng.collective_rpc(_noop))
        await timed("is_sleeping_rpc", eng.is_sleeping())
        await timed("sleep2", eng.sleep(level=2))
        await timed("wake_weights", eng.wake_up(tags=["weights"]))
        await timed("wake_kv", eng.wake_up(tags=["kv_cache"]))
        await timed("resume_after_wake", eng.resume_generation())
        await timed("sleep2_b", eng.sleep(level=2))
        await timed("wake_all_one_call", eng.wake_up(tags=None))
        await timed("resume_after_wake_all", eng.resume_generation())
        await timed("pause", vllm_compat.pause_generation(eng, "abort"))
        await timed("resume_after_pause", eng.resume_generation())
        for tags, where, sec in [(t, w, s) for w, t, s in (await eng.collective_rpc(_drain))[0]]:
            put(f"{where}:{'+'.join(tags) if tags else 'all'}", sec)
    await host.shutdown()
    out = {k: ms(v) for k, v in rows.items()}
    out["held"] = held
    return out


def ray_rtt(rounds: int = 200) -> dict:
    import ray

    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)

    @ray.remote
    class A:
        async def call(self, *args):
            return len(args)

    actor = A.options(max_concurrency=64).remote()
    ray.get(actor.call.remote())
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        ray.get(actor.call.remote("h" * 2000), timeout=30)
        out.append(time.perf_counter() - t)
    ray.shutdown()
    return {"ray_async_actor_rtt": ms(out)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--util", type=float, default=0.15)
    p.add_argument("--cycles", type=int, default=8)
    p.add_argument("--workdir", default="/tmp/bench")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    res = {"util": a.util, **ray_rtt(), **asyncio.run(probe(a.util, a.cycles, a.workdir)),
           "_about": "ms, medians; scripts/probe_wake_gpu.py"}
    print(json.dumps(res))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
