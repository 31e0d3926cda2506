"""``FleetView``: every engine's status as the control plane last saw it.

``/status``, ``/engines`` and the status page answer from here, so a reader never waits on an
engine: an engine busy in a reload or a sync, or slow to answer on a loaded host, would
otherwise hold every reader for as long as it takes (``/status`` p99 was 30-60 ms on two CPU
cores while reloads raced, against a 10 ms target; ``benchmarks/control_latency.py``).

What fills it: every status the service asks for anyway (``Fleet.statuses``: the state checks
before a change, the answers after one), so a change made through the service shows at once,
and a background poll (``Fleet.watch``, started by the app's lifespan) for what changes
outside it (another coordinator, a dead engine). A reply is kept only if it was asked no
earlier than the one it would replace: a slow poll sent before a change never overwrites
what the change saw after it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

from weightsync.types import EngineStatus


class FleetView:
    """Engine name -> (when it was asked, its status). Touched from the event loop only."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self._seen: dict[str, tuple[float, EngineStatus]] = {}

    def update(self, statuses: Iterable[EngineStatus], asked_at: float) -> None:
        """Keep each status unless a reply to a later question is already here."""
        for st in statuses:
            held = self._seen.get(st.name)
            if held is None or held[0] <= asked_at:
                self._seen[st.name] = (asked_at, st)

    def statuses(self) -> list[EngineStatus] | None:
        """Every engine's status in fleet order, or None until each has been seen once."""
        if any(n not in self._seen for n in self.names):
            return None
        return [self._seen[n][1] for n in self.names]

    def age(self, now: float | None = None) -> float:
        """Seconds since the oldest of the statuses held was asked (inf before the first)."""
        if any(n not in self._seen for n in self.names):
            return float("inf")
        oldest = min((self._seen[n][0] for n in self.names), default=time.monotonic())
        return (time.monotonic() if now is None else now) - oldest
