"""A 2-rank FSDP2 trainer (two real processes, torch.distributed gloo, ``fully_shard`` per
decoder layer and at the root) syncs a Qwen2-shaped model into the session's two real vLLM CPU
engines through ``ShardedSync``: the engines then generate what HF generates with the same
(unsharded) weights, and each rank held about a bucket of gathered tensors at a time. A
3-rank trainer whose follower hangs mid-sync (SIGSTOP) fails the sync within the per-bucket
deadline, the engines keep serving their old version, and a rebuilt ``ShardedSync`` syncs."""

from __future__ import annotations

import json
import logging

import pytest
import ray

from tests.integration import hung_follower
from tests.integration.api_server import assert_parity, outputs
from tests.integration.oracle import assert_same, cold, save_weights, served
from tests.unit.test_sharded_protocol import logs, run_ranks
from weightsync.config import EngineSpec, TransferConfig
from weightsync.coordinator import SyncCoordinator
from weightsync.testing.reference import load_trainer_model, perturb_

pytestmark = pytest.mark.integration
logger = logging.getLogger(__name__)
SEED = 5151
BUCKET = 256 << 10


def _run(tmp_path, tiny_model, seed: int, *extra: str) -> dict[int, dict]:
    return run_ranks(tmp_path, [
        "--model", str(tiny_model), "--ray", ray.get_runtime_context().gcs_address,
        "--namespace", "weightsync-tests", "--engines", "engine-a,engine-b",
        "--bucket-bytes", str(BUCKET), "--seed", str(seed), "--timeout", "90", *extra],
        timeout=400)


def _assert_engines_serve(fleet, tiny_model, tokenizer, seed: int, version: int) -> None:
    policy = load_trainer_model(tiny_model)
    perturb_(policy, scale=0.3, seed=seed)  # what every rank held, unsharded
    assert_parity(fleet, policy, tokenizer, version)


def test_two_fsdp2_ranks_sync_into_two_vllm_engines_that_match_hf(fleet, tiny_model, tokenizer,
                                                                  tmp_path):
    reports = _run(tmp_path, tiny_model, SEED, "--syncs", "2")
    r0, r1 = reports[0], reports[1]
    assert r0["rc"] == 0 and r1["rc"] == 0, logs(reports)
    assert [s["ok"] for s in r0["syncs"]] == [True, True]
    assert all(s["sums_match_unsharded"] for s in r0["syncs"])  # the unsharded model's bytes
    assert [s["result"] for s in r1["syncs"]] == [s["result"] for s in r0["syncs"]]
    last = r0["syncs"][-1]["result"]
    assert all(e["ok"] and e["checksum_ok"] for e in last["engines"])
    assert len(last["sender_checksums"]) > 4  # several buckets, gathered one at a time
    for r in (r0, r1):
        for i, s in enumerate(r["syncs"]):
            logger.warning("rank %d sync %d: %.2f s, peak gathered %d B, peak RSS +%d B "
                           "(bucket %d B)", r["rank"], i, s["seconds"], s["peak_gathered_bytes"],
                           s["rss_peak_extra"], BUCKET)
            # counted, not timed: gather buffers of at most a bucket (each rank's share)
            assert 0 < s["peak_gathered_bytes"] <= BUCKET

    _assert_engines_serve(fleet, tiny_model, tokenizer, SEED, last["version"])
    # warm == cold: what the FSDP2 ranks synced is what a cold engine on the unsharded
    # weights serves, bit for bit
    policy = load_trainer_model(tiny_model)
    perturb_(policy, scale=0.3, seed=SEED)
    spec = EngineSpec(name="engine-a", model=str(tiny_model), dtype="float32",
                      max_model_len=512, enforce_eager=True)  # the session fleet's spec
    ckpt = save_weights(policy, tmp_path / "unsharded", tiny_model)
    assert_same(served(fleet[0]), cold(spec, ckpt), "after a 2-rank FSDP2 sync")
    coord = SyncCoordinator(fleet, TransferConfig(bucket_bytes=1 << 20))
    coord.reload_checkpoint(None)  # leave the session's engines on the original weights


