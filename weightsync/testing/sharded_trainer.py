"""One rank of a trainer sharded with FSDP2 (``fully_shard`` over a gloo mesh on CPU) that syncs
through ``ShardedSync``. Run one process per rank; each writes a JSON report. Used by
``tests/integration/test_sharded_cpu.py``, ``tests/unit/test_sharded_protocol.py`` and
``benchmarks/sharded.py``.

    python -m weightsync.testing.sharded_trainer RANK WORLD RENDEZVOUS OUT_DIR \
        --model DIR [--ray GCS --namespace NS --engines engine-a,engine-b | --local-fleet DIR]
        [--seed N] [--syncs N] [--bucket-bytes N] [--die-at-gather N]

``--world 1`` is the unsharded baseline (the same model, no ``fully_shard``, a plain sync).
``--die-at-gather N``: this rank SIGKILLs itself on its N-th bucket gather (a trainer rank
killed mid-sync). The report holds each sync's result or error, its wall time, and the rank's
extra memory: the bytes of gathered full tensors it held at once (counted by the source) and
its peak resident set size above the level before the sync (the kernel's high-water mark).
``RENDEZVOUS`` is a file path no run has used (``new_rendezvous``), shared by the ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

SETUP_S = 180.0  # how long the ranks wait for each other to join (rank 0 reaches the fleet first)


def new_rendezvous(out: Path) -> Path:
    """A file path for the ranks of one run to meet at (``join_group``)."""
    out.mkdir(parents=True, exist_ok=True)
    return out.resolve() / f"rendezvous-{uuid.uuid4().hex[:12]}"


def join_group(rank: int, world: int, rendezvous: str | Path, timeout_s: float) -> None:
    """Join the trainer's gloo group through a file, waiting up to ``timeout_s`` for the others.

    A file, not a port: a port picked free and released before rank 0's store binds it can be
    taken meanwhile (Ray and vLLM bind many), and the other ranks then time out connecting."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=Path(rendezvous).resolve().as_uri(), rank=rank,
                            world_size=world, timeout=timedelta(seconds=timeout_s))


def sync_outcome(sync, model, **kwargs) -> dict:
    """One ``sync(model, **kwargs)`` as a report entry: its result (and the sender's checksums)
    or its error, and its wall time."""
    from weightsync.errors import SyncFailedError, WeightSyncError

    t = time.perf_counter()
    entry: dict = {}
    try:
        res = sync(model, **kwargs)
        entry.update(ok=True, version=res.version, result=res.model_dump(mode="json"),
                     sums=list(res.sender_checksums))
    except SyncFailedError as e:
        entry.update(ok=False, error=type(e).__name__, message=str(e),
                     result=e.result.model_dump(mode="json") if e.result else None)
    except WeightSyncError as e:
        entry.update(ok=False, error=type(e).__name__, message=str(e))
    entry["seconds"] = time.perf_counter() - t
    return entry


