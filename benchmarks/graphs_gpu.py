"""CUDA graphs vs eager on the GPU: the colocated sync's time and rollout throughput.

Measured by ``tests/gpu/test_warm_cold_gpu.py`` (one engine per mode, both alive at once, the
same 0.5B-shaped bf16 model, the trainer in the test process): ``measure_sync`` times the
colocated IPC syncs of both, interleaved, ``measure_rollout`` the generated tokens per second
of a batch of sampled requests. The test puts both into the GPU suite's results
(``gpu-results.json``, ``data["graphs_vs_eager"]``); this module's ``main`` turns that into
``benchmarks/results/graphs-gpu.{json,png}``:

    python -m benchmarks.graphs_gpu path/to/gpu-results.json
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.meta import PACKAGES, run_meta

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


def main(results_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    src = json.loads(Path(results_path).read_text())
    data = src["data"]["graphs_vs_eager"]
    out = Path(__file__).parent / "results"
    run = src["meta"]  # the GPU run's own commit, device, date and versions
    doc = {"meta": run_meta("graphs-gpu", **{
        **{k: v for k, v in run.items() if k != "benchmark"}, "cpus": run.get("cpus"),
        "versions": run.get("versions") or {k: run[k] for k in ("python", *PACKAGES)
                                            if run.get(k)},
        "source": "tests/gpu/test_warm_cold_gpu.py (gpu-results.json)"}), "results": data}
    (out / "graphs-gpu.json").write_text(json.dumps(doc, indent=1, sort_keys=True))
    modes = sorted(data)
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.bar(modes, [data[m]["sync_p50_s"] * 1e3 for m in modes], color=["#4c72b0", "#dd8452"])
    a.set_ylabel("colocated sync p50 (ms)")
    b.bar(modes, [data[m]["tokens_per_s"] for m in modes], color=["#4c72b0", "#dd8452"])
    b.set_ylabel("rollout tokens/s")
    fig.suptitle(f"{doc['meta'].get('device')}: 0.5B bf16, eager vs CUDA graphs "
                 f"({doc['meta'].get('commit')})")
    fig.tight_layout()
    fig.savefig(out / "graphs-gpu.png", dpi=110)


if __name__ == "__main__":
    main(sys.argv[1])
