"""Sync benchmark: N syncs per fleet size, every phase's p50/p95, bytes, GB/s, and floors
measured in the same run. Writes JSON + PNG under benchmarks/results/.

    python -m benchmarks.run --shape small --engines 1,2,4,8 --syncs 5          # CPU
    python -m benchmarks.run --shape 0.5b --ipc --sleep-level 1 --syncs 10     # one GPU
    python -m benchmarks.run --shape 0.5b --ipc --colocated --sleep-level 2    # the RL loop
    python -m benchmarks.run --shape moe-30b-a3b --ipc --ipc-reuse --syncs 10  # MoE, one GPU

``--colocated`` times the colocated loop's sync: before every sync the fleet sleeps
(``SyncCoordinator.sleep``, not timed; what it freed is recorded), and the sync goes into the
sleeping engines, from the call until every engine serves again.

``moe-*`` shapes are Qwen3-MoE models (``build_moe_model``); the trainer is transformers'
``Qwen3MoeForCausalLM`` loaded from them, holding its experts fused (``mlp.experts.gate_up_proj``)
as a trainer does, and the sync converts them to the checkpoint's per-expert names.
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import time
from pathlib import Path

import typer

from benchmarks.baselines import raw_device_copy, raw_gloo_broadcast, summary
from benchmarks.meta import commit, run_meta

app = typer.Typer(add_completion=False)

SHAPES = {  # Qwen2-style; "tiny" and "small" are for CPU, the rest mirror Qwen2.5 sizes
    "tiny": dict(hidden=128, layers=2, heads=2, kv_heads=1, intermediate=256, vocab_size=512),
    "small": dict(hidden=512, layers=8, heads=8, kv_heads=2, intermediate=1536, vocab_size=8192),
    "0.5b": dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab_size=151936,
                 tie_word_embeddings=True),
    "1.5b": dict(hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960,
                 vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944, vocab_size=152064),
}
MOE_SHAPES = {  # Qwen3-MoE; "moe-30b-a3b" has Qwen3-30B-A3B's per-layer shapes, 3 of its 48 layers
    "moe-tiny": dict(hidden=128, layers=2, experts=8, top_k=2, moe_intermediate=64, heads=2,
                     kv_heads=1, vocab_size=512),
    "moe-30b-a3b": dict(hidden=2048, layers=3, experts=128, top_k=8, moe_intermediate=768,
                        heads=32, kv_heads=4, head_dim=128, vocab_size=151936),  # ~4.98 GB bf16
    "moe-30b-a3b-4l": dict(hidden=2048, layers=4, experts=128, top_k=8, moe_intermediate=768,
                           heads=32, kv_heads=4, head_dim=128, vocab_size=151936),  # ~6.6 GB
}
PHASES = ["pause", "sleep", "wake_weights", "transfer", "reload", "reset_caches", "fingerprint",
          "wake_kv", "wake", "resume"]


class _CoordinatorClock:
    """The coordinator's own view of a sync: the wall time between the phases it announces
    (``SyncCoordinator(on_phase=...)``), from the call to the return. ``coordinator.plan`` is
    the call until validation (engine statuses, the plan, the feed); the last phase
    (``resume``: the commit) lasts until ``sync`` returns; each bucket belongs to
    ``transfer``."""

    def __init__(self) -> None:
        self.marks: list[tuple[str, float]] = []

    def __call__(self, phase: str, engine: str | None) -> None:
        name = "transfer" if phase.startswith("bucket:") else phase
        if not self.marks or self.marks[-1][0] != name:
            self.marks.append((name, time.perf_counter()))

    def start(self) -> None:
        self.marks = [("plan", time.perf_counter())]

    def phases(self) -> dict[str, float]:
        ends = [*self.marks[1:], ("", time.perf_counter())]
        out: dict[str, float] = {}
        for (name, t), (_, t_next) in zip(self.marks, ends):
            out[f"coordinator.{name}"] = out.get(f"coordinator.{name}", 0.0) + t_next - t
        return out


def _build_model(shape: str, workdir: Path, dtype: str, device: str) -> tuple[Path, dict]:
    """The shape's random-weight model directory and what it was built from."""
    from weightsync.testing.models import build_moe_model, build_text_model

    if shape in MOE_SHAPES:
        return (build_moe_model(workdir / f"qwen3moe-{shape}-{dtype}", dtype=dtype,
                                device=device, **MOE_SHAPES[shape]),
                {"kind": "qwen3_moe", **MOE_SHAPES[shape]})
    if shape not in SHAPES:
        raise typer.BadParameter(f"unknown shape {shape!r}: one of {[*SHAPES, *MOE_SHAPES]}")
    return (build_text_model(workdir / f"qwen2-{shape}-{dtype}", dtype=dtype, device=device,
                             **SHAPES[shape]),
            {"kind": "qwen2", **SHAPES[shape]})