def _rss_hwm_reset() -> int:
    """Reset the kernel's peak-RSS mark to the current RSS; returns the current RSS (bytes)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _model(args):
    import torch

    from weightsync.testing.reference import load_trainer_model, perturb_

    if args.local_fleet:
        from safetensors.torch import load_file

        from weightsync.testing.fleet import TinyModel

        model = TinyModel()
        model.load_state_dict(load_file(os.path.join(args.local_fleet, "model.safetensors")))
    else:
        model = load_trainer_model(args.model)
    perturb_(model, scale=0.3, seed=args.seed)  # the same on every rank: one policy
    torch.manual_seed(0)
    return model


def _shard(model, world: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in getattr(getattr(model, "model", None), "layers", []):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _expected_sums(args) -> list[int]:
    """The per-bucket checksums of the same policy unsharded, as one process would pack it."""
    from weightsync.sources import ModuleSource
    from weightsync.transport.packing import checksum, pack_bucket, plan_buckets

    source = ModuleSource(_model(args))
    plan = plan_buckets(source.specs(), args.bucket_bytes, 1)
    feed = source.feed(plan)
    return [checksum(pack_bucket(b, feed, "cpu")) for b in plan.buckets]


def _engines(args):
    if args.local_fleet:
        import weightsync.testing.legs  # noqa: F401 - registers the loopback leg
        from weightsync.testing.fleet import Faults, LocalEngines

        return LocalEngines(Path(args.local_fleet), {n: Faults() for n in args.engines})
    import ray

    ray.init(address=args.ray, namespace=args.namespace, log_to_driver=False)
    return [ray.get_actor(n, namespace=args.namespace) for n in args.engines]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("rank", type=int)
    p.add_argument("world", type=int)
    p.add_argument("rendezvous", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--model")
    p.add_argument("--ray")
    p.add_argument("--namespace", default="weightsync-tests")
    p.add_argument("--engines", type=lambda s: s.split(","), default=["engine-a", "engine-b"])
    p.add_argument("--local-fleet")
    p.add_argument("--seed", type=int, default=4242)
    p.add_argument("--syncs", type=int, default=1)
    p.add_argument("--bucket-bytes", type=int, default=1 << 20)
    p.add_argument("--die-at-gather", type=int, default=0)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--wave-size", type=int, default=0, help="rolling waves of this many engines")
    args = p.parse_args()

    import torch
    import torch.distributed as dist

    from weightsync.config import Deadlines, TransferConfig
    from weightsync.coordinator import SyncCoordinator
    from weightsync.sources import sharded

    torch.set_num_threads(1)
    report: dict = {"rank": args.rank, "world": args.world, "syncs": []}
    model = _model(args)
    coord = None
    if args.rank == 0:
        d = args.timeout / 3
        cfg = TransferConfig(bucket_bytes=args.bucket_bytes, deadlines=Deadlines(
            rendezvous=d, transfer=d, verify=d, resume=d, reload=d, lease=d))
        t0 = time.monotonic()
        coord = SyncCoordinator(_engines(args), cfg)
        print(f"rank 0: reached the fleet in {time.monotonic() - t0:.1f} s", flush=True)
    if args.world > 1:
        # the group's own collectives are FSDP's; the sync's waits are ShardedSync's (timeout_s)
        join_group(args.rank, args.world, args.rendezvous, max(args.timeout, SETUP_S))
        model = _shard(model, args.world)
        syncer = sharded.ShardedSync(coord, timeout_s=args.timeout)
        if args.die_at_gather:
            gathers = {"n": 0}
            real = sharded.ShardGather.__call__

            def dying(self, named, srcs):
                gathers["n"] += 1
                if gathers["n"] == args.die_at_gather:
                    os.kill(os.getpid(), signal.SIGKILL)
                return real(self, named, srcs)

            sharded.ShardGather.__call__ = dying  # the harness's own process only
        sync = syncer.sync
    else:
        syncer, sync = None, coord.sync
    kwargs = {"leg": "loopback"} if args.local_fleet and args.rank == 0 else {}
    if args.wave_size and args.rank == 0:  # each wave reads the source again, every rank too
        kwargs["wave_size"] = args.wave_size
    expected = _expected_sums(args) if args.rank == 0 else None
    for _i in range(args.syncs):
        before = _rss_hwm_reset()
        entry = sync_outcome(sync, model, **kwargs)
        if expected is not None and entry["ok"]:  # the gathered bytes are the unsharded model's
            entry["sums_match_unsharded"] = entry["sums"] == expected
        entry["rss_peak_extra"] = _status("VmHWM") - before
        if syncer is not None and syncer.last_source is not None:
            entry["peak_gathered_bytes"] = syncer.last_source.peak_gathered_bytes
        report["syncs"].append(entry)
        if not entry["ok"]:
            break
    if coord is not None:
        report["statuses"] = [s.model_dump(mode="json") for s in coord.statuses()]
        report["bucket_bytes"] = args.bucket_bytes
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{args.rank}.json").write_text(json.dumps(report))
    if args.world > 1 and all(s["ok"] for s in report["syncs"]):
        dist.barrier()  # every rank is done talking before gloo goes
        dist.destroy_process_group()
    elif args.world > 1:  # a peer may be dead: gloo's teardown over a broken pair can abort
        sys.stdout.flush()  # the process ('terminate called without an active exception')
        os._exit(0)


if __name__ == "__main__":
    main()
