"""The external leg: a sender outside this process (a trainer reaching the fleet through the
control plane) hosts the group as rank 0; the engines join it and receive as in a broadcast.
The sender's checksums come back by call (``ExternalSender.wait_checksums``)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Protocol

from weightsync.errors import TransferError, WeightSyncError
from weightsync.messages import BeginReply
from weightsync.transport.legs.base import LegOutcome, SenderLeg
from weightsync.types import TransferPlan

logger = logging.getLogger(__name__)


class ExternalSender(Protocol):
    """The far end of ``SyncCoordinator.sync_external``: a sender in another process that
    hosts the group as rank 0 and broadcasts the plan."""

    address: tuple[str, int]  # where rank 0 hosts the group's store

    def ready(self, plan: TransferPlan, world_size: int) -> None:
        """The engines are joining ``address``: the sender may open the group and send."""

    def wait_checksums(self, timeout: float) -> list[int]:
        """The sender's per-bucket checksums once it sent everything; raises a
        ``WeightSyncError`` if it failed, aborted, or did not finish within ``timeout``."""


class ExternalLeg(SenderLeg):
    name = "external"
    receiver = "broadcast"  # the engines' side is a group receive like any broadcast

    def send(self, names: Sequence[str], plan: TransferPlan, source: ExternalSender,
             begun: Mapping[str, BeginReply], *,
             one_phase: bool = False) -> LegOutcome:
        dl = self.cfg.deadlines
        ranks, bad = self.group_ranks(names)
        if ranks is None:
            return LegOutcome([], {}, bad)
        world = ranks.world_size
        host, port = source.address
        joins = {n: self.engines.submit(n, "join_group", self.cfg.backend, host, port,
                                        ranks.offset(n), world, dl.rendezvous)
                 for n in names}
        source.ready(plan, world)
        _, bad = self.engines.wait(joins, dl.rendezvous * 1.2)
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
