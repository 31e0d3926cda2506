"""The colocated loop's half of the coordinator: the fleet sleeps after a rollout so the trainer
can use the engines' device memory, and wakes without a sync when asked. A ``sync`` then goes
straight into the sleeping engines (``weightsync.engine.dormancy`` on the engine side)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from weightsync.coordination.reach import Reach
from weightsync.coordination.states import FleetStatuses, require_states
from weightsync.coordination.versions import VersionBook
from weightsync.heartbeat import Heartbeat
from weightsync.types import EngineSleepReport, EngineState, EngineStatus, PauseMode, SleepResult

logger = logging.getLogger(__name__)

SLEEPABLE = frozenset({EngineState.SERVING, EngineState.PAUSED})
WAKEABLE = frozenset({EngineState.ASLEEP, EngineState.WEIGHTS_AWAKE})


class Colocation:
    """Sleep and wake for the coordinator. Invariant: an engine asleep for this coordinator is
    held by its heartbeat (``Heartbeat.sleeping``) from before its sleep until it serves again,
    so the next sync may go in without asking it (``VersionBook.next_held``)."""

    def __init__(self, reach: Reach, statuses: FleetStatuses, book: VersionBook,
                 beat: Heartbeat) -> None:
        self.reach, self.statuses, self.book, self.beat = reach, statuses, book, beat

    def _require(self, targets: Sequence[str], allowed: frozenset[EngineState],
                 op: str) -> None:
        seen = [st for st in self.statuses.collect() if st.name in targets]
        self.book.saw(seen)  # the next sync into them may not ask again
        require_states(seen, allowed, op)

    def sleep(self, targets: list[str], level: int, pause_mode: PauseMode) -> SleepResult:
        t0 = time.perf_counter()
        self._require(targets, SLEEPABLE, "sleep")
        dl, e = self.reach.deadlines, self.reach.engines
        self.reach.phase("sleep", None)
        self.beat.sleeping(targets, True)
        ok, bad = e.each(targets, lambda n: e.sleep(n, level, pause_mode, lease_s=dl.lease,
                                                    deadline_s=dl.sleep), dl.sleep * 1.5)
        self.beat.sleeping(bad, False)
        if bad:
            logger.error("sleep failed on %s (asleep: %s)", sorted(bad), sorted(ok))
            raise next(iter(bad.values()))
        return SleepResult(level=level, seconds={"total": time.perf_counter() - t0},
                           engines=tuple(EngineSleepReport(engine=n, **r.model_dump())
                                         for n, r in ok.items()))

    def wake(self, targets: list[str], tags: Sequence[str] | None) -> list[EngineStatus]:
        self._require(targets, WAKEABLE, "wake up")
        dl, e = self.reach.deadlines, self.reach.engines
        ok, bad = e.each(targets, lambda n: e.wake_up(n, list(tags) if tags else None,
                                                      deadline_s=dl.wake), dl.wake * 1.5)
        self.beat.sleeping([n for n, st in ok.items() if st.state not in WAKEABLE], False)
        if bad:
            raise next(iter(bad.values()))
        return [ok[n] for n in targets]
