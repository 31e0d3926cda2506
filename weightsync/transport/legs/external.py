"""The external leg: a sender outside this process (a trainer reaching the fleet through the
control plane) hosts the group as rank 0; the engines join it and receive as in a broadcast.
The sender's checksums come back by call (``ExternalSender.wait_checksums``); a sender that
gives up before the engines joined (``ExternalSender.wait_aborted``) ends the wait for them at
once, not at the rendezvous deadline."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from weightsync.errors import EngineUnresponsive, TransferError, WeightSyncError
from weightsync.messages import BeginReply
from weightsync.transport.legs.base import LegOutcome, SenderLeg
from weightsync.types import TransferPlan

logger = logging.getLogger(__name__)

_ABORT_POLL_S = 0.05  # how often the wait for the engines' joins looks for the sender's abort


class ExternalSender(Protocol):
    """The far end of ``SyncCoordinator.sync_external``: a sender in another process that
    hosts the group as rank 0 and broadcasts the plan."""

    address: tuple[str, int]  # where rank 0 hosts the group's store

    def ready(self, plan: TransferPlan, world_size: int) -> None:
        """The engines are joining ``address``: the sender may open the group and send."""

    def wait_aborted(self, timeout: float) -> str | None:
        """The sender's reason once it gave up (waiting at most ``timeout`` for that); None
        while it has not."""

    def wait_checksums(self, timeout: float) -> list[int]:
        """The sender's per-bucket checksums once it sent everything; raises a
        ``WeightSyncError`` if it failed, aborted, or did not finish within ``timeout``."""


class ExternalLeg(SenderLeg):
    name = "external"
    receiver = "broadcast"  # the engines' side is a group receive like any broadcast

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._left: dict[str, Any] = {}  # joins a sender's abort left unanswered

    def send(self, names: Sequence[str], plan: TransferPlan, source: ExternalSender,
             begun: Mapping[str, BeginReply], *,
             one_phase: bool = False) -> LegOutcome:
        self._read_left()
        dl = self.cfg.deadlines
        ranks, bad = self.group_ranks(names)
        if ranks is None:
            return LegOutcome([], {}, bad)
        world = ranks.world_size
        host, port = source.address
        joins = {n: self.engines.join_group(n, self.cfg.broadcast.backend, host, port,
                                            ranks.offset(n), world, dl.rendezvous)
                 for n in names}
        source.ready(plan, world)
        bad = self._wait_joins(joins, source, dl.rendezvous * 1.2)
        if bad:  # the sync fails whatever the sender says: do not wait for it
            return LegOutcome([], {}, bad)
        ok, bad = self.receive_everywhere(names, plan, begun, self.request())
        if bad:
            return LegOutcome([], ok, bad)
        try:
            return LegOutcome(source.wait_checksums(dl.transfer), ok, bad)
        except WeightSyncError as e:
            logger.error("external sender of version %d failed: %s", plan.version, e)
            return LegOutcome([], ok, {n: TransferError(f"sender failed: {e}", engine=n)
                                       for n in names})

    def _wait_joins(self, joins: Mapping[str, Any], source: ExternalSender,
                    timeout: float) -> dict[str, WeightSyncError]:
        """Every engine's join (its error, if any, by engine), or the sender's abort,
        whichever comes first: a trainer that gives up before it hosts the group ends the
        sync at once. The engines' joins stop when the coordinator aborts the sync."""
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            _, bad = self.engines.wait(joins, max(min(_ABORT_POLL_S, left), 0.0))
            waiting = [n for n, e in bad.items() if isinstance(e, EngineUnresponsive)]
            if not waiting:
                return bad
            if left <= _ABORT_POLL_S:
                return {**bad, **{n: EngineUnresponsive(f"no answer within {timeout:.1f}s",
                                                        engine=n) for n in waiting}}
            reason = source.wait_aborted(0)
            if reason is not None:
                logger.warning("external sender gave up before %s joined: %s",
                               sorted(waiting), reason)
                self._left = {n: joins[n] for n in waiting}
                return {n: TransferError(f"the sender aborted before the group formed: "
                                         f"{reason}", engine=n) for n in joins}

    def _read_left(self) -> None:
        """Read the joins an abort left unanswered (each ended with a "cancelled" error as the
        abort's ``abort_sync`` reached its engine): an error nobody reads, Ray logs as one."""
        if self._left:
            self.engines.wait(self._left, 0)
            self._left = {}

    def close(self) -> None:
        self._read_left()