def _versions() -> dict:
    import ray
    import torch
    import vllm

    out = {"commit": commit(), "torch": torch.__version__, "vllm": vllm.__version__,
           "ray": ray.__version__,
           "python": platform.python_version(), "machine": platform.machine(),
           "cpus": __import__("os").cpu_count()}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


@app.command()
def main(shape: str = typer.Option("small"), engines: str = typer.Option("1,2,4"),
         syncs: int = typer.Option(5, min=1), bucket_mib: int = typer.Option(32, min=1),
         ipc: bool = typer.Option(False), sleep_level: int = typer.Option(0),
         apply: str = typer.Option("staged"), dtype: str = typer.Option("auto"),
         native: bool = typer.Option(False, help="GPU: also time vLLM's native IPC API"),
         gpu_util: float = typer.Option(0.4, help="GPU: vLLM memory share for all engines"),
         ipc_reuse: bool = typer.Option(False, help="keep IPC buckets mapped across syncs"),
         ipc_direct: bool = typer.Option(False, help="IPC into one engine: copy from the "
                                         "trainer's own tensors (TransferConfig.ipc.direct)"),
         cpu_kv_gib: float = typer.Option(1.0, help="CPU: each engine's KV cache (8 engines "
                                          "of the small shape fit 24 GiB at 0.25)"),
         broadcast: str = typer.Option("collective", help="gloo: collective | chain"),
         colocated: bool = typer.Option(False, help="sleep the fleet before every sync (at "
                                        "--sleep-level, 1 if 0) and sync into it"),
         check_finite: bool = typer.Option(True, help="the engines' finite check "
                                           "(TransferConfig.check_finite); off only to "
                                           "measure what it costs"),
         out: Path = typer.Option(None), workdir: Path = typer.Option(Path("runs/bench"))) -> None:
    import ray
    import torch

    from weightsync.config import BroadcastSettings, EngineSpec, IpcSettings, TransferConfig
    from weightsync.coordinator import SyncCoordinator
    from weightsync.engine.actor import start_engines, stop_engines
    from weightsync.testing.reference import load_trainer_model, perturb_

    gpu = torch.cuda.is_available()
    dtype = dtype if dtype != "auto" else ("bfloat16" if gpu else "float32")
    sizes = sorted({int(x) for x in engines.split(",")})
    model_dir, model_cfg = _build_model(shape, workdir, dtype, "cuda" if gpu else "cpu")
    ray.init(num_cpus=max(2, sizes[-1]), num_gpus=1 if gpu else 0, include_dashboard=False,
             log_to_driver=False)
    per_gpu = 1.0 / (sizes[-1] + (1 if ipc else 0)) if gpu else 0.0
    specs = [EngineSpec(name=f"bench-{i}", model=str(model_dir), dtype=dtype, num_gpus=per_gpu,
                        gpu_memory_utilization=gpu_util / sizes[-1] if gpu else 0.5,
                        cpu_kvcache_gib=cpu_kv_gib, max_model_len=512, enforce_eager=True)
             for i in range(sizes[-1])]
    t = time.perf_counter()
    actors = start_engines(specs)
    boot = time.perf_counter() - t
    device = "cuda" if gpu else "cpu"
    policy = load_trainer_model(model_dir, dtype=getattr(torch, dtype)).to(device)
    cfg = TransferConfig(bucket_bytes=bucket_mib << 20, apply=apply, check_finite=check_finite,
                         ipc=IpcSettings(reuse_buffers=ipc_reuse, direct=ipc_direct),
                         broadcast=BroadcastSettings(
                             backend="nccl" if gpu and not ipc else "gloo",
                             mode=broadcast if not gpu else "collective"))
    runs: list[dict] = []
    result = {"meta": run_meta("sync", shape=shape, colocated=colocated),
              "date": dt.date.today().isoformat(), "versions": _versions(), "device": device,
              "shape": shape, "model": model_cfg, "dtype": dtype, "ipc": ipc,
              "trainer_class": type(policy).__name__,
              "trainer_fused_experts": any(n.endswith("mlp.experts.gate_up_proj")
                                           for n, _ in policy.named_parameters()),
              "ipc_reuse_buffers": ipc_reuse, "ipc_direct": ipc_direct,
              "sleep_level": sleep_level, "apply": apply, "bucket_mib": bucket_mib,
              "check_finite": check_finite,
              "colocated": colocated, "gpu_memory_utilization": gpu_util if gpu else None,
              "broadcast": cfg.broadcast.mode,
              "syncs": syncs, "engine_boot_s": boot, "runs": runs,
              "baseline_vllm_native_ipc": None}
    out = out or Path("benchmarks/results") / f"sync-{device}-{shape}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    for k in sizes:
        clock = _CoordinatorClock()
        coord = SyncCoordinator(actors[:k], cfg, on_phase=clock)
        totals, nbytes, slept, layouts, packed = [], 0, [], [], []
        phases: dict[str, list[float]] = {p: [] for p in PHASES}
        for i in range(syncs + 1):  # sync 0 warms up (first reload, allocator)
            perturb_(policy, scale=1e-3, seed=i)
            if colocated:  # after the rollout: the trainer's step runs while the fleet sleeps
                s = coord.sleep(sleep_level or 1)
                slept.append({"seconds": max(e.seconds["sleep"] for e in s.engines),
                              "freed_bytes": [e.freed_bytes for e in s.engines],
                              "free_after": [e.free_after for e in s.engines]})
            if gpu:  # the trainer's own queued work is not the sync's
                torch.cuda.synchronize()
            clock.start()
            res = coord.sync(policy, ipc=ipc, sleep_level=0 if colocated else sleep_level)
            seen = clock.phases()
            nbytes = res.nbytes
            if i == 0:
                continue
            totals.append(res.seconds["total"])
            layouts.append(res.layout)
            if ipc:  # why the IPC leg packed its buckets (None: it shared the trainer's own)
                packed.append(coord._leg("ipc").direct_note)
            for p in sorted({k for e in res.engines for k in e.seconds}):  # sub-phases too
                vals = [e.seconds[p] for e in res.engines if p in e.seconds]
                phases.setdefault(p, []).append(max(vals))
            for p, v in seen.items():
                phases.setdefault(p, []).append(v)
        run = {"engines": k, "bytes": nbytes, "total": summary(totals), "layout": res.layout,
               "layout_note": res.layout_note,
               "layouts": {x: layouts.count(x) for x in sorted(set(layouts))},  # timed syncs
               "ipc_packed_because": {str(x): packed.count(x) for x in set(packed)} if ipc
               else None,
               "phases": {p: summary(v) for p, v in phases.items() if v},
               "skipped": list(res.engines[0].skipped), "sleeps": slept[1:]}
        tr = run["phases"]["transfer"]["p50"]
        run["transfer_GBps"] = nbytes / tr / 1e9 if tr else None
        tl = run["phases"].get("transfer+reload", {}).get("p50")
        run["transfer_plus_reload_p50"] = tl
        if gpu:
            run["floor_device_copy"] = summary(raw_device_copy(nbytes, syncs))
            floor = run["floor_device_copy"]["p50"]
            run["ratio_transfer_reload_vs_copy_floor"] = tl / floor if tl and floor else None
        else:
            from weightsync.transport.packing import named_tensors, plan_buckets, spec_of

            plan = plan_buckets([spec_of(n, t) for n, t in named_tensors(policy)],
                                cfg.bucket_bytes, 1)
            run["floor_raw_broadcast"] = summary(raw_gloo_broadcast(plan, k, syncs))
            run["ratio_transfer_vs_raw"] = tr / run["floor_raw_broadcast"]["p50"]
            run["ratio_total_vs_raw"] = run["total"]["p50"] / run["floor_raw_broadcast"]["p50"]
        run["scaling_vs_1"] = run["total"]["p50"] / (runs[0] if runs else run)["total"]["p50"]
        # the fixed cost of one call into an engine's actor (Ray both ways, the actor's event
        # loop): every sync's transfer makes one
        run["engine_call_round_trip"] = _round_trips(actors[0].status)
        # and through vLLM to its worker and back (collective_rpc: a trivial worker call)
        run["engine_worker_round_trip"] = _round_trips(actors[0].gpu_memory)
        runs.append(run)
        coord.close()
        out.write_text(json.dumps(result, indent=2))  # a later failure keeps what ran
        typer.echo(json.dumps({k2: v for k2, v in run.items() if k2 != "phases"}))
    native_result = None
    if native and gpu:
        from benchmarks.native_vllm import native_ipc_syncs

        stop_engines(actors, timeout_s=120)
        native_result = {m: summary(native_ipc_syncs(str(model_dir), dtype, policy, syncs,
                                                     packed=m == "packed",
                                                     gpu_memory_utilization=gpu_util))
                         for m in ("packed", "unpacked")}
        # like for like: trainer wall time from the first byte moved until the engine has
        # loaded it (theirs: start_weight_update + send + finish_weight_update)
        ours = runs[0]["phases"]["transfer+reload"]["p50"]
        native_result["ours_transfer_plus_reload_p50"] = ours
        native_result["speedup_vs_packed"] = native_result["packed"]["p50"] / ours
        result["baseline_vllm_native_ipc"] = native_result
        typer.echo(json.dumps(native_result))
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    typer.echo(f"wrote {out} and {out.with_suffix('.png')}")
    ray.shutdown()


