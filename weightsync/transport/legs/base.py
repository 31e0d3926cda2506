"""The two halves of a transfer leg (see ``weightsync.transport.legs``)."""

from __future__ import annotations

import hashlib
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from weightsync.config import TransferConfig
from weightsync.errors import PayloadNotHeld, TransferError, WeightSyncError
from weightsync.messages import ApplyMode, BeginReply, ReceiveRequest
from weightsync.plan_wire import plan_message
from weightsync.transport.ranks import GroupRanks
from weightsync.types import Bucket, ReceiveReport, TransferPlan

if TYPE_CHECKING:
    import torch

    from weightsync.remote import Engines, Pending


@dataclass
class LegOutcome:
    """What a sender leg reports: the sender's per-bucket checksums, every engine's receipt,
    the engines that failed (typed errors), and the trainer's own sub-phases (seconds)."""

    sums: list[int]
    receipts: dict[str, ReceiveReport]
    failed: dict[str, WeightSyncError]
    seconds: dict[str, float] = field(default_factory=dict)


class SenderLeg(ABC):
    """Trainer side: moves one plan's buckets to a set of engines, never hanging (every wait
    has a deadline). One instance per coordinator and leg; it may keep state across syncs (an
    open group, shared buffers) and is told when to let it go."""

    name: ClassVar[str]
    receiver: ClassVar[str]  # the registry name of the worker side it talks to

    def __init__(self, cfg: TransferConfig, engines: Engines,
                 on_bucket: Callable[[int], None]) -> None:
        self.cfg, self.engines, self.on_bucket = cfg, engines, on_bucket

    @abstractmethod
    def send(self, names: Sequence[str], plan: TransferPlan, source: Any,
             begun: Mapping[str, BeginReply], *, one_phase: bool = False) -> LegOutcome:
        """Send ``plan`` from ``source`` (named tensors, or whatever the leg sends from) to
        the engines ``names``, which have begun the sync (``begun``: their replies).

        ``one_phase``: the coordinator lets the engine commit ``plan.version`` in the receive
        call (a wave of one engine). A leg that loads atomically, and whose buffers hold no
        memory the engine's waking KV cache would need, says so in its request
        (``ReceiveRequest.commit_version``); any other leg ignores it."""

    def loaded(self) -> None:
        """Every engine applied or dropped this sync's buckets: memory they used may go."""

    def close(self) -> None:
        """Let go of everything kept across syncs (groups, buffers): an engine was replaced,
        or the coordinator closes."""

    # ---- helpers for subclasses ---------------------------------------------------------------
    def request(self, apply: ApplyMode | None = None, payload: str | None = None,
                commit_version: int | None = None) -> ReceiveRequest:
        return ReceiveRequest(leg=self.receiver, apply=apply or self.cfg.apply,
                              check_finite=self.cfg.check_finite,
                              deadline_s=self.cfg.deadlines.transfer, payload=payload,
                              commit_version=commit_version)

    def group_ranks(self, names: Sequence[str]
                    ) -> tuple[GroupRanks | None, dict[str, WeightSyncError]]:
        """Every engine's workers (``EngineHost.engine_workers``) laid out as group ranks
        (``transport.ranks``): (ranks, failures)."""
        ok, bad = self.engines.each(names, self.engines.engine_workers, self.cfg.deadlines.verify)
        if bad:
            return None, bad
        return GroupRanks.of({n: ok[n].workers for n in names}), {}

    def submit_receive(self, names: Sequence[str], plan: TransferPlan,
                       begun: Mapping[str, BeginReply], request: ReceiveRequest
                       ) -> dict[str, Pending[ReceiveReport]]:
        """Every engine's ``receive``, submitted: the plan's body named by key to an engine
        that holds it already (its ``BeginReply.plan_key``), else whole
        (``plan_wire.plan_message``: one message per body held)."""
        text = request.model_dump_json()
        messages = {k: plan_message(plan, k) for k in {begun[n].plan_key for n in names}}
        return {n: self.engines.receive(n, messages[begun[n].plan_key], text) for n in names}

    def wait_receipts(self, pending: Mapping[str, Pending[ReceiveReport]], timeout: float,
                      sent: float | None = None
                      ) -> tuple[dict[str, ReceiveReport], dict[str, WeightSyncError]]:
        """Wait for submitted ``receive`` calls: (receipts, failures). ``sent``: when they were
        submitted, by this machine's ``time.perf_counter()``, for a leg whose engines are
        on this machine (then the receipts say how long the call took each way: ``call_*``)."""
        ok, bad = self.engines.wait(pending, timeout)
        back = time.perf_counter()
        return {n: hops(report, sent, back, "call", "host") for n, report in ok.items()}, bad

    def receive_held(self, names: Sequence[str], plan: TransferPlan,
                     begun: Mapping[str, BeginReply], request: ReceiveRequest,
                     held: dict[str, str], *, key: str | None = None,
                     same_machine: bool = False
                     ) -> tuple[dict[str, ReceiveReport], dict[str, WeightSyncError]]:
        """``receive_everywhere`` with the payload named by key to every engine that holds it
        (``held``: engine -> the key of the payload it was last sent whole, kept up to date
        here). An engine that no longer holds it (restarted) is asked again with the payload
        itself: nothing was received the first time. ``key``: the payload's
        (``payload_key``), when the leg keeps it with the payload. ``same_machine``: the
        engines run on this machine (``wait_receipts`` reports the call's hops)."""
        if key is None and request.payload is not None:
            key = payload_key(request.payload)
        by_key = request.model_copy(update={"payload": None, "payload_key": key})
        have = [n for n in names if key is not None and held.get(n) == key]
        sent = time.perf_counter() if same_machine else None
        pending = {**self.submit_receive([n for n in names if n not in have], plan, begun,
                                         request),
                   **self.submit_receive(have, plan, begun, by_key)}
        ok, bad = self.wait_receipts(pending, self.cfg.deadlines.transfer * 1.6, sent)
        again = [n for n, e in bad.items() if isinstance(e, PayloadNotHeld)]
        if again:
            sent = time.perf_counter() if same_machine else None
            ok2, bad2 = self.wait_receipts(self.submit_receive(again, plan, begun, request),
                                           self.cfg.deadlines.transfer * 1.6, sent)
            ok.update(ok2)
            bad = {**{n: e for n, e in bad.items() if n not in again}, **bad2}
        for n in names:
            if n in ok and key is not None:
                held[n] = key
            else:
                held.pop(n, None)
        return ok, bad

    def receive_everywhere(self, names: Sequence[str], plan: TransferPlan,
                           begun: Mapping[str, BeginReply],
                           request: ReceiveRequest
                           ) -> tuple[dict[str, ReceiveReport], dict[str, WeightSyncError]]:
        """Every engine's ``receive`` under the transfer deadline: (receipts, failures)."""
        pending = self.submit_receive(names, plan, begun, request)
        return self.wait_receipts(pending, self.cfg.deadlines.transfer * 1.6)


