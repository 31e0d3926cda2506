"""Who owns an engine's sync in progress, and until when.

A sync belongs to one coordinator (its ``owner`` id) for a lease that the coordinator renews
while it lives (``SyncCoordinator`` sends a heartbeat every third of the lease). When a trainer
dies mid-sync — out of memory, preempted, killed — its heartbeats stop, the lease lapses, and
the engine ends the sync by itself (``EngineHost`` watches): weights intact, it resumes serving
its old version; weights touched, it is fenced with the reason. A new coordinator may take the
engine over at once when it says the old owner is gone, or otherwise once the lease lapsed.

A lease never lapses in the middle of a call the owner made (``busy``): those end by their own
deadlines, and the lease is judged when they return.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from weightsync.errors import IllegalStateError
from weightsync.types import IN_SYNC, EngineState

logger = logging.getLogger(__name__)


class SyncLease:
    def __init__(self) -> None:
        self.owner: str | None = None
        self.duration = 0.0  # the lease_s it was taken with
        self._until = 0.0
        self._busy = 0

    def take(self, owner: str | None, lease_s: float) -> None:
        self.owner, self._until = (owner or None), time.monotonic() + lease_s
        self.duration = lease_s
        if not lease_s:  # a caller that asks for no lease holds the sync until it ends it
            self._until = float("inf")

    def renew(self, owner: str, lease_s: float) -> bool:
        """Extend the lease if ``owner`` still holds it; False tells it that it does not."""
        if self.owner is None or owner != self.owner:
            return False
        self._until = max(self._until, time.monotonic() + lease_s)
        return True

    def release(self) -> None:
        self.owner, self._until, self.duration = None, 0.0, 0.0

    def held_by_other(self, owner: str | None) -> bool:
        """A call from ``owner`` (None: not a coordinator's, e.g. the engine's own) comes
        from someone other than the holder: a coordinator whose sync was taken over or ended
        by its lease, come back."""
        return owner is not None and owner != self.owner

    def left(self) -> float | None:
        """Seconds until the lease lapses (negative: lapsed); None when nobody holds one."""
        if self.owner is None:
            return None
        return self._until - time.monotonic()

    def lapsed(self) -> bool:
        """Held, past its time, and no call of its owner in progress."""
        left = self.left()
        return left is not None and left < 0 and not self._busy

    @contextmanager
    def busy(self) -> Iterator[None]:
        """A call of the owner is in progress: the lease is not judged until it returns."""
        self._busy += 1
        try:
            yield
        finally:
            self._busy -= 1


class LeaseHolder:
    """Who may drive this engine's sync (mixed into ``weightsync.engine.host.EngineHost``, which
    sets up ``_lease`` and ``_watchdog``): the owner holds it for its lease; another coordinator
    takes it over when that lapsed or when it says the owner is gone; the engine ends a sync or
    a sleep whose owner went silent by itself."""

    def _hold(self, owner: str, lease_s: float) -> None:
        """``owner`` holds this engine for ``lease_s`` (0: until it lets go), watched."""
        self._lease.take(owner, lease_s)
        if lease_s and (self._watchdog is None or self._watchdog.done()):
            self._watchdog = asyncio.create_task(self._watch(lease_s))

    async def _take_over(self, owner: str, takeover: bool) -> None:
        held_by, left = self._lease.owner, self._lease.left()
        if held_by is None or held_by == owner or self.state not in IN_SYNC:
            return
        if not (takeover or self._lease.lapsed()):
            raise IllegalStateError(
                f"a sync owned by {held_by} holds this engine for {max(left or 0, 0):.1f}s "
                "more; take it over only if that coordinator is gone", engine=self.spec.name)
        await self._end_stale_sync(f"taken over by {owner or 'a new coordinator'} from "
                                   f"{held_by}")

    async def renew_lease(self, owner: str, lease_s: float) -> bool:
        """The owner's heartbeat; False when it no longer holds this engine's sync."""
        return self._lease.renew(owner, lease_s)

    async def _watch(self, lease_s: float) -> None:
        """End a sync (or a sleep) whose owner went silent (its lease lapsed between calls)."""
        while True:
            await asyncio.sleep(min(1.0, max(lease_s / 4, 0.05)))
            if self._lease.lapsed() and self.state in (*IN_SYNC, EngineState.FENCED):
                held = "mid-sync" if self._found else "while the engine slept for it"
                await self._end_stale_sync(f"lease of {self._lease.owner} expired: its "
                                           f"coordinator went silent {held}")
            elif self._lease.owner is None:
                return

    async def _end_stale_sync(self, reason: str) -> None:
        """Weights intact: serve the old version again; touched: fenced with ``reason``."""
        logger.warning("engine %s: ending a sync nobody drives: %s", self.spec.name, reason)
        await self.abort_sync(reason, fence=False, restore=False)

    def _check_owner(self, owner: str | None, op: str) -> None:
        if self._lease.held_by_other(owner):
            raise IllegalStateError(f"cannot {op}: this engine's sync is no longer held by "
                                    f"{owner} (now: {self._lease.owner or 'nobody'})",
                                    engine=self.spec.name)
