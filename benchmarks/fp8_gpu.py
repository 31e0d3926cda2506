"""FP8 vs bf16 engines on one GPU (#32): the colocated sync's time and rollout throughput.

    python -m benchmarks.fp8_gpu --shape 0.5b       # also 7b, moe-30b-a3b (benchmarks.run shapes)

One random-weight model of the shape in bf16; two engines of it, both with CUDA graphs, one
serving bf16 and one vLLM's online FP8 (``engine_args={"quantization": "fp8"}``: the bf16
checkpoint quantized at load, and again on every sync); the trainer (this process) holds
transformers' bf16 model on the same GPU. ``benchmarks.graphs_gpu.measure_sync`` times
``--syncs`` colocated IPC syncs into both, interleaved round by round (the first, which loads
in the checkpoint format and compiles, is not in the p50); ``measure_rollout`` the generated
tokens per second of one batch of sampled requests on each. The engines start one after
the other. Writes ``benchmarks/results/fp8-gpu-<shape>.{json,png}`` (or ``--out``): per engine
the sync p50 and phases, the layout the syncs settled on, tokens/s, and the FP8/bf16 ratios
(the issue's target: FP8 sync at most 1.3x bf16's). Needs the lent GPU (not run in CI).
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from benchmarks.graphs_gpu import measure_rollout, measure_sync
from benchmarks.meta import run_meta

app = typer.Typer(add_completion=False)
MODES = ("bf16", "fp8")


def _run(shape: str, syncs: int, gpu_util: float, workdir: Path) -> dict:
    import ray
    import torch
    from transformers import AutoModelForCausalLM

    from benchmarks.run import _build_model
    from weightsync.config import EngineSpec, TransferConfig
    from weightsync.coordinator import SyncCoordinator
    from weightsync.engine.actor import start_engines, stop_engines
    from weightsync.testing.reference import perturb_

    model_dir, built = _build_model(shape, workdir, "bfloat16", "cuda")
    ray.init(include_dashboard=False, log_to_driver=False)
    specs = [EngineSpec(name=f"fp8-bench-{m}", model=str(model_dir), dtype="bfloat16",
                        num_gpus=0.4, gpu_memory_utilization=gpu_util, max_model_len=512,
                        enforce_eager=False,
                        engine_args={"quantization": "fp8"} if m == "fp8" else {})
             for m in MODES]
    # one after the other: two engines profiling the GPU's memory at once each count the
    # other's (the 7B shape's engines failed to start side by side at ca817f2)
    actors = [a for spec in specs for a in start_engines([spec], timeout_s=600)]
    trainer = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda()
    coords = {m: SyncCoordinator([a], TransferConfig(bucket_bytes=256 << 20,
                                                     ipc_reuse_buffers=True))
              for m, a in zip(MODES, actors, strict=True)}
    layout: dict[str, tuple[str, str | None]] = {}

    def perturb(model, scale, seed):  # (the trainer's update done before the sync reads it)
        perturb_(model, scale=scale, seed=seed)
        torch.cuda.synchronize()

    try:
        perf = measure_sync(coords, trainer, syncs, perturb)
        for m, actor in zip(MODES, actors, strict=True):
            perf[m].update(measure_rollout(actor))
            res = coords[m].sync(trainer, ipc=True)  # one more: which layout it settles on
            layout[m] = (res.layout, res.layout_note)
    finally:
        for c in coords.values():
            c.close()
        stop_engines(actors)
        ray.shutdown()
    return {"shape": shape, "model": built, "syncs": syncs, "gpu_memory_utilization": gpu_util,
            "engines": perf, "layout": layout,
            "fp8_over_bf16_sync_p50": perf["fp8"]["sync_p50_s"] / perf["bf16"]["sync_p50_s"],
            "fp8_over_bf16_tokens_per_s": (perf["fp8"]["tokens_per_s"]
                                           / perf["bf16"]["tokens_per_s"])}


@app.command()
def main(shape: str = typer.Option("0.5b"), syncs: int = typer.Option(10, min=2),
         gpu_util: float = typer.Option(0.25), out: Path | None = typer.Option(None),
         workdir: Path = typer.Option(Path("runs/bench"))) -> None:
    out = out or Path(f"benchmarks/results/fp8-gpu-{shape}.json")
    run = _run(shape, syncs, gpu_util, workdir)
    result = {"meta": run_meta(f"fp8-gpu-{shape}", device="cuda"), "run": run}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, sort_keys=True))
    plot(result, out.with_suffix(".png"))
    typer.echo(json.dumps({k: v for k, v in run.items() if k.startswith("fp8_over")}))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = result["run"]
    eng = run["engines"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    colors = ["#4c72b0", "#dd8452"]
    a.bar(MODES, [eng[m]["sync_p50_s"] * 1e3 for m in MODES], color=colors)
    a.set_ylabel("colocated sync p50 (ms)")
    b.bar(MODES, [eng[m]["tokens_per_s"] for m in MODES], color=colors)
    b.set_ylabel("rollout tokens/s (CUDA graphs)")
    fig.suptitle(f"{result['meta'].get('device')}: {run['shape']}, bf16 vs online FP8 "
                 f"(FP8/bf16 sync {run['fp8_over_bf16_sync_p50']:.2f}x; commit "
                 f"{result['meta'].get('commit')})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    app()
