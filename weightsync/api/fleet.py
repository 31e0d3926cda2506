"""The control plane's view of the fleet: engine actors, the coordinator, one-at-a-time guard.

Routes talk to engines only through ``Fleet``. Actor calls are awaited (Ray ``ObjectRef``s are
awaitable) under a deadline, so the event loop never blocks; the synchronous coordinator runs
in the fleet's own worker thread (``Fleet.run``), never in the loop's default executor, which
stays free for everything else. Ray's wrapped exceptions come back as the library's typed
errors. Readers (``/status``, ``/engines``, the page) answer from ``Fleet.seen``: the statuses
last seen (``weightsync.api.view``), kept fresh by ``Fleet.watch`` and by every status the
service asks for, so they never wait on an engine.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar, cast

from weightsync.api.errors import UnknownEngineError
from weightsync.api.schemas import FleetStatus, SyncRecord
from weightsync.api.view import FleetView
from weightsync.coordination.states import require_states, unreachable
from weightsync.coordinator import SyncCoordinator
from weightsync.errors import DeadlineExceeded, SyncInProgressError
from weightsync.remote import unwrap
from weightsync.types import EngineState, EngineStatus, PauseMode, SyncResult, exclusive_phases

logger = logging.getLogger(__name__)

T = TypeVar("T")

STATUS_TIMEOUT_S = 10.0  # an engine that has not answered a status call by then shows stopped
WATCH_PERIOD_S = 0.5  # the background poll: what /status shows is at most this much older
STALE_S = 2.0  # with no poll running (an app without its lifespan), a read this old asks again
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
        self.view = FleetView(self.names)
        self._busy = threading.Lock()  # a reload or session holds the fleet (threads release it)
        self._executor: ThreadPoolExecutor | None = None  # Fleet.run's thread, made on first use
        self._refresh: asyncio.Task | None = None  # Fleet.seen's background ask, if one runs

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

    # the engine calls the control plane makes itself (syncs and reloads go through the
    # coordinator's typed seam, ``weightsync.remote.Engines``): one named method each
    async def engine_status(self, name: str) -> EngineStatus:
        return await self._call(name, self.actors[name].status.remote(), "status",
                                STATUS_TIMEOUT_S)

    async def pause(self, name: str, mode: PauseMode, *, timeout: float) -> EngineStatus:
        return await self._call(name, self.actors[name].pause.remote(mode), "pause", timeout)

    async def resume(self, name: str, *, timeout: float) -> EngineStatus:
        return await self._call(name, self.actors[name].resume.remote(), "resume", timeout)

    async def serve_openai(self, name: str, token: str, *, timeout: float = 120.0) -> str:
        """Start the engine's vLLM OpenAI app (or give it another token); its base URL."""
        return await self._call(name, self.actors[name].serve_openai.remote(token),
                                "serve_openai", timeout)

    async def _call(self, name: str, ref: Any, what: str, timeout: float) -> Any:
        """A started actor call awaited under ``timeout``, typed errors."""
        try:
            return await asyncio.wait_for(_awaited(ref), timeout)
        except TimeoutError as e:
            raise DeadlineExceeded(f"{what} gave no answer within {timeout:.1f}s",
                                   engine=name) from e
        except Exception as e:
            err = unwrap(e)
            err.engine = err.engine or name
            raise err from e

    async def each(self, names: Sequence[str], call: Callable[[str], Awaitable[T]], *,
                   what: str) -> dict[str, T]:
        """``call(name)`` (``what``, for the log) on every engine concurrently; wait for all,
        then raise the first error if any."""
        outs = await asyncio.gather(*(call(n) for n in names), return_exceptions=True)
        errors = [o for o in outs if isinstance(o, BaseException)]
        if errors:
            done = [n for n, o in zip(names, outs, strict=True)
                    if not isinstance(o, BaseException)]
            if done:
                logger.warning("%s: succeeded on %s, failed on %s", what, done,
                               [getattr(e, "engine", None) for e in errors])
            raise errors[0]
        return dict(zip(names, cast(list[T], outs), strict=True))

    async def statuses(self, names: Sequence[str] | None = None) -> list[EngineStatus]:
        """Every engine's status, asked now (and kept in ``view``); an engine that does not
        answer shows as stopped. For readers, ``seen`` answers without waiting."""
        asked = time.monotonic()

        async def one(name: str) -> EngineStatus:
            try:
                st = await self.engine_status(name)
            except Exception as e:  # noqa: BLE001 - shown, not raised: the page stays up
                st = unreachable(name, e)
            self.view.update([st], asked)  # as each answers: one silent engine holds no other
            return st

        return list(await asyncio.gather(*(one(n) for n in (list(names) if names
                                                             else self.names))))

    async def seen(self) -> list[EngineStatus]:
        """Every engine's status as last seen, without waiting on any engine (except before
        the first answers). With no ``watch`` running, a view older than ``STALE_S`` is asked
        again in the background; this read still answers from what is held."""
        held = self.view.statuses()
        if held is None:
            return await self.statuses()
        loop = asyncio.get_running_loop()
        if self.view.age() > STALE_S and (self._refresh is None or self._refresh.done()
                                          or self._refresh.get_loop() is not loop):
            self._refresh = loop.create_task(self.statuses())
        return held

    async def status(self) -> FleetStatus:
        """The fleet as last seen (``seen``): versions, busy, recent syncs."""
        return FleetStatus(version=self.coordinator.version, busy=self.busy,
                           engines=await self.seen(), recent=list(self.recent))

    async def watch(self, period_s: float = WATCH_PERIOD_S) -> None:
        """Ask every engine's status every ``period_s``, forever (the app's lifespan runs it
        as a task and cancels it): readers see changes made outside this service too."""
        while True:
            await self.statuses()  # never raises: an engine that does not answer is stopped
            await asyncio.sleep(period_s)

    async def run(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """``fn(*args, **kw)`` (a blocking coordinator call) in the fleet's own thread.

        Not ``asyncio.to_thread``: its default executor has min(32, cores + 4) threads (6 on
        two cores), shared with everything else in the process; a fleet-wide operation holds
        its thread for as long as the engines take. The fleet runs one such operation at a
        time (``claim``), so one thread is enough, and a second one covers the moment a
        finished call is handing its thread back."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ws-fleet")
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, functools.partial(fn, *args, **kw))

    def close(self) -> None:
        """Let the fleet's thread go (a call in flight finishes first, unawaited)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    async def require_states(self, names: Sequence[str], allowed: set[EngineState],
                             op: str) -> list[EngineStatus]:
        """Every engine in ``names`` is in an ``allowed`` state, or an ``IllegalStateError``
        (409) naming the first that is not. Checked before anything is touched."""
        statuses = await self.statuses(names)
        require_states(statuses, allowed, op)
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
