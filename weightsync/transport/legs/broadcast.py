"""The broadcast leg: the trainer is rank 0 of a gloo/NCCL group with the engines' workers.

Every worker of every engine is a rank of its own (``transport.ranks``: an engine's
offset advances by its worker count), so tensor-parallel engines receive on every worker.
The group stays open across syncs while its members are unchanged and every one of them still
reports it (``BeginReply.group_id``): a rendezvous, and NCCL communicator setup, per sync cost
more than the transfer of a small model. Any failure tears it down. The leg reads its settings
from ``TransferConfig.broadcast`` (``config.BroadcastSettings``). With ``mode="chain"`` (gloo)
the sender feeds the first engine and each engine forwards every chunk to the next
(``transport.broadcast``).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from weightsync.errors import TransferError, WeightSyncError
from weightsync.messages import BeginReply, ReceiveRequest
from weightsync.transport.broadcast import BroadcastSender, free_port, open_group
from weightsync.transport.legs.base import Incoming, LegOutcome, ReceiverLeg, SenderLeg
from weightsync.transport.ranks import GroupRanks
from weightsync.types import TransferPlan

logger = logging.getLogger(__name__)
R = TypeVar("R")


class BroadcastLeg(SenderLeg):
    name = "broadcast"
    receiver = "broadcast"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._group: tuple[tuple[str, ...], str, BroadcastSender] | None = None
        self.ranks: GroupRanks | None = None  # where each engine's workers sit in the group

    def send(self, names: Sequence[str], plan: TransferPlan, source: Any,
             begun: Mapping[str, BeginReply], *,
             one_phase: bool = False) -> LegOutcome:
        sender, bad = self.sender_for(names, {n: begun[n].group_id for n in names})
        if sender is None:
            return LegOutcome([], {}, bad)
        if self.chain_chunk:  # engines forward in join (rank) order
            plan = plan.model_copy(update={"chain_chunk": self.chain_chunk})
        pending = self.submit_receive(names, plan, begun, self.request())
        sums, ok, bad, took = self.deliver(
            names, sender, plan, source,
            lambda: self.wait_receipts(pending, self.cfg.deadlines.transfer * 1.6))
        return LegOutcome(sums, ok, bad, {"trainer_send": took})

    @property
    def chain_chunk(self) -> int:
        """The chunk size engines forward in (``mode="chain"``), 0 for a collective."""
        settings = self.cfg.broadcast
        return settings.chain_chunk_bytes if settings.mode == "chain" else 0

    def deliver(self, names: Sequence[str], sender: BroadcastSender, plan: TransferPlan,
                source: Any, wait: Callable[[], tuple[dict[str, R], dict[str, WeightSyncError]]]
                ) -> tuple[list[int], dict[str, R], dict[str, WeightSyncError], float]:
        """Send ``plan`` from ``source`` over the group, then ``wait`` for the engines' calls
        that receive it (submitted before): (sums, replies, failures, seconds sending). A send
        that fails breaks the group, so receivers fail fast instead of waiting; any failure
        closes it (never reused); a sender failure nobody else saw fails every engine.
        Full syncs (``send``) and adapter syncs (``coordination.adapter_flip``) both send
        this way."""
        sums: list[int] = []
        send_error: WeightSyncError | None = None
        t = time.perf_counter()
        try:
            sums = sender.send(plan, source, self.cfg.deadlines.transfer,
                               on_bucket=self.on_bucket)
        except WeightSyncError as e:
            send_error = e
            self.close()
        took = time.perf_counter() - t
        ok, bad = wait()
        if bad:
            self.close()
        if send_error is not None:
            logger.error("broadcast of version %d failed: %s; engines at fault: %s",
                         plan.version, send_error, sorted(bad) or "unknown")
            if not bad:  # nobody else failed: the sender itself is at fault
                bad = {n: TransferError(f"sender failed: {send_error}", engine=n) for n in names}
        return sums, ok, bad, took

    def sender_for(self, names: Sequence[str], group_ids: Mapping[str, str | None]
                   ) -> tuple[BroadcastSender | None, dict[str, WeightSyncError]]:
        """The sending end of a group with the engines ``names``: the open one when every
        member still reports it (``group_ids``: the group each is in now), else a new one
        (the engines join it): (sender, failures). Full syncs and adapter syncs
        (``coordination.adapter_flip``) share it."""
        dl, settings = self.cfg.deadlines, self.cfg.broadcast
        members = tuple(names)
        cached = self._group
        if cached and cached[0] == members and \
                all(group_ids.get(n) == cached[1] for n in names):
            return cached[2], {}
        self.close()
        ranks, bad = self.group_ranks(names)
        if ranks is None:
            return None, bad
        group_id = uuid.uuid4().hex
        world = ranks.world_size
        port = free_port(settings.host, settings.port)
        joins = {n: self.engines.join_group(n, settings.backend, settings.host, port,
                                            ranks.offset(n), world, dl.rendezvous, group_id)
                 for n in names}
        try:
            sender = BroadcastSender(open_group(settings.backend, settings.host, port, 0, world,
                                                dl.rendezvous))
        except WeightSyncError as e:
            _, bad = self.engines.wait(joins, dl.rendezvous * 0.5)
            return None, bad or {n: TransferError(f"rendezvous failed: {e}", engine=n)
                                 for n in names}
        _, bad = self.engines.wait(joins, dl.rendezvous)
        if bad:
            sender.close()
            return None, bad
        self._group = (members, group_id, sender)
        self.ranks = ranks
        return sender, {}

    def close(self) -> None:
        if self._group is not None:
            self._group[2].close()
            self._group = None
            self.ranks = None


class GroupReceiver(ReceiverLeg):
    """Worker side of every group leg (broadcast, chain, external): buckets one ahead, into
    last sync's buffers when nothing holds them any more (fresh pages cost a page fault each,
    a third of the wire time of a CPU broadcast)."""

    def __init__(self, worker: Any) -> None:
        super().__init__(worker)
        self._pool: list[Any] | None = None  # last sync's buffers, offered to the next
        self._received: list[Any] = []

    def receive(self, plan: TransferPlan, request: ReceiveRequest) -> Incoming:
        group = self.worker._ws_group()
        if group is None:
            raise TransferError("no transfer group: join_group first")
        pool, self._pool = self._pool, None
        self._received = []

        def buckets() -> Iterator[tuple[Any, Any]]:
            for bucket, buf in group.receive(plan, request.deadline_s, pool):
                self._received.append(buf)
                yield bucket, buf

        return Incoming(buckets(), seconds={})

    def done(self) -> None:
        """Offer this sync's buffers to the next, unless the model now holds their memory (a
        loader may keep a received tensor as a parameter rather than copy it)."""
        bufs, self._received = self._received, []
        if bufs and not self.worker._ws_holds(bufs):
            self._pool = bufs

    def failed(self) -> None:
        self._received = []
        self.worker._leave_group()  # a broken group is never reused