@dataclass
class Incoming:
    """A plan's buckets as a receiver delivers them. ``expected``: the sender's checksums when
    the leg knows them up front (then every bucket is verified before anything is applied);
    ``known``: checksums the receiver already computed; ``cache_key``: stable across syncs
    while the buffers are (the worker keeps its kernel-layout copy plan under it).

    ``checked_by_copy``: the buckets are the sender's own memory (``packing.Spans``), read in
    place, and checked as they are copied into the parameters — ``expected_terms`` (the
    sender's checksum terms of every piece, ``packing.digest_terms``, still on the device,
    read back with the receiver's own in one host sync) against those of the bytes written,
    so what is verified is what was loaded (checking them first would verify a read of memory
    its owner may write again before the copy). A mismatch is then found after the
    parameters were overwritten: the engine is fenced. ``sender_nonfinite``: per piece, from
    the same reads as its terms, 0 where every element is finite (``ManyDigests``'
    ``dtypes``); the engine refuses a piece flagged non-finite before it copies anything
    (the bytes it then copies are checked against the same terms), and checks pieces itself
    only when the sender did not (None, or -1)."""

    buckets: Iterator[tuple[Bucket, torch.Tensor]]
    expected: list[int] | None = None
    expected_terms: torch.Tensor | None = None
    sender_nonfinite: torch.Tensor | None = None
    known: list[int] | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    cache_key: str | None = None
    checked_by_copy: bool = False


def hops(report: ReceiveReport, sent: float | None, back: float, hop: str, callee: str
         ) -> ReceiveReport:
    """``report`` with the callee's ``at_<callee>_enter``/``_exit`` stamps (its
    ``time.perf_counter()``, the machine's monotonic clock) turned into how long the call
    took to reach it and its answer to come back (``<hop>_request``, ``<hop>_reply``), given
    when the caller sent it and got it back. Only for caller and callee on one machine (a
    host and its workers; a colocated trainer and its engine); ``sent`` None: another
    machine, the stamps are dropped."""
    seconds = dict(report.seconds)
    enter, leave = seconds.pop(f"at_{callee}_enter", None), seconds.pop(f"at_{callee}_exit", None)
    if enter is not None and leave is not None and sent is not None:
        seconds[f"{hop}_request"], seconds[f"{hop}_reply"] = enter - sent, back - leave
    return report.model_copy(update={"seconds": seconds})


def payload_key(payload: str) -> str:
    """The key a leg's payload is named by once its receivers hold it (``HeldPayload``)."""
    return hashlib.blake2b(payload.encode(), digest_size=16).hexdigest()


class HeldPayload:
    """The payload a receiver leg was last sent whole, parsed once: its sender may name it by
    key (``ReceiveRequest.payload_key``) in later syncs (``SenderLeg.receive_held``)."""

    def __init__(self, parse: Callable[[str], Any]) -> None:
        self.parse = parse
        self.key: str | None = None
        self._text: str | None = None
        self._parsed: Any = None

    def get(self, request: ReceiveRequest) -> Any:
        """The request's payload, parsed (the same object while it is the same payload).
        ``PayloadNotHeld`` for a key not held here; ``TransferError`` for no payload."""
        if request.payload is not None:
            if request.payload != self._text:
                parsed = self.parse(request.payload)  # (a bad payload: nothing is kept)
                self._text, self._parsed = request.payload, parsed
                self.key = payload_key(request.payload)
            return self._parsed
        if request.payload_key is None:
            raise TransferError(f"a {request.leg} receive needs its sender's payload")
        if request.payload_key != self.key:
            raise PayloadNotHeld(f"payload {request.payload_key} is not held here (holding "
                                 f"{self.key}): send it whole")
        return self._parsed


class ReceiverLeg(ABC):
    """Worker side: one instance per worker and leg, kept across syncs (its caches live
    here). ``worker`` is the vLLM worker (``WeightSyncWorkerExtension``)."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker

    @abstractmethod
    def receive(self, plan: TransferPlan, request: ReceiveRequest) -> Incoming:
        """The plan's buckets, in order, as they arrive."""

    def done(self) -> None:
        """The buckets were applied or dropped."""

    def failed(self) -> None:
        """The receive failed: leave nothing half-open (a broken group is never reused)."""
