"""A wave of one engine that loads atomically commits in its receive call (one round trip
less): the engine verified every bucket against the sender's checksums, loaded and
fingerprinted, and with no other engine there is nothing left to agree on. Real coordinator,
hosts and workers; vLLM stood in for (``weightsync.testing.fleet``), the loopback leg. The IPC
leg asks for the same on the GPU (tests/gpu/test_colocated_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from weightsync.config import TransferConfig
from weightsync.coordination import attempt as attempt_mod
from weightsync.coordinator import SyncCoordinator
from weightsync.errors import SyncFailedError, VerificationError
from weightsync.testing.fleet import Faults, TinyModel
from weightsync.types import EngineState

S = EngineState


def _recording(engines) -> list[str]:
    """The host methods the coordinator calls, in order."""
    calls: list[str] = []
    start = engines.inner.start  # (every call's host method, as the transport carries it)

    def record(name, call):
        calls.append(call.method)
        return start(name, call)

    engines.inner.start = record
    return calls


@pytest.mark.parametrize("asleep", [False, True], ids=["serving", "asleep-level-2"])
def test_a_wave_of_one_commits_in_its_receive_call(local_fleet, asleep):
    engines = local_fleet(workers={"a": 1}, sleep_mode=True)
    coord = SyncCoordinator(engines, TransferConfig(bucket_bytes=1 << 16))
    if asleep:
        coord.sleep(2)
    calls = _recording(engines)
    new = TinyModel.seeded(1)
    res = coord.sync(new, leg="loopback")
    assert res.ok and res.version == 1
    assert "receive" in calls and "commit" not in calls and "finish_load" not in calls
    (st,) = coord.statuses()
    assert (st.state, st.version, st.owner) == (S.SERVING, 1, None)
    assert not engines.handles["a"].engine.paused  # vLLM's scheduler runs again
    want = {n: p.detach() for n, p in new.named_parameters()}
    assert all(torch.equal(engines.weights("a")[n], want[n]) for n in want)
    rep = res.engines[0]
    assert rep.fingerprint and rep.checksum_ok
    assert "total" in rep.seconds  # the commit's, reported as a separate commit's would be
    assert "transfer.commit" not in rep.seconds  # its time is not counted as the transfer's
    assert rep.seconds["transfer+reload"] <= res.seconds["total"] - rep.seconds.get(
        "wake_kv", 0.0)
    if asleep:  # the KV cache woke in the receive call; vLLM's wake resumed the scheduler
        assert "wake_kv" in rep.seconds and "resume" not in rep.seconds
        assert engines.handles["a"].engine.sleep_mode.calls == [
            ("sleep", 2), ("wake_up", ("weights",)), ("wake_up", ("kv_cache",))]
    else:
        assert "resume" in rep.seconds


def test_several_engines_or_workers_or_a_streaming_apply_commit_in_a_call_of_their_own(
        local_fleet):
    engines = local_fleet()  # a and b
    coord = SyncCoordinator(engines, TransferConfig(bucket_bytes=1 << 16))
    calls = _recording(engines)
    assert coord.sync(TinyModel.seeded(2), leg="loopback").ok
    assert calls.count("commit") == 2  # two engines: all-or-nothing needs the second phase
    assert calls.count("apply_staged") == 2
    tp = local_fleet(workers={"c": 2})  # a worker's check could fail while another loads
    coord = SyncCoordinator(tp, TransferConfig(bucket_bytes=1 << 16))
    calls = _recording(tp)
    assert coord.sync(TinyModel.seeded(3), leg="loopback").ok
    assert "apply_staged" in calls and "commit" in calls
    one = local_fleet(workers={"d": 1})  # streamed into the loader before any check
    coord = SyncCoordinator(one, TransferConfig(bucket_bytes=1 << 16, apply="streaming"))
    calls = _recording(one)
    assert coord.sync(TinyModel.seeded(4), leg="loopback").ok
    assert "commit" in calls


def test_a_bucket_that_fails_its_check_is_never_loaded_nor_committed(local_fleet):
    engines = local_fleet(workers={"a": 1}, a=Faults(corrupt_bucket=0))
    coord = SyncCoordinator(engines, TransferConfig(bucket_bytes=1 << 16))
    before = engines.weights("a")
    with pytest.raises(SyncFailedError) as e:
        coord.sync(TinyModel.seeded(4), leg="loopback")
    assert "checksum differs" in (e.value.result.engines[0].error or "")
    (st,) = coord.statuses()
    assert (st.state, st.version) == (S.SERVING, 0)  # its old weights, untouched
    assert all(torch.equal(engines.weights("a")[n], before[n]) for n in before)


def test_an_engine_that_committed_and_then_disagrees_with_the_coordinator_is_fenced(
        local_fleet, monkeypatch):
    """The engine checked the sender's checksums itself; should the coordinator's own check of
    its receipt still disagree, the engine that already serves the new version is fenced."""
    engines = local_fleet(workers={"a": 1})
    coord = SyncCoordinator(engines, TransferConfig(bucket_bytes=1 << 16))
    monkeypatch.setattr(attempt_mod, "verify_receipt", lambda receipt, sums, name: (
        VerificationError("checksums differ (forced)", engine=name), False))
    with pytest.raises(SyncFailedError):
        coord.sync(TinyModel.seeded(5), leg="loopback")
    (st,) = coord.statuses()
    assert st.state == S.FENCED and "forced" in st.fenced_reason


def test_a_kernel_layout_wave_of_one_copies_from_the_trainers_own_tensors(local_fleet):
    """Once the kernel layout is verified, a wave of one engine copies straight from the
    trainer's tensors (``ipc_direct``, as over CUDA IPC on a GPU): no packed copy; every piece
    is checksummed by the trainer, and by the engine as it copies it — what is verified is
    what was loaded. A trainer that writes its tensors during the sync therefore fails it,
    after the engine's parameters were overwritten: the engine is fenced (not serving what
    nobody verified) until the next sync, which goes through."""
    engines = local_fleet(workers={"a": 1})
    coord = SyncCoordinator(engines, TransferConfig(bucket_bytes=1 << 16, ipc_direct=True))
    assert coord.sync(TinyModel.seeded(1), leg="loopback").layout == "checkpoint"
    leg = coord._leg("loopback")
    assert not leg.direct  # checkpoint format: vLLM's loaders take whole tensors
    new = TinyModel.seeded(2)
    res = coord.sync(new, leg="loopback")
    assert res.ok and res.layout == "kernel" and leg.direct
    want = {n: p.detach().clone() for n, p in new.named_parameters()}
    assert all(torch.equal(engines.weights("a")[n], want[n]) for n in want)

    engines.faults["a"] = Faults(corrupt_bucket=0)  # the trainer writes during the sync
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.5)
    with pytest.raises(SyncFailedError) as e:
        coord.sync(new, leg="loopback")
    (rep,) = e.value.result.engines
    assert leg.direct and not rep.ok and rep.fenced and "differ from its checksum" in rep.error
    (st,) = coord.statuses()
    assert (st.state, st.version) == (S.FENCED, res.version)
    assert not all(torch.equal(engines.weights("a")[n], want[n]) for n in want)  # overwritten
    engines.faults["a"] = Faults()
    res = coord.sync(new, leg="loopback")  # the trainer's tensors as they are now
    assert res.ok and leg.direct
    (st,) = coord.statuses()
    assert (st.state, st.version) == (S.SERVING, res.version)
    assert all(torch.equal(engines.weights("a")[n], p.detach()) for n, p in new.named_parameters())


def test_direct_copies_are_off_unless_asked_for(local_fleet):
    engines = local_fleet(workers={"a": 1})
    coord = SyncCoordinator(engines, TransferConfig(bucket_bytes=1 << 16))
    for seed in (1, 2):
        res = coord.sync(TinyModel.seeded(seed), leg="loopback")
    assert res.ok and res.layout == "kernel" and not coord._leg("loopback").direct