def test_rolling_waves_gather_the_shards_again_for_each_wave(fleet, tiny_model, tokenizer,
                                                             tmp_path):
    """One engine at a time: each wave reads every bucket again, and every rank gathers again
    with the sender."""
    reports = _run(tmp_path, tiny_model, SEED + 1, "--wave-size", "1")
    r0, r1 = reports[0], reports[1]
    assert r0["rc"] == 0 and r1["rc"] == 0, logs(reports)
    (sync,) = r0["syncs"]
    assert sync["ok"] and sync["sums_match_unsharded"]
    assert r1["syncs"][0]["result"] == sync["result"]
    _assert_engines_serve(fleet, tiny_model, tokenizer, SEED + 1, sync["version"])
    SyncCoordinator(fleet, TransferConfig(bucket_bytes=1 << 20)).reload_checkpoint(None)


HANG_DEADLINE_S = 4.0  # the coordinator's per-bucket deadline (deadlines.transfer)


def test_a_follower_that_hangs_fails_the_sync_within_the_deadline_and_a_rebuilt_sync_works(
        fleet, tiny_model, tokenizer, tmp_path):
    """Rank 1 of 3 SIGSTOPs itself before sending its shards of bucket 1. Rank 0 (and the
    healthy rank 2) fail the sync naming rank 1 within about the deadline, not the trainer
    group's timeout (180 s here); the engines serve their old version with unchanged output.
    Resumed, rank 1 raises too; every rank's spent ``ShardedSync`` refuses to sync again; a new
    one syncs the engines to the trainer's weights."""
    before = [[o.token_ids for o in outputs(a)] for a in fleet]
    v0 = {s.name: s.version for s in ray.get([a.status.remote() for a in fleet])}
    procs = hung_follower.start_ranks(
        tmp_path, HANG_DEADLINE_S, BUCKET, SEED + 2,
        ["--model", str(tiny_model), "--ray", ray.get_runtime_context().gcs_address],
        stop_at_gather=2)
    failed = True  # until the first sync's checks pass: then the ranks go on to a second sync
    try:
        r0 = hung_follower.report(tmp_path / "sync1-0.json", procs, 300)
        r2 = hung_follower.report(tmp_path / "sync1-2.json", procs, 30)
        assert hung_follower.stopped(procs[1].pid)  # still hung: the others did not wait for it
        hung_for = r0["ended_at"] - json.loads((tmp_path / "stopped-1.json").read_text())
        logger.warning("rank 0's sync failed after %.2f s, %.2f s after rank 1 stopped "
                       "(deadline %.1f s): %s", r0["seconds"], hung_for, HANG_DEADLINE_S,
                       r0.get("message"))
        assert not r0["ok"] and r0["error"] == "SyncFailedError", r0
        assert "rank(s) [1] went silent" in r0["message"]
        if hung_for >= 2 * HANG_DEADLINE_S + 10:  # not the trainer group's 180 s
            failed = True  # the ranks' logs say where the time went
            hung_follower.kill(procs)
            pytest.fail(f"rank 0 failed {hung_for:.2f} s after rank 1 stopped; rank 0's log:\n"
                        f"{procs[0].communicate(timeout=30)[0][-6000:]}")
        assert all("rolled back" in e["error"] for e in r0["result"]["engines"])
        assert r2["error"] == "SyncFailedError" and r2["message"] == r0["message"]
        assert r0["broken"] and r2["broken"]
        statuses = ray.get([a.status.remote() for a in fleet])
        assert {s.name: s.version for s in statuses} == v0
        assert all(s.state.value == "serving" for s in statuses)
        assert [[o.token_ids for o in outputs(a)] for a in fleet] == before  # old weights
        failed = False
    finally:
        if failed:  # no second sync from ranks nobody checks any more, into the next test
            hung_follower.kill(procs)
        hung_follower.resume(procs)
    r1, second = hung_follower.finish(tmp_path, procs, 300)
    logger.warning("rank 1 resumed: %s after %.2f s: %s", r1.get("error"), r1["seconds"],
                   r1.get("message"))
    assert not r1["ok"] and r1["error"] == "TransferError" and r1["broken"], r1
    for s in second:  # the spent object refused at once; the rebuilt one synced
        assert s["refused"]["error"] == "TransferError" and "broken" in s["refused"]["message"]
        assert s["refused"]["seconds"] < 1
        assert s["ok"] and s["result"] == second[0]["result"], s
    assert second[0]["sums_match_unsharded"]
    assert second[0]["version"] > max(v0.values())
    _assert_engines_serve(fleet, tiny_model, tokenizer, SEED + 2, second[0]["version"])
    SyncCoordinator(fleet, TransferConfig(bucket_bytes=1 << 20)).reload_checkpoint(None)
