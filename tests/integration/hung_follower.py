"""One rank of a 3-rank FSDP2 trainer whose rank 1 hangs mid-sync (run by
``tests/integration/test_sharded_cpu.py``; one process per rank):

    python -m tests.integration.hung_follower RANK WORLD PORT OUT_DIR DEADLINE BUCKET_BYTES \
        SEED (--model DIR --ray GCS | --local-fleet DIR) [--stop-at-gather K]

``--ray``: the session's two vLLM engines; ``--local-fleet``: the in-process fleet (loopback leg,
``tests/unit/test_sharded_protocol.py``).

Sync 1: ``--stop-at-gather K`` makes this rank SIGSTOP itself on its K-th bucket gather, after
the sender announced the bucket and before this rank sends its shards (alive but stuck; K = 0:
before it calls ``sync``, so it takes no message of the sync at all); the test SIGCONTs it
later. Each rank writes ``sync1-RANK.json`` (outcome and wall time) as soon as
its sync 1 ends, then asks the spent ``ShardedSync`` for another sync (it must refuse at once),
builds a new one (a collective: it waits for the hung rank to be resumed) and syncs again
(``sync2-RANK.json``). The coordinator's per-bucket deadline (``deadlines.transfer``) is
``DEADLINE``; ``ShardedSync`` is given no ``gather_timeout_s``, so it uses that.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from weightsync.testing.sharded_trainer import new_rendezvous

HUNG_RANK = 1


def start_ranks(out: Path, deadline_s: float, bucket_bytes: int, seed: int, engines: list[str],
                stop_at_gather: int, world: int = 3) -> dict[int, subprocess.Popen]:
    """One process per rank; rank ``HUNG_RANK`` stops itself at its ``stop_at_gather``-th
    gather (0: before its first sync). ``engines``: ``--model DIR --ray GCS`` or
    ``--local-fleet DIR``."""
    rendezvous = new_rendezvous(out)
    root = str(Path(__file__).parents[2])
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    return {r: subprocess.Popen(
        [sys.executable, "-m", "tests.integration.hung_follower", str(r), str(world),
         str(rendezvous), str(out), str(deadline_s), str(bucket_bytes), str(seed), *engines,
         *(["--stop-at-gather", str(stop_at_gather)] if r == HUNG_RANK else [])],
        cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(world)}


def report(path: Path, procs: dict[int, subprocess.Popen], timeout: float) -> dict:
    """The report at ``path`` once written, failing if a rank exits or ``timeout`` passes."""
    end = time.monotonic() + timeout
    while not path.exists():
        dead = {r: p.returncode for r, p in procs.items() if p.poll() is not None}
        assert not dead and time.monotonic() < end, (path.name, dead)
        time.sleep(0.2)
    time.sleep(0.1)  # a few hundred bytes, written in one call
    return json.loads(path.read_text())


def stopped(pid: int) -> bool:
    """Whether the process is stopped (SIGSTOP): its state in /proc is T."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


def resume(procs: dict[int, subprocess.Popen]) -> None:
    if procs[HUNG_RANK].poll() is None:
        os.kill(procs[HUNG_RANK].pid, signal.SIGCONT)


def kill(procs: dict[int, subprocess.Popen]) -> None:
    for p in procs.values():
        if p.poll() is None:
            p.kill()


def finish(out: Path, procs: dict[int, subprocess.Popen], timeout: float
           ) -> tuple[dict, list[dict]]:
    """Resume the hung rank, wait for every rank; (its sync-1 report, every rank's sync 2)."""
    resume(procs)
    logs = {r: p.communicate(timeout=timeout)[0][-3000:] for r, p in procs.items()}
    assert all(p.returncode == 0 for p in procs.values()), logs
    hung = json.loads((out / f"sync1-{HUNG_RANK}.json").read_text())
    return hung, [json.loads((out / f"sync2-{r}.json").read_text()) for r in range(len(procs))]


