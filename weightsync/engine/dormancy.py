"""Sleep and wake for the colocated loop: an engine releases its device memory while the
trainer trains, and a sync goes straight into it.

vLLM's sleep mode (CUDA only; read in vLLM 0.24's ``CuMemAllocator`` and executor): level 1
backs the weights up to host memory, level 2 discards them; both release the KV cache. vLLM
sleeps only a fully awake engine (a sleep while anything is asleep is ignored) and resumes its
scheduler once nothing is asleep. Where there is no sleep mode (CPU) the engine only pauses and
the same states are kept, so the same loop runs there. ``SleepState`` is composed into
``weightsync.engine.host.EngineHost``, which decides the engine's state around it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from weightsync.engine import vllm_compat
from weightsync.engine.serving import ServingGate
from weightsync.errors import ConfigError
from weightsync.messages import GpuMemory, SleepReply
from weightsync.types import EngineState, PauseMode

TAGS = ("weights", "kv_cache")  # what vLLM's sleep mode releases, in the order it wakes them


@dataclass(frozen=True, slots=True)
class Found:
    """How a sync found the engine, so that one that ends before it changed the weights puts
    the engine back exactly so (asleep stays asleep, at its level)."""

    state: EngineState
    asleep: frozenset[str]
    sleep_level: int
    weights_intact: bool
    owner: str | None
    lease_s: float


class SleepState:
    """What sleep released on one engine and nothing woke yet (``asleep``, at ``level``), and
    whether its weights are intact: the one owner of both.

    ``weights_intact`` is false once a sleep discarded the weights (level 2 in vLLM's sleep
    mode) or a load began overwriting them, until new weights commit; each change has its own
    method. Calls into vLLM take the engine (``vllm_compat``); where vLLM has no sleep mode
    (``supported`` false) nothing is released and only the bookkeeping is kept."""

    def __init__(self, gate: ServingGate) -> None:
        self._gate = gate  # a vLLM sleep clears the caches the gate keeps track of
        self.supported = False
        self.level = 0
        self._asleep: set[str] = set()
        self._intact = True
        self.last_memory: GpuMemory | None = None  # right after a sync's sleep

    @property
    def asleep(self) -> frozenset[str]:
        return frozenset(self._asleep)

    @property
    def weights_intact(self) -> bool:
        return self._intact

    def found(self, state: EngineState, owner: str | None, lease_s: float) -> Found:
        """How a sync finds the engine now, to put it back so if it ends before changing it."""
        return Found(state, frozenset(self._asleep), self.level, self._intact, owner, lease_s)

    # ---- whether the weights are intact: one method per change ------------------------------
    def overwriting(self) -> bool:
        """A load begins changing the weights (from its first byte until a commit); returns
        whether they were intact before it, for ``load_refused``."""
        was, self._intact = self._intact, False
        return was

    def load_refused(self, was: bool) -> None:
        """The load was refused before it applied any tensor: the weights are as they were."""
        self._intact = was

    def committed(self) -> None:
        """New weights were committed: they are what the engine serves."""
        self._intact = True

    # ---- sleep and wake --------------------------------------------------------------------
    async def sleep(self, engine: Any, level: int, mode: PauseMode, deadline_s: float) -> None:
        """vLLM's sleep: level 1 offloads the weights to host memory, level 2 discards them;
        both release the KV cache. Where there is no sleep mode (CPU) nothing is released,
        and what is "asleep" is only bookkept, so the state machine is the same."""
        if self.supported:
            await asyncio.wait_for(vllm_compat.sleep(engine, level, mode), deadline_s)
            self._intact = self._intact and level == 1
            self._gate.caches_cleared()  # vLLM pauses with clear_cache before it sleeps
        self.level = level
        self._asleep = set(TAGS)

    async def sleep_serving(self, engine: Any, level: int, mode: PauseMode, deadline_s: float,
                            *, memory: Callable[[], Awaitable[GpuMemory]], where: str,
                            fence: Callable[[str], None]) -> SleepReply:
        """Sleep an engine whose gate just closed, for a colocated trainer's step: admitted
        requests reach vLLM first, and the sleep returns once none runs. Without sleep mode
        the engine pauses instead and the reply says why nothing was released (``where``: the
        engine and its device). A sleep that fails part-way ``fence``s the engine."""
        before = await memory() if self.supported else GpuMemory()
        t = time.perf_counter()
        skipped: tuple[str, ...] = ()
        try:
            await self._gate.all_in_engine(deadline_s)
            if self.supported:
                await self.sleep(engine, level, mode, deadline_s)
                await self._gate.none_running(deadline_s)
            else:
                await self._gate.pause(engine, mode, deadline_s)
                await self.sleep(engine, level, mode, deadline_s)
                skipped = ((f"sleep: sleep mode is CUDA-only; {where}, so it paused and keeps "
                            "its weights and KV cache in memory"),)
        except Exception as e:
            fence(f"sleep at level {level} failed part-way: {e}")
            raise
        seconds = {"sleep": time.perf_counter() - t}
        after = self.last_memory = await memory() if self.supported else GpuMemory()
        freed = None if after.free is None or before.free is None else after.free - before.free
        return SleepReply(level=level, freed_bytes=freed, free_after=after.free,
                          seconds=seconds, skipped=skipped)

    async def make_resident(self, engine: Any, sleep_level: int, mode: PauseMode,
                            deadline_s: float, *, asleep: bool,
                            memory: Callable[[], Awaitable[GpuMemory]], where: str
                            ) -> tuple[dict[str, float], list[str]]:
        """A sync's start: pause a serving engine (``sleep_level``: and sleep it, level 2 to
        free the weights' memory for the transfer), then wake the weights for the transfer;
        an engine asleep already is paused since it fell asleep, and only its weights wake (the
        KV cache wakes at the commit). ``asleep``: the engine's state says it sleeps. Returns
        the seconds of each phase and what was skipped."""
        seconds: dict[str, float] = {}
        skipped: list[str] = []
        if asleep:
            if sleep_level:  # paused since it fell asleep; nothing to pause or sleep
                skipped.append(f"sleep: already asleep at level {self.level}")
        else:
            t = time.perf_counter()
            # Requests that passed the gate just before it closed may not have reached vLLM
            # yet: pausing now would park them unstarted and stamp them with both versions
            # although the new weights produce all their tokens. Let them in first; the pause
            # mode then decides their fate like any other request in flight.
            await self._gate.all_in_engine(deadline_s)
            await self._gate.pause(engine, mode, deadline_s)
            seconds["pause"] = time.perf_counter() - t
            if sleep_level and not self._asleep and self.supported:
                t = time.perf_counter()
                await self.sleep(engine, sleep_level, mode, deadline_s)
                seconds["sleep"] = time.perf_counter() - t
                self.last_memory = await memory()
            elif sleep_level and not self._asleep:
                skipped.append(f"sleep/wake: sleep mode is CUDA-only; {where}")
        if "weights" in self._asleep:
            t = time.perf_counter()
            await self.wake(engine, ["weights"], deadline_s)
            seconds["wake_weights"] = time.perf_counter() - t
        return seconds, skipped

    @staticmethod
    def check_sleep(level: int, mode: str, engine_name: str) -> None:
        """A sleep's arguments, checked before anything changes."""
        if level not in (1, 2):
            raise ConfigError(f"sleep level must be 1 or 2, not {level}", engine=engine_name)
        if mode == "keep":
            raise ConfigError("pause mode 'keep' cannot hold requests through sleep: their KV "
                              "cache is released; use 'abort' or 'wait'", engine=engine_name)

    def check_tags(self, tags: Sequence[str] | None, engine_name: str) -> None:
        unknown = set(tags or ()) - set(TAGS)
        if unknown:
            raise ConfigError(f"unknown sleep tag(s) {sorted(unknown)}; known: {list(TAGS)}",
                              engine=engine_name)

    async def wake(self, engine: Any, tags: Sequence[str], deadline_s: float) -> None:
        """Wake what of ``tags`` is asleep (vLLM resumes its scheduler once nothing is)."""
        waking = [t for t in TAGS if t in tags and t in self._asleep]
        if waking and self.supported:
            await asyncio.wait_for(vllm_compat.wake_up(engine, waking), deadline_s)
        self._asleep -= set(waking)
        if not self._asleep:
            self.level = 0

    async def wake_and_resume(self, engine: Any, deadline_s: float) -> dict[str, float]:
        """Wake what is asleep and resume serving. vLLM resumes its scheduler itself once a
        wake leaves nothing asleep (``vllm_compat.WAKE_RESUMES``): no call of its own then."""
        seconds: dict[str, float] = {}
        woke = bool(self._asleep) and self.supported
        if self._asleep:
            t = time.perf_counter()
            kv_only = self._asleep == {"kv_cache"}
            await self.wake(engine, TAGS, deadline_s)
            seconds["wake_kv" if kv_only else "wake"] = time.perf_counter() - t
        if not (woke and vllm_compat.WAKE_RESUMES):
            t = time.perf_counter()
            await asyncio.wait_for(vllm_compat.resume_generation(engine), deadline_s)
            seconds["resume"] = time.perf_counter() - t
        return seconds

    async def put_back(self, engine: Any, found: Found, deadline_s: float) -> None:
        """Put an engine a failed sync had woken back to sleep as it was found. vLLM sleeps
        only a fully awake engine, so wake the rest first; what it then discards holds no
        weights of the version it served (level 2) or is backed up again (level 1)."""
        if set(found.asleep) - self._asleep:
            await self.wake(engine, TAGS, deadline_s)
            await self.sleep(engine, found.sleep_level, "abort", deadline_s)
            await self.wake(engine, [t for t in TAGS if t not in found.asleep], deadline_s)
        self._intact = found.weights_intact
