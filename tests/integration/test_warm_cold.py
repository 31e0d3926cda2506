"""Warm == cold: after syncs and reloads, an engine computes exactly what a cold engine with the
same spec, started from ``save_pretrained`` of the same weights, computes.

"Verified" used to prove the transport (checksums, fingerprints of the parameters) and not what
the engine serves: a tied head on vLLM's CPU backend kept its packed GEMM copy of the old
embedding after a verified sync. The oracle here is a cold engine, compared bit for bit
(tokens and logprobs of a fixed batch of greedy requests), never "close to HF". One cold engine
per model serves as the oracle of every warm state that has its weights.
"""

from __future__ import annotations

import pytest
import ray
import torch

from tests.integration.oracle import (
    assert_same,
    assert_same_tensors,
    cold,
    cold_with_tensors,
    save_weights,
    served,
)
from weightsync.config import EngineSpec, TransferConfig
from weightsync.coordinator import SyncCoordinator
from weightsync.engine.actor import start_engines, stop_engines
from weightsync.errors import SyncFailedError
from weightsync.testing.models import build_text_model
from weightsync.testing.reference import load_trainer_model, perturb_
from weightsync.types import EngineState

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    return build_text_model(tmp_path_factory.mktemp("models") / "tiny-tied",
                            tie_word_embeddings=True, seed=3)


@pytest.fixture(scope="module")
def tied_spec(tied_dir) -> EngineSpec:
    return EngineSpec(name="tied-a", model=str(tied_dir), dtype="float32")


@pytest.fixture(scope="module")
def tied_started(ray_session, tied_spec):
    """The tied engine, and what it serves before anything is loaded into it: a cold engine's
    answers on ``tied_dir``'s weights (it was started from them), the oracle of any state
    that restores those weights, without starting another engine."""
    actors = start_engines([tied_spec])
    first = served(actors[0])
    yield actors[0], first
    stop_engines(actors, timeout_s=30)


@pytest.fixture(scope="module")
def tied_engine(tied_started):
    return tied_started[0]


def test_tied_head_warm_equals_cold_after_sync_and_checkpoint_reload(tied_engine, tied_spec,
                                                                     tied_dir, tmp_path):
    """A Qwen2-style model with tied embeddings (Qwen2.5-0.5B..3B, Qwen3-0.6B..4B, Llama-3.2
    1B/3B): a sync, a second sync, then a reload of the first sync's weights from disk."""
    policy = load_trainer_model(tied_dir)
    assert policy.lm_head.weight.data_ptr() == policy.model.embed_tokens.weight.data_ptr()
    coord = SyncCoordinator([tied_engine], TransferConfig(bucket_bytes=1 << 20))
    before = served(tied_engine)
    perturb_(policy, scale=0.3, seed=5)
    res = coord.sync(policy)
    assert res.ok and all(e.checksum_ok for e in res.engines)
    warm_v1 = served(tied_engine)
    assert [w[0] for w in warm_v1] != [b[0] for b in before]  # the weights did change
    v1_dir = save_weights(policy, tmp_path / "v1", tied_dir)
    oracle, oracle_tensors = cold_with_tensors(tied_spec, v1_dir)
    assert_same(warm_v1, oracle, "tied head after a sync")
    # below the outputs: every tensor the kernels read. The head's packed copy is not among
    # them: vLLM's CPU GEMM keeps it in a oneDNN handle (``TensorDigests.opaque``), so only
    # the outputs above show it (checked: with the tie rebuild broken, the tensors agree and
    # the outputs are 3.6-4.0 apart)
    assert_same_tensors(tied_engine, oracle_tensors, "tied head after a sync")
    # a second sync, then the first sync's weights back from disk
    perturb_(policy, scale=0.3, seed=6)
    assert coord.sync(policy).ok
    assert served(tied_engine) != oracle
    res = coord.reload_checkpoint(str(v1_dir))
    assert res.ok
    assert_same(served(tied_engine), oracle, "tied head after reload_checkpoint")
    assert_same_tensors(tied_engine, oracle_tensors, "tied head after reload_checkpoint")
    # what the sync rebuilt is said, not hidden
    assert any("lm_head" in note for e in res.engines for note in e.rebuilt), res.engines
    coord.close()


