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

import time
from collections.abc import Iterator
from contextlib import contextmanager


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
