"""The control plane's view of the fleet: engine actors, the coordinator, one-at-a-time guard.

Routes talk to engines only through ``Fleet``. Actor calls are awaited (Ray ``ObjectRef``s are
awaitable) under a deadline, so the event loop never blocks; the synchronous coordinator runs
in a worker thread. Ray's wrapped exceptions come back as the library's typed errors.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from weightsync.api.errors import UnknownEngineError
from weightsync.api.schemas import SyncRecord
from weightsync.coordinator import SyncCoordinator
from weightsync.errors import DeadlineExceeded, IllegalStateError, SyncInProgressError
from weightsync.remote import unwrap
from weightsync.types import EngineState, EngineStatus, SyncResult, exclusive_phases

logger = logging.getLogger(__name__)

STATUS_TIMEOUT_S = 10.0  # a status probe never waits long: the page and /status stay live
# a reload or sync session may begin (into sleeping engines too: the colocated loop)
SYNCABLE = {EngineState.SERVING, EngineState.FENCED, EngineState.ASLEEP,
            EngineState.WEIGHTS_AWAKE}


class Fleet:
    """Engine actors by name, the coordinator over them, and what the service has seen."""

    def __init__(self, actors: Mapping[str, Any], coordinator: SyncCoordinator,
                 history: int = 32) -> None:
        self.actors = dict(actors)
        self.coordinator = coordinator
        self.recent: deque[SyncRecord] = deque(maxlen=history)
        self._busy = threading.Lock()  # a reload or session holds the fleet (threads release it)

    @classmethod
    async def connect(cls, actors: Sequence[Any], coordinator_factory) -> Fleet:
        """Build the coordinator (it blocks on Ray) in a worker thread."""
        coord = await asyncio.to_thread(coordinator_factory, list(actors))
        return cls(coord.engines, coord)

    # ---- engines ---------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.actors)

    def resolve(self, names: Sequence[str] | None) -> list[str]:
        """The named engines (all when None); an unknown name is a 404."""
        if not names:
            return self.names
        unknown = [n for n in dict.fromkeys(names) if n not in self.actors]
        if unknown:
            raise UnknownEngineError(f"unknown engine(s) {unknown}; known: {self.names}",
                                     engine=unknown[0])
        return list(dict.fromkeys(names))

    async def call(self, name: str, method: str, *args: Any, timeout: float, **kw: Any) -> Any:
        """``actor.method.remote(*args, **kw)`` awaited under ``timeout``, typed errors."""
        ref = getattr(self.actors[name], method).remote(*args, **kw)
        try:
            return await asyncio.wait_for(_awaited(ref), timeout)
        except TimeoutError as e:
            raise DeadlineExceeded(f"{method} gave no answer within {timeout:.1f}s",
                                   engine=name) from e
        except Exception as e:  # noqa: BLE001 - classified into the hierarchy
            err = unwrap(e)
            err.engine = err.engine or name
            raise err from e

    async def each(self, names: Sequence[str], method: str, *args: Any, timeout: float,
                   **kw: Any) -> dict[str, Any]:
        """Call every engine concurrently; wait for all, then raise the first error if any."""
        outs = await asyncio.gather(*(self.call(n, method, *args, timeout=timeout, **kw)
                                      for n in names), return_exceptions=True)
        errors = [o for o in outs if isinstance(o, BaseException)]
        if errors:
            done = [n for n, o in zip(names, outs, strict=True)
                    if not isinstance(o, BaseException)]
            if done:
                logger.warning("%s: succeeded on %s, failed on %s", method, done,
                               [getattr(e, "engine", None) for e in errors])
            raise errors[0]
        return dict(zip(names, outs, strict=True))

    async def statuses(self, names: Sequence[str] | None = None) -> list[EngineStatus]:
        """Every engine's status; an engine that does not answer shows as stopped."""
        names = list(names) if names else self.names
        outs = await asyncio.gather(*(self.call(n, "status", timeout=STATUS_TIMEOUT_S)
                                      for n in names), return_exceptions=True)
        return [o if isinstance(o, EngineStatus) else EngineStatus(
                    name=n, state=EngineState.STOPPED, version=-1, device="?",
                    sleep_supported=False, fenced_reason=str(o), model="?")
                for n, o in zip(names, outs, strict=True)]

    async def require_states(self, names: Sequence[str], allowed: set[EngineState],
                             op: str) -> list[EngineStatus]:
        """Every engine in ``names`` is in an ``allowed`` state, or an ``IllegalStateError``
        (409) naming the first that is not. Checked before anything is touched."""
        statuses = await self.statuses(names)
        for st in statuses:
            if st.state not in allowed:
                raise IllegalStateError(
                    f"cannot {op} while {st.state.value} (needs "
                    f"{'/'.join(sorted(s.value for s in allowed))}); no engine was touched",
                    engine=st.name)
        return statuses

    # ---- fleet-wide operations ---------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self._busy.locked()

    def claim(self) -> None:
        """Take the fleet for one reload or sync session, or fail at once with a 409.

        Covers the whole request (checkpoint validation included), not only the coordinator's
        own critical section: two overlapping requests can never both get past this point.
        """
        if not self._busy.acquire(blocking=False):
            raise SyncInProgressError("a reload or sync session is already running on this fleet")

    def release(self) -> None:
        self._busy.release()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        self.claim()
        try:
            yield
        finally:
            self.release()

    def record(self, result: SyncResult) -> None:
        """Remember a sync for the status page: per phase, the slowest engine's seconds."""
        phases: dict[str, float] = {}
        for rep in result.engines:
            for phase, s in exclusive_phases(rep.seconds).items():
                phases[phase] = max(phases.get(phase, 0.0), s)
        self.recent.append(SyncRecord(version=result.version, mode=result.mode, ok=result.ok,
                                      at=time.time(), seconds=phases))


async def _awaited(ref: Any) -> Any:
    return await ref
