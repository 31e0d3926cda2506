"""A leg's payload (an IPC share kept across syncs, ~23 KB for a MoE) goes whole once and by
key after that, on both hops; a receiver that lost it is asked again with the payload itself
in the same sync. Pure protocol: the engines are stand-ins that answer like hosts do."""

from __future__ import annotations

import pytest

from weightsync.config import TransferConfig
from weightsync.errors import PayloadNotHeld, TransferError, WeightSyncError
from weightsync.messages import BeginReply, ReceiveRequest
from weightsync.remote import Engines
from weightsync.transport.legs.base import HeldPayload, LegOutcome, SenderLeg, payload_key
from weightsync.transport.packing import plan_buckets
from weightsync.types import ReceiveReport, TensorSpec


def _request(**kw) -> ReceiveRequest:
    return ReceiveRequest(leg="ipc", apply="atomic", deadline_s=5, **kw)


def test_a_payload_is_parsed_once_and_then_named_by_key():
    parsed = []
    held = HeldPayload(lambda text: parsed.append(text) or {"share": text})
    first = held.get(_request(payload="share-1"))
    assert held.get(_request(payload="share-1")) is first  # the same text: not parsed again
    assert held.get(_request(payload_key=payload_key("share-1"))) is first
    assert parsed == ["share-1"]
    with pytest.raises(PayloadNotHeld, match="not held here"):
        held.get(_request(payload_key=payload_key("share-2")))
    with pytest.raises(TransferError, match="needs its sender's payload"):
        held.get(_request())


def test_a_payload_that_fails_to_parse_is_not_kept():
    def parse(text):
        if text == "bad":
            raise TransferError("bad share")
        return text

    held = HeldPayload(parse)
    held.get(_request(payload="good"))
    with pytest.raises(TransferError, match="bad share"):
        held.get(_request(payload="bad"))
    assert held.get(_request(payload_key=payload_key("good"))) == "good"
    with pytest.raises(PayloadNotHeld):
        held.get(_request(payload_key=payload_key("bad")))


def test_a_request_carries_its_payload_or_a_key_not_both():
    with pytest.raises(ValueError, match="not both"):
        _request(payload="x", payload_key="k")


class _Hosts:
    """A transport whose hosts answer ``receive`` as hosts do: the report as JSON, or a typed
    error (``weightsync.remote.Engines`` parses the report). Each
    holds the payload it was last sent whole (its worker's ``HeldPayload``)."""

    def __init__(self, names):
        self.held = {n: HeldPayload(lambda text: text) for n in names}
        self.sent: list[tuple[str, ReceiveRequest]] = []

    def start(self, name, call):
        _plan_text, request_text = call.args
        request = ReceiveRequest.model_validate_json(request_text)
        self.sent.append((name, request))
        try:
            self.held[name].get(request)
        except WeightSyncError as e:
            return e
        return ReceiveReport(nbytes=1, checksums=(1,), applied=True).model_dump_json()

    def resolve(self, started, timeout):
        ok = {n: r for n, r in started.items() if isinstance(r, str)}
        return ok, {n: r for n, r in started.items() if not isinstance(r, str)}


class _Leg(SenderLeg):
    name = receiver = "ipc"

    def send(self, *a, **kw) -> LegOutcome:  # (receive_held is what is tried here)
        raise NotImplementedError


def test_engines_that_hold_the_payload_get_its_key_and_one_that_lost_it_gets_it_again():
    names = ["a", "b"]
    hosts = _Hosts(names)
    leg = _Leg(TransferConfig(), Engines(hosts), lambda i: None)
    plan = plan_buckets([TensorSpec(name="w", dtype="float32", shape=(4,))], 1 << 10, 1)
    begun = {n: BeginReply(seconds={}) for n in names}
    held: dict[str, str] = {}
    request = _request(payload="share-1")

    def sync():
        hosts.sent.clear()
        ok, bad = leg.receive_held(names, plan, begun, request, held)
        assert not bad and set(ok) == set(names)
        assert all(isinstance(r, ReceiveReport) for r in ok.values())
        return [(n, r.payload is not None) for n, r in hosts.sent]

    assert sync() == [("a", True), ("b", True)]  # whole the first time
    assert held == {"a": payload_key("share-1"), "b": payload_key("share-1")}
    assert sync() == [("a", False), ("b", False)]  # then by key
    hosts.held["b"] = HeldPayload(lambda text: text)  # b restarted: holds nothing
    assert sync() == [("a", False), ("b", False), ("b", True)]  # asked again, whole
    request = _request(payload="share-2")  # the trainer shares new buffers
    assert sync() == [("a", True), ("b", True)]
    assert held == {"a": payload_key("share-2"), "b": payload_key("share-2")}


def test_an_engine_that_failed_its_receive_gets_the_payload_whole_next_time():
    names = ["a"]
    hosts = _Hosts(names)
    leg = _Leg(TransferConfig(), Engines(hosts), lambda i: None)
    plan = plan_buckets([TensorSpec(name="w", dtype="float32", shape=(4,))], 1 << 10, 1)
    begun = {"a": BeginReply(seconds={})}
    held: dict[str, str] = {}
    leg.receive_held(names, plan, begun, _request(payload="s"), held)
    assert held == {"a": payload_key("s")}
    real = hosts.start
    hosts.start = lambda *a, **kw: (real(*a, **kw), TransferError("copy failed"))[1]
    ok, bad = leg.receive_held(names, plan, begun, _request(payload="s"), held)
    assert not ok and isinstance(bad["a"], TransferError) and held == {}
    hosts.start = real
    hosts.sent.clear()
    leg.receive_held(names, plan, begun, _request(payload="s"), held)
    assert [r.payload for _, r in hosts.sent] == ["s"]


def test_a_callees_stamps_become_the_time_each_way_or_are_dropped():
    from weightsync.transport.legs.base import hops

    report = ReceiveReport(nbytes=1, checksums=(1,), applied=True,
                           seconds={"worker": 2.0, "at_host_enter": 10.5, "at_host_exit": 12.75})
    same = hops(report, 10.0, 13.0, "call", "host").seconds
    assert same == {"worker": 2.0, "call_request": 0.5, "call_reply": 0.25}
    assert hops(report, None, 13.0, "call", "host").seconds == {"worker": 2.0}
