"""The colocated loop's half of the coordinator: the fleet sleeps after a rollout so the trainer
can use the engines' device memory, and wakes without a sync when asked. A ``sync`` then goes
straight into the sleeping engines (``weightsync.engine.dormancy`` on the engine side). Mixed
into ``SyncCoordinator``, whose engines, deadlines, lock and heartbeat it uses.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from weightsync.errors import ConfigError, IllegalStateError
from weightsync.messages import SleepReply
from weightsync.types import EngineSleepReport, EngineState, EngineStatus, PauseMode, SleepResult

logger = logging.getLogger(__name__)


class Colocation:
    """``sleep`` and ``wake`` for ``SyncCoordinator``."""

    def sleep(self, level: int = 1, *, engines: Sequence[str] | None = None,
              pause_mode: PauseMode = "abort") -> SleepResult:
        """Put the engines to sleep so the trainer can use their device memory: level 1
        offloads the weights to host memory, level 2 discards them (the next ``sync`` brings
        new ones); both release the KV cache. The next ``sync`` goes straight into the
        sleeping engines (wake weights -> transfer -> reload -> verify -> wake KV cache ->
        resume); ``wake`` wakes them without one.

        Every target must be serving or paused, or nothing is touched
        (``IllegalStateError``). The engines stay this coordinator's while it lives (its
        heartbeat renews their lease); if its process dies they serve again (level 1) or stay
        asleep fenced (level 2). On CPU, where vLLM has no sleep mode, engines only pause and
        each report says why nothing was freed."""
        if level not in (1, 2):
            raise ConfigError(f"sleep level must be 1 or 2, not {level}")
        with self._exclusive():
            t0 = time.perf_counter()
            targets = self._targets(engines)
            self._require(targets, {EngineState.SERVING, EngineState.PAUSED}, "sleep")
            dl = self.transfer.deadlines
            self._phase("sleep")
            self._beat.sleeping(targets, True)
            ok, bad = self.access.each(targets, lambda n: self.access.sleep(
                n, level, pause_mode, lease_s=dl.lease, deadline_s=dl.sleep), dl.sleep * 1.5)
            self._beat.sleeping(bad, False)
            if bad:
                logger.error("sleep failed on %s (asleep: %s)", sorted(bad), sorted(ok))
                raise next(iter(bad.values()))
            replies: dict[str, SleepReply] = ok
            return SleepResult(level=level, seconds={"total": time.perf_counter() - t0},
                               engines=tuple(EngineSleepReport(engine=n, **r.model_dump())
                                             for n, r in replies.items()))

    def wake(self, *, engines: Sequence[str] | None = None,
             tags: Sequence[str] | None = None) -> list[EngineStatus]:
        """Wake sleeping engines without a sync (``tags``: "weights" and/or "kv_cache"; all
        when None). They serve once both are awake; weights that sleep level 2 discarded
        cannot be served, so such an engine is fenced until a sync."""
        with self._exclusive():
            targets = self._targets(engines)
            self._require(targets, {EngineState.ASLEEP, EngineState.WEIGHTS_AWAKE}, "wake up")
            dl = self.transfer.deadlines
            ok, bad = self.access.each(targets, lambda n: self.access.wake_up(
                n, list(tags) if tags else None, deadline_s=dl.wake), dl.wake * 1.5)
            self._beat.sleeping([n for n, st in ok.items()
                                 if st.state not in (EngineState.ASLEEP,
                                                     EngineState.WEIGHTS_AWAKE)], False)
            if bad:
                raise next(iter(bad.values()))
            return [ok[n] for n in targets]

    def _require(self, targets: Sequence[str], allowed: set[EngineState], op: str) -> None:
        for st in self.statuses():
            if st.name in targets:  # the next sync into them may not ask again (_held_version)
                self._issued = max(self._issued, st.version_seen)
            if st.name in targets and st.state not in allowed:
                raise IllegalStateError(
                    f"cannot {op} while {st.state.value} (needs "
                    f"{'/'.join(sorted(s.value for s in allowed))}); no engine was touched",
                    engine=st.name)

