"""A 2-rank FSDP2 trainer (two real processes, torch.distributed gloo, ``fully_shard`` on CPU)
syncing through ``ShardedSync`` into the in-process fleet (real engine hosts, loopback leg):
the gathered bytes, the lockstep across syncs (one of them in the kernel layout), and a rank
killed mid-sync on either side; and a 3-rank one whose follower hangs mid-sync (SIGSTOP). The
real-vLLM version is ``tests/integration/test_sharded_cpu.py``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from weightsync.testing.fleet import save_tiny_model
from weightsync.testing.sharded_trainer import join_group, new_rendezvous


def _teardown() -> None:
    """End a spawned rank once its results are written. gloo's teardown at interpreter exit
    sometimes aborts the process ('terminate called without an active exception', 1 run in
    ~15 here, after the results were written), which ``mp.spawn`` reports as a failure: meet,
    destroy the groups, and leave without the interpreter's own teardown."""
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(out: Path, common: list[str], per_rank: dict[int, list[str]] | None = None,
              world: int = 2, timeout: float = 240) -> dict[int, dict]:
    """Start one ``sharded_trainer`` process per rank; their reports (a rank killed has none)
    and return codes."""
    rendezvous = new_rendezvous(out)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {r: subprocess.Popen(
        [sys.executable, "-m", "weightsync.testing.sharded_trainer", str(r), str(world),
         str(rendezvous), str(out), *common, *(per_rank or {}).get(r, [])],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(world)}
    reports = {}
    for r, p in procs.items():
        log, _ = p.communicate(timeout=timeout)
        f = out / f"rank{r}.json"
        reports[r] = {"rc": p.returncode, "log": log[-3000:],
                      **(json.loads(f.read_text()) if f.exists() else {})}
    return reports


def logs(reports: dict[int, dict]) -> str:
    """Every rank's exit code and log tail, whole (a tuple of logs as an assertion message is
    cut to a line, which hid which rank failed first)."""
    return "\n".join(f"--- rank {r} (rc {rep['rc']}):\n{rep['log']}" for r, rep in reports.items())


@pytest.fixture(scope="module")
def fleet_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tinyfleet"))


def _common(fleet_dir, *extra) -> list[str]:
    return ["--local-fleet", str(fleet_dir), "--engines", "a,b", "--bucket-bytes", "65536",
            "--timeout", "20", *extra]


def test_two_ranks_send_the_unsharded_models_bytes_and_agree_on_every_result(fleet_dir,
                                                                              tmp_path):
    reports = run_ranks(tmp_path, _common(fleet_dir, "--syncs", "2"))
    r0, r1 = reports[0], reports[1]
    assert r0["rc"] == 0 and r1["rc"] == 0, logs(reports)
    assert [s["ok"] for s in r0["syncs"]] == [True, True]
    assert all(s["sums_match_unsharded"] for s in r0["syncs"])
    # the second sync ran in the engines' kernel layout: the followers gathered in its order
    assert [s["result"]["layout"] for s in r0["syncs"]] == ["checkpoint", "kernel"]
    assert [s["result"] for s in r1["syncs"]] == [s["result"] for s in r0["syncs"]]
    assert {(s["state"], s["version"]) for s in r0["statuses"]} == {("serving", 2)}
    assert all(s["peak_gathered_bytes"] > 0 for r in (r0, r1) for s in r["syncs"])


def test_a_follower_killed_mid_sync_fails_it_and_the_fleet_keeps_its_version(fleet_dir,
                                                                           tmp_path):
    reports = run_ranks(tmp_path, _common(fleet_dir), {1: ["--die-at-gather", "1"]})
    r0, r1 = reports[0], reports[1]
    assert r1["rc"] == -9 and "syncs" not in r1
    assert r0["rc"] == 0, logs(reports)
    (sync,) = r0["syncs"]
    assert not sync["ok"] and sync["error"] == "SyncFailedError"
    engines = sync["result"]["engines"]
    assert all("rolled back" in e["error"] and "weight source failed" in e["error"]
               for e in engines)
    assert {(s["state"], s["version"]) for s in r0["statuses"]} == {("serving", 0)}


def test_the_sender_killed_mid_sync_fails_it_on_the_other_rank(fleet_dir, tmp_path):
    reports = run_ranks(tmp_path, _common(fleet_dir), {0: ["--die-at-gather", "1"]})
    r0, r1 = reports[0], reports[1]
    assert r0["rc"] == -9
    assert r1["rc"] == 0, logs(reports)
    (sync,) = r1["syncs"]
    assert not sync["ok"] and sync["error"] == "TransferError"
    assert sync["message"].startswith("rank 1")


@pytest.mark.parametrize("stop_at_gather, silent_in, error", [
    # mid-transfer: the engines roll back; woken, rank 1's own send fails (TransferError)
    (1, "no shards of this bucket", "SyncFailedError"),
    # the plan never reached it: no engine was touched (the coordinator feeds before it
    # begins); woken, rank 1 finds its link closed
    (0, "no receipt of the sender's control message", "TransferError"),
])
def test_a_follower_that_hangs_fails_the_sync_on_every_rank_within_the_deadline(
        fleet_dir, tmp_path, stop_at_gather, silent_in, error):
    """Rank 1 of 3 stops (SIGSTOP) before sending its shards of bucket 0, or before it joins
    the sync at all: rank 0 and rank 2 fail the sync naming it within about the 2 s deadline,
    the fleet keeps version 0; resumed, rank 1 raises; a rebuilt ``ShardedSync`` syncs. The
    real-vLLM version is in ``tests/integration/test_sharded_cpu.py``."""
    from tests.integration import hung_follower

    deadline = 2.0
    procs = hung_follower.start_ranks(tmp_path, deadline, 65536, 4242,
                                      ["--local-fleet", str(fleet_dir)], stop_at_gather)
    try:
        r0 = hung_follower.report(tmp_path / "sync1-0.json", procs, 120)
        r2 = hung_follower.report(tmp_path / "sync1-2.json", procs, 30)
        assert hung_follower.stopped(procs[1].pid)
    finally:
        hung_follower.resume(procs)
    r1, second = hung_follower.finish(tmp_path, procs, 120)
    hung_for = r0["ended_at"] - json.loads((tmp_path / "stopped-1.json").read_text())
    assert not r0["ok"] and r0["error"] == error, r0
    assert f"rank(s) [1] went silent: {silent_in}" in r0["message"], r0["message"]
    assert hung_for < 2 * deadline + 10
    assert r2["error"] == error and r2["message"] == r0["message"]
    assert {(s["state"], s["version"]) for s in r0["statuses"]} == {("serving", 0)}
    assert r1["error"] == "TransferError" and r1["message"].startswith("rank 1"), r1
    assert all(r["broken"] for r in (r0, r1, r2))
    assert all("broken" in s["refused"]["message"] for s in second)
    assert all(s["ok"] and s["result"] == second[0]["result"] for s in second)
    assert second[0]["sums_match_unsharded"]
    assert second[0]["version"] > 0  # the failed sync's version is never reused
    assert {(s["state"], s["version"]) for s in second[0]["statuses"]} == \
        {("serving", second[0]["version"])}


def _gather_rank(rank: int, world: int, rendezvous: str, out: str) -> None:
    """One rank: FSDP2-shard a module of awkward shapes, gather it with ``ShardGather`` in
    two calls (two buckets), and on the sender compare with ``full_tensor()``."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from weightsync.errors import ConfigError
    from weightsync.sources import as_source
    from weightsync.sources.base import whole
    from weightsync.sources.sharded import ShardGather

    join_group(rank, world, rendezvous, 60)
    torch.manual_seed(0)
    m = torch.nn.Module()
    for name, shape in [("odd", (7, 3)), ("one", (1, 5)), ("vec", (5,)), ("big", (64, 33))]:
        m.register_parameter(name, torch.nn.Parameter(torch.randn(*shape)))
    m.register_parameter("fp16", torch.nn.Parameter(torch.randn(4, 6).to(torch.float16)))
    m.register_buffer("steps", torch.arange(6))
    fully_shard(m, mesh=init_device_mesh("cpu", (world,)))
    named = {**dict(m.named_parameters()), "steps": m.steps}
    try:  # a sharded module handed to a plain sync is refused, naming a sharded tensor
        as_source(m)
        refused = ""
    except ConfigError as e:
        refused = str(e)
    gather = ShardGather(src=0)
    got, sent = {}, []
    for names in (["odd", "one", "steps"], ["one"], ["vec", "big", "fp16"]):  # ["one"]:
        # rank 1 holds no row of that bucket, so sends nothing
        out_, nbytes = gather(named, names)
        got.update(out_)
        sent.append(nbytes)
    fulls = {n: t.full_tensor() if hasattr(t, "full_tensor") else t  # a collective: all ranks
             for n, t in named.items()}
    ok = True
    if rank == 0:
        for n, full in fulls.items():
            ok &= torch.equal(whole(got[n]), full)
    else:
        ok = all(v is None for v in got.values())
    Path(out, f"gather{rank}.json").write_text(json.dumps({"ok": bool(ok), "bytes": sent,
                                                           "refused": refused}))
    _teardown()


def test_shard_gather_reassembles_uneven_blocks_on_the_sender_only(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_gather_rank, args=(2, str(new_rendezvous(tmp_path)), str(tmp_path)), nprocs=2,
             join=True)
    r0, r1 = (json.loads((tmp_path / f"gather{r}.json").read_text()) for r in (0, 1))
    assert r0["ok"] and r1["ok"]
    assert "odd is sharded (a DTensor)" in r0["refused"] and "ShardedSync" in r0["refused"]
    assert r0["bytes"][1] == r1["bytes"][1] == 0  # nothing moved for the one-row bucket
    assert all(b > 0 for b in r0["bytes"][::2] + r1["bytes"][::2])


def _moe_rank(rank: int, world: int, rendezvous: str, out: str) -> None:
    """One rank of an FSDP2-sharded Qwen3-MoE (fused experts sharded over the expert dim): its
    sharded source, read bucket by bucket on both ranks, gives the sender exactly what
    ``save_pretrained`` writes for the unsharded model."""
    import torch
    from safetensors.torch import load_file
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import Qwen3MoeForCausalLM

    from weightsync.sources.sharded import ShardedSource, ShardGather
    from weightsync.transport.packing import pack_bucket, plan_buckets

    join_group(rank, world, rendezvous, 60)
    model = Qwen3MoeForCausalLM.from_pretrained(out, dtype=torch.float32)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    source = ShardedSource(model, ShardGather(0))
    plan = plan_buckets(source.specs(), 1 << 16, 1)
    feed = source.feed(plan)
    got = {}
    for b in plan.buckets:
        if rank == 0:
            pack_bucket(b, feed, "cpu")
            got.update({s.name: feed[s.name].clone() for s in b.slots})
        else:
            feed.load(b.index)
    ok = True
    if rank == 0:
        saved = load_file(str(Path(out, "model.safetensors")))
        ok = set(got) == set(saved) and all(torch.equal(got[n], saved[n]) for n in saved)
    Path(out, f"moe{rank}.json").write_text(json.dumps({
        "ok": bool(ok), "buckets": len(plan.buckets), "peak": source.peak_gathered_bytes}))
    _teardown()


def test_sharded_moe_feeds_the_names_and_bytes_save_pretrained_writes(tmp_path):
    import torch.multiprocessing as mp

    from weightsync.testing.models import build_moe_model

    path = build_moe_model(tmp_path / "moe")
    mp.spawn(_moe_rank, args=(2, str(new_rendezvous(tmp_path)), str(path)), nprocs=2, join=True)
    r0, r1 = (json.loads((path / f"moe{r}.json").read_text()) for r in (0, 1))
    assert r0["ok"] and r1["ok"] and r0["buckets"] > 4
