"""The data path on real vLLM CPU engines in real Ray actors: parity, checksums, versions,
manifest rejection."""

from __future__ import annotations

import pytest
import ray
import torch

from tests.integration.api_server import assert_matches_hf as _assert_matches_hf
from weightsync.config import TransferConfig
from weightsync.coordinator import SyncCoordinator
from weightsync.errors import ManifestError
from weightsync.testing.reference import greedy, perturb_
from weightsync.types import EngineState

pytestmark = pytest.mark.integration
PROMPTS = ["hello world", "the quick brown fox", "one two three"]
N_TOK = 8


def _engine_outputs(actor):
    return ray.get(actor.generate.remote(PROMPTS, max_tokens=N_TOK, logprobs=True,
                                         ignore_eos=True), timeout=120)


@pytest.fixture(scope="module")
def coord(fleet):
    # small buckets so even the tiny model travels in several of them
    return SyncCoordinator(fleet, TransferConfig(bucket_bytes=1 << 20))


def test_sync_matches_hf_on_both_engines_and_changes_output(fleet, coord, policy, tokenizer):
    before = [_engine_outputs(a) for a in fleet]
    perturb_(policy, scale=0.3, seed=11)
    v0 = coord.version
    res = coord.sync(policy, sleep_level=1)
    assert res.ok and res.version == v0 + 1 and len(res.engines) == 2
    ref = greedy(policy, tokenizer, PROMPTS, N_TOK)
    for actor, old in zip(fleet, before, strict=True):
        outs = _engine_outputs(actor)
        _assert_matches_hf(outs, ref)
        assert all(o.version == res.version for o in outs)
        assert [o.token_ids for o in outs] != [o.token_ids for o in old]
    # one broadcast fed both engines: same bytes, same loaded weights
    assert len({e.fingerprint for e in res.engines}) == 1
    assert all("sleep mode is CUDA-only" in e.skipped[0] for e in res.engines)
    # vLLM's CPU backend repacks linear weights, so the kernel-layout fast path cannot apply:
    # the result says so and the checkpoint-format path was used
    assert res.layout == "checkpoint" and "repacked" in res.layout_note


def test_checksums_agree_and_version_increments_once_per_sync(fleet, coord, policy):
    # the highest version the fleet saw, which another test's coordinator may have moved
    # past this one's (the next sync is the one above it)
    start = max(s.version_seen for s in ray.get([a.status.remote() for a in fleet]))
    calls = dict(coord.access.inner.channel_calls())
    for i in range(2):
        perturb_(policy, seed=100 + i)
        res = coord.sync(policy)
        assert res.version == start + i + 1
        assert len(res.sender_checksums) > 1  # several buckets
        for e in res.engines:
            assert e.ok and e.checksum_ok is True and e.nbytes == res.nbytes
    versions = {s.version for s in ray.get([a.status.remote() for a in fleet])}
    assert versions == {start + 2}
    # every sync's receive went over each host's local channel (this process is on their
    # machine), not through Ray
    after = coord.access.inner.channel_calls()
    assert set(after) == {"engine-a", "engine-b"}
    assert all(after[n] - (calls.get(n) or 0) == 2 for n in after), (calls, after)


@pytest.mark.parametrize("breakage", ["unknown", "shape", "dtype"])
def test_bad_manifest_is_rejected_and_engines_keep_serving(fleet, coord, policy, breakage):
    before = [_engine_outputs(a) for a in fleet]
    v0 = coord.version
    sd = {n: p.detach().clone() for n, p in policy.named_parameters()}
    if breakage == "unknown":
        sd["model.layers.9.mlp.up_proj.weight"] = torch.zeros(4, 4)
    elif breakage == "shape":
        sd["model.norm.weight"] = torch.zeros(3)
    else:
        sd["model.norm.weight"] = sd["model.norm.weight"].to(torch.int32)
    with pytest.raises(ManifestError) as e:
        coord.sync(sd)
    assert {"unknown": "unknown parameter", "shape": "shape [3]", "dtype": "int32"}[breakage] in str(e.value)
    assert coord.version == v0
    for actor, old in zip(fleet, before, strict=True):
        st = ray.get(actor.status.remote())
        assert st.state == EngineState.SERVING and st.version == v0
        assert [o.token_ids for o in _engine_outputs(actor)] == [o.token_ids for o in old]


def test_chain_broadcast_feeds_both_engines_the_same_weights(fleet, policy, tokenizer):
    """broadcast="chain": the trainer sends to the first engine's worker, which forwards every
    chunk to the second. Both load the trainer's weights, bit for bit the same. (Last in this
    module: a second coordinator moves the engines' versions past the shared one's.)"""
    chain = SyncCoordinator(fleet, TransferConfig(bucket_bytes=1 << 20, broadcast="chain",
                                                  chain_chunk_bytes=256 << 10))
    try:
        perturb_(policy, scale=0.2, seed=77)
        res = chain.sync(policy)
        assert res.ok and len(res.sender_checksums) > 1
        assert all(e.checksum_ok is True for e in res.engines)
        assert len({e.fingerprint for e in res.engines}) == 1
        ref = greedy(policy, tokenizer, PROMPTS, N_TOK)
        for actor in fleet:
            _assert_matches_hf(_engine_outputs(actor), ref)
    finally:
        chain.close()


def test_a_prompt_prefix_cached_before_a_sync_is_never_served_after_it(fleet, coord, policy,
                                                                       tokenizer):
    """vLLM caches a long prompt's KV blocks (prefix caching is on for these CPU engines); a
    sync must leave none of them to the next request, or its logprobs come from old-weight KV.
    The sync clears them when it pauses, because a request ran since they were last cleared
    (and skips the post-load reset only because of that)."""
    long = " ".join(["weights move from the trainer into the engines"] * 12)
    actor = fleet[0]
    assert coord.sync(policy).ok  # caches known clean: only what runs next can fill them
    first = ray.get(actor.generate.remote([long, long], max_tokens=4, logprobs=True,
                                          ignore_eos=True), timeout=120)
    assert first[0].token_ids == first[1].token_ids  # the second request hit the cached prefix
    perturb_(policy, scale=0.3, seed=31)
    res = coord.sync(policy)
    assert any("reset_caches: vLLM cleared them" in s for s in res.engines[0].skipped)
    (out,) = ray.get(actor.generate.remote([long], max_tokens=4, logprobs=True,
                                           ignore_eos=True), timeout=120)
    _assert_matches_hf([out], greedy(policy, tokenizer, [long], 4))
