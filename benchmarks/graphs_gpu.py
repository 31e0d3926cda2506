"""CUDA graphs vs eager on the GPU: the colocated sync's time and rollout throughput.

One engine per mode, both alive at once, on the same 0.5B-shaped bf16 model, the trainer in
this process: ``measure_sync`` times the colocated IPC syncs of both, interleaved,
``measure_rollout`` the generated tokens per second of a batch of sampled requests. Writes
``graphs-gpu.{json,png}`` (on the lent GPU: ``scripts/gpu_bench.sh graphs``):

    python -m benchmarks.graphs_gpu --out runs/gpu-bench/graphs-gpu.json
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.meta import run_meta

ROLLOUT_PROMPTS = 64
ROLLOUT_TOKENS = 128


def measure_sync(coords: dict[str, Any], trainer: Any, rounds: int,
                 perturb: Any) -> dict[str, dict[str, Any]]:
    """``rounds`` colocated IPC syncs into each engine of ``coords`` (mode -> a coordinator of
    one engine), interleaved — every round perturbs the trainer, then syncs each mode, the
    order alternating round by round — so both modes see the same machine state (a separate
    run per mode differed by 33% for the same mode). Per mode: the coordinator's total
    seconds of each sync, and the median of every phase the coordinator and the engine report
    (after the first round, which has the checkpoint-format load)."""
    totals: dict[str, list[float]] = {m: [] for m in coords}
    phases: dict[str, list[dict[str, float]]] = {m: [] for m in coords}
    modes = sorted(coords)
    for i in range(rounds):
        perturb(trainer, scale=1e-3, seed=1000 + i)
        for mode in modes if i % 2 == 0 else modes[::-1]:
            t = time.perf_counter()
            res = coords[mode].sync(trainer, ipc=True)
            totals[mode].append(time.perf_counter() - t)
            assert res.ok, res
            phases[mode].append({**{f"coord.{p}": s for p, s in res.seconds.items()},
                                 **{f"engine.{p}": s for p, s in res.engines[0].seconds.items()}})
    out = {}
    for mode in modes:
        later, rest = totals[mode][1:], phases[mode][1:]
        names = sorted({p for ph in rest for p in ph})
        out[mode] = {"sync_s": totals[mode], "sync_p50_s": statistics.median(later),
                     "syncs": rounds, "interleaved": True,
                     "phase_p50_s": {p: statistics.median(ph[p] for ph in rest if p in ph)
                                     for p in names}}
    return out


def measure_rollout(actor: Any) -> dict[str, Any]:
    """Generated tokens per second for ``ROLLOUT_PROMPTS`` sampled requests of
    ``ROLLOUT_TOKENS`` tokens each, in one batch (after one warm-up batch)."""
    import ray

    prompts = [f"prompt number {i} says" for i in range(ROLLOUT_PROMPTS)]

    def run() -> tuple[float, int]:
        t = time.perf_counter()
        outs = ray.get(actor.generate.remote(prompts, max_tokens=ROLLOUT_TOKENS,
                                             temperature=1.0, seed=0, ignore_eos=True),
                       timeout=600)
        return time.perf_counter() - t, sum(len(o.token_ids) for o in outs)

    run()
    seconds, tokens = run()
    return {"rollout_s": seconds, "rollout_tokens": tokens, "tokens_per_s": tokens / seconds}


QWEN05_BF16 = dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864,
                   vocab_size=151936, tie_word_embeddings=True, dtype="bfloat16")


def measure(workdir: Path, rounds: int) -> dict[str, Any]:
    """Both engines started (vLLM's memory share 0.25 each, graphs for batches up to 16 as in
    the GPU suite, the sampled batch of 64 run eagerly above that), ``rounds`` syncs, then each
    one's rollout throughput."""
    import shutil

    import ray
    import torch
    from transformers import AutoModelForCausalLM

    from weightsync.config import EngineSpec, TransferConfig
    from weightsync.coordinator import SyncCoordinator
    from weightsync.engine.actor import start_engines, stop_engines
    from weightsync.testing.models import build_text_model
    from weightsync.testing.reference import perturb_

    src = build_text_model(workdir / "qwen2.5-0.5b-shaped-bf16", **QWEN05_BF16)
    trainer = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).cuda().eval()
    ray.init(num_cpus=8, num_gpus=1, include_dashboard=False, namespace="weightsync-bench")
    engines: dict[str, Any] = {}
    coords: dict[str, Any] = {}
    try:
        for mode in ("eager", "graphs"):
            path = workdir / mode
            shutil.copytree(src, path, dirs_exist_ok=True)
            spec = EngineSpec(name=f"perf-{mode}", model=str(path), dtype="bfloat16",
                              num_gpus=0.5, gpu_memory_utilization=0.25, max_model_len=512,
                              enforce_eager=mode == "eager", engine_args={"max_num_seqs": 16})
            (engines[mode],) = start_engines([spec], timeout_s=300)
            coords[mode] = SyncCoordinator([engines[mode]], TransferConfig(
                bucket_bytes=256 << 20, ipc_reuse_buffers=True))
        perf = measure_sync(coords, trainer, rounds, perturb_)
        for mode, actor in engines.items():
            perf[mode].update(measure_rollout(actor))
        return perf
    finally:
        for coord in coords.values():
            coord.close()
        stop_engines(list(engines.values()))
        ray.shutdown()


def main(argv: list[str] | None = None) -> None:
    import argparse

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench-graphs"))
    args = ap.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    data = measure(args.workdir, args.rounds)
    doc = {"meta": run_meta("graphs-gpu", shape="0.5b-bf16", rounds=args.rounds),
           "results": data}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1, sort_keys=True))
    modes = sorted(data)
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.bar(modes, [data[m]["sync_p50_s"] * 1e3 for m in modes], color=["#4c72b0", "#dd8452"])
    a.set_ylabel("colocated sync p50 (ms)")
    b.bar(modes, [data[m]["tokens_per_s"] for m in modes], color=["#4c72b0", "#dd8452"])
    b.set_ylabel("rollout tokens/s")
    fig.suptitle(f"{doc['meta'].get('device')}: 0.5B bf16, eager vs CUDA graphs "
                 f"({doc['meta'].get('commit')})")
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    main()