def _outcome(sync, model, **kwargs) -> dict:
    from weightsync.testing.sharded_trainer import sync_outcome

    entry = sync_outcome(sync, model, **kwargs)
    entry["ended_at"] = time.time()
    return entry


def main() -> None:
    p = argparse.ArgumentParser()
    for name, kind in [("rank", int), ("world", int), ("rendezvous", Path), ("out", Path),
                       ("deadline", float), ("bucket_bytes", int), ("seed", int)]:
        p.add_argument(name, type=kind)
    p.add_argument("--model")
    p.add_argument("--ray")
    p.add_argument("--local-fleet")
    p.add_argument("--stop-at-gather", type=int, default=-1)
    args = p.parse_args()
    args.namespace = "weightsync-tests"
    args.engines = ["a", "b"] if args.local_fleet else ["engine-a", "engine-b"]

    import torch
    import torch.distributed as dist

    from weightsync.config import Deadlines, TransferConfig
    from weightsync.coordinator import SyncCoordinator
    from weightsync.sources import sharded
    from weightsync.testing.sharded_trainer import (
        _engines,
        _expected_sums,
        _model,
        _shard,
        join_group,
    )

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    model = _model(args)
    coord = None
    if args.rank == 0:
        def phase(name: str, engine: str | None) -> None:  # in the log, for a slow failure
            print(f"{time.time():.3f} rank 0: phase {name} {engine or ''}", flush=True)

        coord = SyncCoordinator(_engines(args), on_phase=phase, transfer=TransferConfig(
            bucket_bytes=args.bucket_bytes, deadlines=Deadlines(
                rendezvous=30, transfer=args.deadline, verify=30, resume=30, reload=30,
                lease=30)))
    join_group(args.rank, args.world, args.rendezvous, 180)
    model = _shard(model, args.world)
    syncer = sharded.ShardedSync(coord, timeout_s=120)

    def hang() -> None:
        print(f"rank {args.rank}: stopping at gather {args.stop_at_gather}", flush=True)
        (args.out / f"stopped-{args.rank}.json").write_text(json.dumps(time.time()))
        os.kill(os.getpid(), signal.SIGSTOP)
        print(f"rank {args.rank}: resumed", flush=True)

    if args.stop_at_gather > 0:
        gathers = {"n": 0}
        real = sharded.ShardGather.__call__

        def hanging(self, named, srcs):
            gathers["n"] += 1
            if gathers["n"] == args.stop_at_gather:
                hang()
            return real(self, named, srcs)

        sharded.ShardGather.__call__ = hanging  # this process only
    elif args.stop_at_gather == 0:
        hang()
    kwargs = {"leg": "loopback"} if args.local_fleet and args.rank == 0 else {}
    first = _outcome(syncer.sync, model, **kwargs)
    first["broken"] = getattr(syncer, "broken", None)
    if args.rank == 0:  # after the failed sync, before the hung rank is back
        first["statuses"] = [s.model_dump(mode="json") for s in coord.statuses()]
    (args.out / f"sync1-{args.rank}.json").write_text(json.dumps(first))
    refused = _outcome(syncer.sync, model, **kwargs)  # spent: refuses at once, sends nothing

    syncer = sharded.ShardedSync(coord, timeout_s=120)  # waits for every rank, the hung one too
    second = _outcome(syncer.sync, model, **kwargs)
    second["refused"] = refused
    if args.rank == 0:
        second["sums_match_unsharded"] = second.get("sums") == _expected_sums(args)
        second["statuses"] = [s.model_dump(mode="json") for s in coord.statuses()]
    (args.out / f"sync2-{args.rank}.json").write_text(json.dumps(second))
    if second["ok"]:
        dist.barrier()  # every rank is done talking before any leaves
    sys.stdout.flush()
    os._exit(0)  # the first sync's groups hold a closed pair: skip gloo's teardown of them


if __name__ == "__main__":
    main()