def _round_trips(method, n: int = 50) -> dict:
    """p50/p95 of ``n`` Ray calls of an actor's ``method`` (no arguments), one at a time."""
    import ray

    times = []
    for _ in range(n):
        t = time.perf_counter()
        ray.get(method.remote())
        times.append(time.perf_counter() - t)
    return summary(times)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    ks = [str(r["engines"]) for r in runs]
    bottom = [0.0] * len(runs)
    for p in PHASES:
        vals = [r["phases"].get(p, {}).get("p50", 0.0) * 1e3 for r in runs]
        if any(vals):
            a.bar(ks, vals, bottom=bottom, label=p)
            bottom = [x + y for x, y in zip(bottom, vals)]
    a.set_xlabel("engines")
    a.set_ylabel("ms (p50, slowest engine)")
    a.set_title(f"sync phases — {result['shape']} ({runs[0]['bytes'] / 1e6:.1f} MB, "
                f"{runs[-1].get('layout', 'checkpoint')} layout)")
    a.legend(fontsize=8)
    xs = [r["engines"] for r in runs]
    b.plot(xs, [r["total"]["p50"] * 1e3 for r in runs], "o-", label="sync total (p50)")
    b.plot(xs, [r["phases"]["transfer"]["p50"] * 1e3 for r in runs], "s-", label="transfer phase")
    if all(r.get("transfer_plus_reload_p50") for r in runs):
        b.plot(xs, [r["transfer_plus_reload_p50"] * 1e3 for r in runs], "d-",
               label="transfer+reload (p50)")
    floor = "floor_raw_broadcast" if "floor_raw_broadcast" in runs[0] else "floor_device_copy"
    b.plot(xs, [r[floor]["p50"] * 1e3 for r in runs], "^--", label=floor.replace("_", " "))
    b.set_xlabel("engines")
    b.set_ylabel("ms")
    b.set_xscale("log", base=2)
    ratio = runs[0].get("ratio_transfer_reload_vs_copy_floor")
    b.set_title(f"fleet scaling on {result['device']}"
                + (f" (1 engine: transfer+reload = {ratio:.2f}x copy floor)" if ratio else ""))
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    app()
