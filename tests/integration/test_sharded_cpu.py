"""A 2-rank FSDP2 trainer (two real processes, torch.distributed gloo, ``fully_shard`` per
decoder layer and at the root) syncs a Qwen2-shaped model into the session's two real vLLM CPU
engines through ``ShardedSync``: the engines then generate what HF generates with the same
(unsharded) weights, and each rank held about a bucket of gathered tensors at a time."""

from __future__ import annotations

import logging

import pytest
import ray

from tests.integration.api_server import assert_parity
from tests.unit.test_sharded_protocol import run_ranks
from weightsync.config import TransferConfig
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
    assert r0["rc"] == 0 and r1["rc"] == 0, (r0["log"], r1["log"])
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
    coord = SyncCoordinator(fleet, TransferConfig(bucket_bytes=1 << 20))
    coord.reload_checkpoint(None)  # leave the session's engines on the original weights


def test_rolling_waves_gather_the_shards_again_for_each_wave(fleet, tiny_model, tokenizer,
                                                             tmp_path):
    """One engine at a time: each wave reads every bucket again, and every rank gathers again
    with the sender."""
    reports = _run(tmp_path, tiny_model, SEED + 1, "--wave-size", "1")
    r0, r1 = reports[0], reports[1]
    assert r0["rc"] == 0 and r1["rc"] == 0, (r0["log"], r1["log"])
    (sync,) = r0["syncs"]
    assert sync["ok"] and sync["sums_match_unsharded"]
    assert r1["syncs"][0]["result"] == sync["result"]
    _assert_engines_serve(fleet, tiny_model, tokenizer, SEED + 1, sync["version"])
    SyncCoordinator(fleet, TransferConfig(bucket_bytes=1 << 20)).reload_checkpoint(None)
