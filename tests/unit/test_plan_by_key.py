"""A plan's body is sent whole once and named by key (``plan_wire.PlanMessage``) in later
syncs, on both hops (trainer -> engine host, host -> workers): a kernel-layout plan is the same
every sync but for its version, and a MoE's is ~128 KB, which Ray ships through its object
store. Real coordinator, hosts and workers; vLLM stood in for (``weightsync.testing.fleet``)."""

from __future__ import annotations

import pytest
import torch

from weightsync.config import TransferConfig
from weightsync.coordinator import SyncCoordinator
from weightsync.errors import SyncFailedError
from weightsync.plan_wire import HeldPlan, PlanMessage
from weightsync.testing.fleet import TinyModel
from weightsync.types import EngineState


def _plans_sent(engines) -> dict[str, list[str]]:
    """The plan argument of every host call that takes one, by method; and of every worker
    call (``ws_*``) the hosts make."""
    sent: dict[str, list[str]] = {}
    start = engines.inner.start  # (every call's host method, as the transport carries it)

    def record(name, call):
        if call.method in ("receive", "validate"):
            sent.setdefault(call.method, []).append(call.args[0])
        return start(name, call)

    engines.inner.start = record
    for host in engines.handles.values():
        rpc = host.calls.rpc

        async def worker_rpc(method, *args, _rpc=rpc, **kwargs):
            if method in ("ws_receive", "ws_validate"):
                sent.setdefault(method, []).append(args[0])
            return await _rpc(method, *args, **kwargs)

        host.calls.rpc = worker_rpc
    return sent


def _is_ref(text: str) -> bool:
    return PlanMessage.model_validate_json(text).body is None


@pytest.mark.parametrize("leg", ["loopback", "broadcast"])
def test_a_plan_goes_whole_once_then_by_key(local_fleet, leg):
    engines = local_fleet()
    coord = SyncCoordinator(engines, TransferConfig(bucket_bytes=1 << 16))
    sent = _plans_sent(engines)
    for seed in (1, 2, 3, 4):
        new = TinyModel.seeded(seed)
        res = coord.sync(new, leg=leg)
        assert res.ok, res
        want = {n: p.detach() for n, p in new.named_parameters()}
        for name in ("a", "b"):
            assert all(torch.equal(engines.weights(name)[n], want[n]) for n in want)
    # two plans: checkpoint format (sync 1), then the kernel layout it calibrated (2 to 4);
    # each was sent whole once, to be validated, and named by key in every receive
    assert res.layout == "kernel"
    assert len(sent["validate"]) == 4 and not any(map(_is_ref, sent["validate"]))
    assert len(sent["receive"]) == 8 and all(map(_is_ref, sent["receive"]))
    assert [PlanMessage.model_validate_json(t).version for t in sent["receive"]] == \
        [1, 1, 2, 2, 3, 3, 4, 4]
    assert max(map(len, sent["receive"])) < 100 < min(map(len, sent["validate"]))
    # the same between each host and its workers
    assert not any(map(_is_ref, sent["ws_validate"])) and all(map(_is_ref, sent["ws_receive"]))
    assert [st.version for st in coord.statuses()] == [4, 4]


def test_an_engine_given_another_plan_since_is_sent_the_plan_whole(local_fleet):
    """The coordinator validated its plan on the engine before, so it does not again; but
    another coordinator's sync gave the engine another plan since (a chain broadcast's)."""
    engines = local_fleet(workers={"a": 1})
    coord = SyncCoordinator(engines, TransferConfig(bucket_bytes=1 << 16))
    for seed in (1, 2):
        assert coord.sync(TinyModel.seeded(seed), leg="loopback").ok
    chain = SyncCoordinator(engines, TransferConfig(bucket_bytes=1 << 16, broadcast="chain"))
    assert chain.sync(TinyModel.seeded(3), leg="broadcast").ok
    sent = _plans_sent(engines)
    new = TinyModel.seeded(4)
    res = coord.sync(new, leg="loopback")
    assert res.ok and "validate" not in sent
    assert [_is_ref(t) for t in sent["receive"]] == [False]
    assert [_is_ref(t) for t in sent["ws_receive"]] == [False]
    want = {n: p.detach() for n, p in new.named_parameters()}
    assert all(torch.equal(engines.weights("a")[n], want[n]) for n in want)
    assert coord.sync(TinyModel.seeded(5), leg="loopback").ok  # and by key again after it
    assert [_is_ref(t) for t in sent["receive"]] == [False, True]


def test_a_plan_named_that_an_engine_does_not_hold_is_refused_and_nothing_changes(local_fleet):
    engines = local_fleet(workers={"a": 1})
    coord = SyncCoordinator(engines, TransferConfig(bucket_bytes=1 << 16))
    old = TinyModel.seeded(1)
    coord.sync(TinyModel.seeded(0), leg="loopback")  # the checkpoint-format plan,
    coord.sync(old, leg="loopback")  # then the kernel layout's, kept from now on
    host = engines.handles["a"]
    key, host.calls.plan = host.calls.plan.key, HeldPlan()  # it lost the plan...
    begin = host.begin_sync

    async def claiming(**kwargs):  # ...but claims it still
        return (await begin(**kwargs)).model_copy(update={"plan_key": key})

    host.begin_sync = claiming
    with pytest.raises(SyncFailedError) as e:
        coord.sync(TinyModel.seeded(2), leg="loopback")
    (rep,) = e.value.result.engines
    assert "is not held here" in rep.error and not rep.fenced
    (st,) = coord.statuses()
    assert (st.state, st.version) == (EngineState.SERVING, 2)
    want = {n: p.detach() for n, p in old.named_parameters()}
    assert all(torch.equal(engines.weights("a")[n], want[n]) for n in want)