def test_untied_rolling_then_streamed_partial_update_warm_equals_cold(fleet, policy, tiny_model,
                                                                     tmp_path):
    """The session's two untied engines: a full sync in rolling waves of one engine, then a
    partial update (the MLP weights only) from a stream; both engines then serve exactly
    what one cold engine on the resulting weights serves."""
    from weightsync.sources import IteratorSource
    from weightsync.transport.packing import spec_of

    spec = EngineSpec(name="engine-a", model=str(tiny_model), dtype="float32",
                      max_model_len=512, enforce_eager=True)  # the session fleet's spec
    coord = SyncCoordinator(fleet, TransferConfig(bucket_bytes=1 << 20))
    perturb_(policy, scale=0.2, seed=21)
    assert coord.sync(policy, wave_size=1).ok
    mlp = {n: p.detach().clone() + 0.05 for n, p in policy.named_parameters() if ".mlp." in n}
    stream = IteratorSource([spec_of(n, t) for n, t in mlp.items()], lambda: iter(mlp.items()))
    res = coord.sync(stream, partial=True)
    assert res.ok and res.partial and all(e.checksum_ok for e in res.engines)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if n in mlp:
                p.copy_(mlp[n])
    warm = [served(a) for a in fleet]
    oracle = cold(spec, save_weights(policy, tmp_path / "partial", tiny_model))
    for name, w in zip(("engine-a", "engine-b"), warm, strict=True):
        assert_same(w, oracle, f"{name} after a rolling sync and a streamed partial one")
    coord.close()


def test_a_partial_update_that_splits_a_fused_layer_is_refused_and_nothing_changes(
        fleet, policy, tiny_model, tmp_path):
    """``q_proj`` alone is a third of vLLM's fused ``qkv_proj``. Before this check, such a
    sync reported ok, checksums and all, yet the engine then served something other than a
    cold engine on the resulting weights: vLLM rebuilt the layer from a fresh tensor and
    left k and v uninitialized. (Whole layers, q/k/v with their biases, matched the cold
    engine.) Now the sync, and a partial checkpoint reload of the same tensor, are refused
    before any engine is touched."""
    from safetensors.torch import save_file

    from weightsync.errors import ManifestError

    q = "model.layers.0.self_attn.q_proj.weight"
    before = [served(a) for a in fleet]
    coord = SyncCoordinator(fleet, TransferConfig(bucket_bytes=1 << 20))
    try:
        new_q = policy.get_parameter(q).detach().clone() + 0.05
        with pytest.raises(ManifestError, match="whole layers.*qkv_proj also needs"):
            coord.sync({q: new_q}, partial=True)
        (tmp_path / "q-only").mkdir()
        save_file({q: new_q.contiguous()}, str(tmp_path / "q-only" / "model.safetensors"))
        with pytest.raises(ManifestError, match="whole layers"):
            coord.reload_checkpoint(str(tmp_path / "q-only"), partial=True)
        states = coord.statuses()
        assert all(s.state == EngineState.SERVING for s in states), states
    finally:
        coord.close()
    assert [served(a) for a in fleet] == before


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_non_finite_sync_is_refused_and_nothing_changes(tied_engine, tied_dir, bad):
    """A diverged trainer's weights never go live: refused on the engine, in the pass that
    checksums them, with the tensor named; the engine keeps serving its version."""
    policy = load_trainer_model(tied_dir)
    coord = SyncCoordinator([tied_engine], TransferConfig(bucket_bytes=1 << 20))
    before, v0 = served(tied_engine), ray.get(tied_engine.status.remote()).version
    with torch.no_grad():
        policy.model.layers[1].mlp.down_proj.weight[3, 7] = float(bad)
    with pytest.raises(SyncFailedError) as e:
        coord.sync(policy)
    msg = " ".join(str(x.error) for x in e.value.result.engines)
    assert "non-finite" in msg and "model.layers.1.mlp.down_proj.weight" in msg, msg
    st = ray.get(tied_engine.status.remote())
    assert st.state == EngineState.SERVING and st.version == v0
    assert served(tied_engine) == before
    coord.close()


