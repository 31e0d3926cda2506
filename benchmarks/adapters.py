"""LoRA adapter sync vs full sync of the same base (#31). Writes JSON + PNG under
benchmarks/results/.

    python -m benchmarks.adapters --shape tiny --engines 2 --syncs 10            # CPU
    python -m benchmarks.adapters --shape 0.5b --device cuda --engines 1 --ipc   # one GPU

One fleet of ``--engines`` LoRA-enabled engines (``max_lora_rank`` = ``--rank``) on the shape's
random-weight model (``benchmarks.run.SHAPES``); the trainer holds transformers' model of the
same weights with a peft LoRA of rank ``--rank`` on every linear layer. Each sync is timed from
the call until it returns, after one untimed warm-up sync of each kind (it opens the group):

- ``full``: ``coord.sync(model)``, every base weight (what a LoRA trainer ships when it merges
  its adapter), over the broadcast leg (``--ipc``: CUDA IPC, engines on the trainer's GPU),
  into the LoRA engines (``--full-into same``, CPU's default) or into as many engines of the
  same model without LoRA (``plain``, the GPU's default: vLLM 0.24 refuses base weights into
  LoRA-wrapped layers, ``vllm_compat.reload_refusal``), sharing the GPU with them;
- ``adapter-calls``: ``coord.sync_adapter(peft_model)``, the adapter's bytes in the engine calls;
- ``adapter-group``: the same with ``leg="broadcast"``, the bytes once over the transfer group;
- ``adapter-ipc`` (``--ipc``): ``leg="ipc"``, packed on the trainer's GPU and mapped there by
  the colocated engines' workers.

Each adapter kind also records the p50 of the flip's steps (``AdapterFleetResult.phases``).
Every adapter sync is timed with its packing (``sync_adapter`` of the peft model: read peft's
state dict, pack, checksum), as the full sync is with its own.

Before each sync the trainer changes what it sends (seeded noise on every base weight, or on
every LoRA B), as a training step would. Bytes: what one engine receives per sync (the
trainer sends it once per engine in the calls, once in all over a group); what comes back is
the engines' replies only (status, checksums and timings: a few KB of JSON).
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import typer

from benchmarks.baselines import summary
from benchmarks.meta import commit, run_meta

app = typer.Typer(add_completion=False)
KINDS = ("full", "adapter-calls", "adapter-group", "adapter-ipc")
LEGS = {"adapter-calls": None, "adapter-group": "broadcast", "adapter-ipc": "ipc"}


def _fleet(model_dir: Path, n: int, rank: int | None, device: str, dtype: str,
           gpu_util: float, share: int = 1):
    """``n`` engines of the model, LoRA-enabled up to ``rank`` (None: without LoRA, named
    ``plain-<i>``); ``share``: how many such fleets share the GPU."""
    from weightsync.config import EngineSpec
    from weightsync.engine.actor import start_engines

    args: dict = {} if rank is None else {"enable_lora": True, "max_lora_rank": rank,
                                          "max_loras": 4}
    if device != "cpu":  # vLLM captures LoRA graphs per batch size up to it: 256 took ~2 min
        args["max_num_seqs"] = 16
    specs = [EngineSpec(name=f"{'plain' if rank is None else 'lora'}-{i}", model=str(model_dir),
                        dtype=dtype, max_model_len=512, enforce_eager=device == "cpu",
                        cpu_kvcache_gib=0.25, gpu_memory_utilization=gpu_util / share,
                        num_gpus=0.0 if device == "cpu" else 1.0 / (n * share), engine_args=args)
             for i in range(n)]
    return start_engines(specs)


def _bump_adapter(model, seed: int) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=g).to(p) * 1e-3)


def _run(shape: str, engines: int, syncs: int, rank: int, device: str, ipc: bool,
         gpu_util: float, workdir: Path, full_into: str) -> dict:
    import ray
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from benchmarks.run import SHAPES
    from weightsync.config import TransferConfig
    from weightsync.coordinator import SyncCoordinator
    from weightsync.engine.actor import stop_engines
    from weightsync.testing.models import build_text_model
    from weightsync.testing.reference import perturb_

    dtype = "float32" if device == "cpu" else "bfloat16"
    model_dir = build_text_model(workdir / f"qwen2-{shape}-{dtype}", dtype=dtype,
                                 device=device, **SHAPES[shape])
    ray.init(include_dashboard=False, log_to_driver=False)
    share = 2 if full_into == "plain" else 1
    actors = _fleet(model_dir, engines, rank, device, dtype, gpu_util, share)
    plain = _fleet(model_dir, engines, None, device, dtype, gpu_util, share) \
        if full_into == "plain" else actors
    def load():
        return AutoModelForCausalLM.from_pretrained(model_dir,
                                                    dtype=getattr(torch, dtype)).to(device)

    base = load()  # the full sync's source (peft wraps the layers of the model it is given)
    peft_model = get_peft_model(load(), LoraConfig(r=rank, lora_alpha=2 * rank,
                                                   target_modules="all-linear",
                                                   lora_dropout=0.0))
    _bump_adapter(peft_model, seed=0)
    coord = SyncCoordinator(actors, TransferConfig(bucket_bytes=256 << 20))
    full_coord = coord if plain is actors else SyncCoordinator(
        plain, TransferConfig(bucket_bytes=256 << 20))
    kinds = [k for k in KINDS if k != "adapter-ipc" or ipc]
    times: dict[str, list[float]] = {k: [] for k in kinds}
    phases: dict[str, dict[str, list[float]]] = {k: {} for k in kinds[1:]}
    nbytes: dict[str, int] = {}
    try:
        for i in range(syncs + 1):  # sync 0 of each kind: the warm-up, not timed
            perturb_(base, scale=1e-3, seed=i)  # the adapter's base weights: what a merge sends
            t = time.perf_counter()
            full = full_coord.sync(base, ipc=ipc)
            took = time.perf_counter() - t
            if i:
                times["full"].append(took)
            nbytes["full"] = full.nbytes
            for kind in kinds[1:]:
                _bump_adapter(peft_model, seed=1000 + i)
                if device != "cpu":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                res = coord.sync_adapter(peft_model, name="policy", leg=LEGS[kind])
                took = time.perf_counter() - t
                if i:
                    times[kind].append(took)
                    for p, v in res.phases.items():
                        phases[kind].setdefault(p, []).append(v)
                nbytes[kind] = max(r.nbytes for r in res.replies.values())
    finally:
        coord.close()
        if full_coord is not coord:
            full_coord.close()
            stop_engines(plain)
        stop_engines(actors)
        ray.shutdown()
    out = {k: {"seconds": summary(v), "bytes_per_engine": nbytes[k]} for k, v in times.items()}
    for k in kinds[1:]:
        out[k]["vs_full_p50"] = out[k]["seconds"]["p50"] / out["full"]["seconds"]["p50"]
        out[k]["phases_p50"] = {p: summary(v)["p50"] for p, v in phases[k].items()}
    return {"shape": shape, "engines": engines, "rank": rank, "dtype": dtype,
            "full_leg": "ipc" if ipc else "broadcast", "full_into": full_into, **out}


@app.command()
def main(shape: str = typer.Option("tiny"), engines: int = typer.Option(2, min=1),
         syncs: int = typer.Option(10, min=1), rank: int = typer.Option(16, min=1),
         device: str = typer.Option("cpu"), ipc: bool = typer.Option(False),
         gpu_util: float = typer.Option(0.3), out: Path | None = typer.Option(None),
         workdir: Path = typer.Option(Path("runs/bench")),
         full_into: str | None = typer.Option(
             None, help="same: the full sync goes into the LoRA engines (CPU default); "
                        "plain: into engines of the same model without LoRA (GPU default: "
                        "vLLM 0.24 cannot reload base weights into LoRA-wrapped layers)")) -> None:
    where = "cpu" if device == "cpu" else "gpu"
    out = out or Path(f"benchmarks/results/adapters-{where}-{shape}.json")
    full_into = full_into or ("same" if device == "cpu" else "plain")
    if full_into not in ("same", "plain"):
        raise typer.BadParameter(f"--full-into is same or plain, not {full_into!r}")
    run = _run(shape, engines, syncs, rank, device, ipc, gpu_util, workdir, full_into)
    result = {"meta": run_meta(f"adapters-{where}-{shape}", device=device),
              "commit": commit(), "python": platform.python_version(), "syncs": syncs,
              "run": run}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    typer.echo(json.dumps(run, indent=2))
    typer.echo(f"wrote {out} and {out.with_suffix('.png')}")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = result["run"]
    kinds = [k for k in KINDS if k in run]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    p50 = [run[k]["seconds"]["p50"] * 1e3 for k in kinds]
    p95 = [run[k]["seconds"]["p95"] * 1e3 for k in kinds]
    xs = range(len(kinds))
    axes[0].bar([x - 0.2 for x in xs], p50, 0.4, label="p50")
    axes[0].bar([x + 0.2 for x in xs], p95, 0.4, label="p95")
    axes[0].set_xticks(list(xs), kinds)
    axes[0].set_title("sync, call to return (ms)")
    axes[0].legend(fontsize=8)
    axes[1].bar(kinds, [run[k]["bytes_per_engine"] / 2**20 for k in kinds])
    axes[1].set_title("bytes each engine receives (MiB)")
    axes[1].set_yscale("log")
    fig.suptitle(f"{run['shape']} ({run['dtype']}), LoRA rank {run['rank']} on every linear "
                 f"layer, {run['engines']} engine(s), commit {result['commit']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    app()
