"""Who owns an engine's sync in progress, and until when.

A sync belongs to one coordinator (its ``owner`` id) for a lease that the coordinator renews
while it lives (``SyncCoordinator`` sends a heartbeat every third of the lease). When a trainer
dies mid-sync — out of memory, preempted, killed — its heartbeats stop, the lease lapses, and
the engine ends the sync by itself (the lease watches, the host ends it): weights intact, it
resumes serving its old version; weights touched, it is fenced with the reason. A new coordinator may take the
engine over at once when it says the old owner is gone, or otherwise once the lease lapsed.

A lease never lapses in the middle of a call the owner made (``busy``): those end by their own
deadlines, and the lease is judged when they return.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

from weightsync.errors import IllegalStateError, SyncInProgressError


class SyncLease:
    """Who holds one engine, until when, and the watch that tells the host when a hold's
    owner went silent. Every host call that changes the engine asks ``check`` (or, a step of
    a sync, ``check_step``) first: while an owner holds the engine, nobody else (a caller that
    names no owner included) may change it."""

    def __init__(self, engine: str = "",
                 on_lapse: Callable[[], Awaitable[None]] | None = None) -> None:
        self.engine = engine  # the engine's name, for errors and logs
        self.owner: str | None = None
        self.duration = 0.0  # the lease_s it was taken with
        self._until = 0.0
        self._busy = 0
        self._on_lapse = on_lapse  # the host ends the sync (or sleep) nobody drives
        self._watchdog: asyncio.Task[None] | None = None

    def take(self, owner: str | None, lease_s: float) -> None:
        self.owner, self._until = (owner or None), time.monotonic() + lease_s
        self.duration = lease_s
        if not lease_s:  # a caller that asks for no lease holds the sync until it ends it
            self._until = float("inf")

    def hold(self, owner: str | None, lease_s: float) -> None:
        """``owner`` holds this engine for ``lease_s`` (0: until it lets go), watched."""
        self.take(owner, lease_s)
        if lease_s and self._on_lapse is not None and (self._watchdog is None
                                                       or self._watchdog.done()):
            self._watchdog = asyncio.create_task(self._watch(lease_s, self._on_lapse))

    def renew(self, owner: str, lease_s: float) -> bool:
        """Extend the lease if ``owner`` still holds it; False tells it that it does not."""
        if self.owner is None or owner != self.owner:
            return False
        self._until = max(self._until, time.monotonic() + lease_s)
        return True

    def release(self) -> None:
        self.owner, self._until, self.duration = None, 0.0, 0.0

    def held_by_other(self, owner: str | None) -> bool:
        """Someone holds this engine, and it is not ``owner`` (None or "": a caller that names
        no owner, e.g. the control plane or a Ray driver holding the actor handle)."""
        return self.owner is not None and (owner or None) != self.owner

    def is_holder(self, owner: str | None) -> bool:
        """``owner`` holds this engine, or nobody does and the caller names no owner."""
        return (owner or None) == self.owner

    def check(self, owner: str | None, op: str) -> None:
        """For a change outside a sync (pause, sleep, wake, fence, ...): refuse ``op``
        (``SyncInProgressError``, nothing changed) while someone other than ``owner`` holds
        this engine; with nobody holding it, anyone may."""
        if self.held_by_other(owner):
            who = f"not {owner}" if owner else "and the caller names no owner"
            raise SyncInProgressError(f"cannot {op}: a sync or sleep of {self.owner} holds "
                                      f"this engine, {who}", engine=self.engine or None)

    def check_step(self, owner: str | None, op: str) -> None:
        """For a step of a sync: ``check``, and a caller that names an owner must be the one
        holding the engine now (a coordinator whose sync was taken over or ended by its lease,
        come back, must not touch what another one, or nobody, holds)."""
        if owner and not self.is_holder(owner):
            raise SyncInProgressError(f"cannot {op}: this engine's sync is no longer held by "
                                      f"{owner} (now: {self.owner or 'nobody'})",
                                      engine=self.engine or None)
        self.check(owner, op)

    def stale_for(self, owner: str, takeover: bool, in_sync: bool) -> str | None:
        """Before ``owner`` begins a sync: the reason to end another holder's sync first
        (``in_sync``: the engine is in one) when its lease lapsed or ``takeover`` says that
        owner is gone; None when nothing stands in the way; refused otherwise."""
        held_by, left = self.owner, self.left()
        if held_by is None or held_by == owner or not in_sync:
            return None
        if not (takeover or self.lapsed()):
            raise IllegalStateError(
                f"a sync owned by {held_by} holds this engine for {max(left or 0, 0):.1f}s "
                "more; take it over only if that coordinator is gone", engine=self.engine or None)
        return f"taken over by {owner or 'a new coordinator'} from {held_by}"

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

    async def _watch(self, lease_s: float, on_lapse: Callable[[], Awaitable[None]]) -> None:
        """Tell the host when the lease lapsed between its owner's calls, until nobody holds
        it; the host decides (``EngineHost._lapsed``) whether a sync or sleep is to end."""
        while True:
            await asyncio.sleep(min(1.0, max(lease_s / 4, 0.05)))
            if self.lapsed():
                await on_lapse()
            elif self.owner is None:
                return