def test_a_canary_passes_on_the_senders_weights_and_fences_an_engine_that_misses_it(
        tied_engine, tied_dir):
    """The end-to-end canary (``types.Canary``): the trainer's logprobs of a short sequence,
    checked on the engine after the load and before the commit. A reference computed from
    other weights than those sent is missed: that engine is fenced, and a resync recovers."""
    from transformers import AutoTokenizer

    from weightsync.canary import reference

    ids = AutoTokenizer.from_pretrained(tied_dir)("the quick brown fox jumps over").input_ids
    policy = load_trainer_model(tied_dir)
    coord = SyncCoordinator([tied_engine], TransferConfig(bucket_bytes=1 << 20))
    perturb_(policy, scale=0.2, seed=31)
    good = reference(policy, ids, tolerance=1e-4)
    res = coord.sync(policy, canary=good)
    (rep,) = res.engines
    assert res.ok and any(s.startswith("canary: largest gap") for s in rep.skipped), rep
    perturb_(policy, scale=0.2, seed=32)  # the reference is now of other weights
    with pytest.raises(SyncFailedError) as e:
        coord.sync(policy, canary=good)
    (rep,) = e.value.result.engines
    assert rep.fenced and "canary" in rep.error, rep
    assert ray.get(tied_engine.status.remote()).state == EngineState.FENCED
    try:
        res = coord.sync(policy, canary=reference(policy, ids, tolerance=1e-4))  # a resync
    except SyncFailedError as err:
        raise AssertionError(err.result.engines) from err
    assert res.ok and ray.get(tied_engine.status.remote()).state == EngineState.SERVING
    coord.close()


def test_a_nan_checkpoint_is_refused_and_nothing_changes(tied_engine, tied_dir, tmp_path):
    from weightsync.errors import VerificationError

    policy = load_trainer_model(tied_dir)
    with torch.no_grad():
        policy.model.layers[0].self_attn.q_proj.weight[1, 2] = float("nan")
    bad = save_weights(policy, tmp_path / "nan", tied_dir)
    coord = SyncCoordinator([tied_engine], TransferConfig(bucket_bytes=1 << 20))
    before, v0 = served(tied_engine), ray.get(tied_engine.status.remote()).version
    with pytest.raises(VerificationError, match="model.layers.0.self_attn.q_proj.weight"):
        coord.reload_checkpoint(str(bad))
    st = ray.get(tied_engine.status.remote())
    assert (st.state, st.version) == (EngineState.SERVING, v0)
    assert served(tied_engine) == before
    coord.close()


def test_an_unchecked_nan_version_then_a_restore_serves_cold_outputs_from_the_first_request(
        tied_started, tied_dir):
    """With the finite check turned off, NaN weights go live and their requests write NaN
    into KV-cache blocks; the restore's commit zeroes the KV cache, so the very first
    requests after it equal a cold engine's on the restored weights."""
    tied_engine, oracle = tied_started  # the original weights, cold (the engine's first answers)
    policy = load_trainer_model(tied_dir)
    with torch.no_grad():
        policy.model.layers[1].mlp.up_proj.weight.fill_(float("nan"))
    unchecked = SyncCoordinator([tied_engine], TransferConfig(bucket_bytes=1 << 20,
                                                              check_finite=False))
    assert unchecked.sync(policy).ok
    poisoned = served(tied_engine)  # the NaN version serves, and writes KV blocks
    assert any(x != x for _, lps in poisoned for x in lps)
    unchecked.close()
    coord = SyncCoordinator([tied_engine], TransferConfig(bucket_bytes=1 << 20))
    res = coord.reload_checkpoint(None)  # restore the original weights
    assert res.ok and "scrub_kv" in res.engines[0].seconds, res.engines[0].seconds
    assert_same(served(tied_engine), oracle, "the first requests after a NaN version")
    coord.close()
