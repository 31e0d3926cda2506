"""Version numbers across coordinators and restarts: which version the fleet serves, and which
numbers a sync may use."""

from __future__ import annotations

from collections.abc import Collection, Iterable

from weightsync.errors import IllegalStateError
from weightsync.types import EngineState, EngineStatus, SyncResult

#: states an engine may begin a sync from (into sleeping engines too: the colocated loop)
CAN_BEGIN = frozenset({EngineState.SERVING, EngineState.FENCED, EngineState.STOPPED,
                       EngineState.ASLEEP, EngineState.WEIGHTS_AWAKE})


class VersionBook:
    """The published version (the latest every routable engine that took it verified) and the
    highest number a sync began with. A number is never used twice: not by another
    coordinator (or a restarted trainer) over the same engines, not by a retry after a failed
    sync; a sync refused before it began uses none.

    ``trust_held``: engines asleep for this coordinator are not asked their status before a
    sync (``next_held``) until one refuses a begin (``distrust``); the next asked status
    trusts again."""

    def __init__(self, owner: str, published: int) -> None:
        self.owner = owner
        self.published = published
        self.issued = published  # the latest a sync began with, published or not
        self.trust_held = True

    def next(self, statuses: list[EngineStatus], targets: Collection[str],
             takeover: bool) -> int:
        """One past the highest version any engine or this book has seen or issued. Refuses,
        before anything is touched, a sync whose targets are in no state to begin one (paused,
        loading, held by another coordinator's live sync): ``IllegalStateError``."""
        self.trust_held = True
        busy = [s for s in statuses if s.name in targets and not self.may_take(s, takeover) and (
            s.state not in CAN_BEGIN or s.owner not in (None, self.owner))]
        if busy:
            b = busy[0]
            why = (f": it is held by {b.owner} ({b.state.value}, lease {b.lease_left_s:.1f}s "
                   "more; take it over only if that coordinator is gone)"
                   if b.owner not in (None, self.owner) and b.state in CAN_BEGIN else
                   f" while {b.state.value} (needs serving/fenced/asleep)")
            raise IllegalStateError(f"cannot begin a sync{why}; no engine was touched",
                                    engine=b.name)
        self.published = max([self.published, *(s.version for s in statuses)])
        return max([self.issued, self.published, *(s.version_seen for s in statuses)]) + 1

    def next_held(self) -> int:
        """``next`` for engines asleep for this coordinator, without asking them: its heartbeat
        has held them since its ``sleep``, so no other coordinator began a sync on them, and
        the numbers they have seen are the ones it issued. An engine that moved on anyway (its
        lease lapsed while this process stalled, and another coordinator synced it) refuses
        the begin: a version it has seen is never reused (``EngineHost.begin_sync``)."""
        return max(self.issued, self.published) + 1

    def may_take(self, status: EngineStatus, takeover: bool) -> bool:
        """An engine held by another coordinator's sync that this one may take over."""
        return status.owner not in (None, self.owner) and \
            (takeover or (status.lease_left_s is not None and status.lease_left_s < 0))

    def issue(self, version: int) -> None:
        """A sync began with ``version``: it is never handed out again."""
        self.issued = max(self.issued, version)

    def saw(self, statuses: Iterable[EngineStatus]) -> None:
        """Numbers these engines have seen are not issued again (the next sync into them may
        not ask: ``next_held``)."""
        self.issued = max([self.issued, *(s.version_seen for s in statuses)])

    def distrust(self) -> None:
        """An engine held asleep refused a begin: ask them first next time."""
        self.trust_held = False

    def publish(self, result: SyncResult) -> None:
        """Every routable engine that took ``result.version`` verified it."""
        if any(r.ok for r in result.engines):
            self.published = max(self.published, result.version)
