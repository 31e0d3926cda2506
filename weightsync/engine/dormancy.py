"""Sleep and wake for the colocated loop: an engine releases its device memory while the
trainer trains, and a sync goes straight into it.

vLLM's sleep mode (CUDA only; read in vLLM 0.24's ``CuMemAllocator`` and executor): level 1
backs the weights up to host memory, level 2 discards them; both release the KV cache. vLLM
sleeps only a fully awake engine (a sleep while anything is asleep is ignored) and resumes its
scheduler once nothing is asleep. Where there is no sleep mode (CPU) the engine only pauses and
the same states are kept, so the same loop runs there. Mixed into
``weightsync.engine.host.EngineHost``, whose state it reads.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from weightsync.engine import vllm_compat
from weightsync.errors import ConfigError, IllegalStateError
from weightsync.messages import GpuMemory, SleepReply
from weightsync.types import EngineState, EngineStatus, PauseMode

logger = logging.getLogger(__name__)

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


class Dormancy:
    """Sleep, wake, and putting a sleeping engine back (``EngineHost`` sets up ``_asleep``,
    ``sleep_level``, ``weights_intact``, ``last_sleep_memory``)."""

    async def _sleep(self, level: int, mode: PauseMode, deadline_s: float) -> None:
        """vLLM's sleep: level 1 offloads the weights to host memory, level 2 discards them;
        both release the KV cache. Where there is no sleep mode (CPU) nothing is released,
        and what is "asleep" is only bookkept, so the state machine is the same."""
        if self.sleep_supported:
            await asyncio.wait_for(vllm_compat.sleep(self.engine, level, mode), deadline_s)
            self.weights_intact = self.weights_intact and level == 1
            self._caches_clean = True  # vLLM pauses with clear_cache before it sleeps
        self.sleep_level = level
        self._asleep = set(TAGS)

    async def _wake(self, tags: Sequence[str], deadline_s: float) -> None:
        """Wake what of ``tags`` is asleep (vLLM resumes its scheduler once nothing is)."""
        waking = [t for t in TAGS if t in tags and t in self._asleep]
        if waking and self.sleep_supported:
            await asyncio.wait_for(vllm_compat.wake_up(self.engine, waking), deadline_s)
        self._asleep -= set(waking)
        if not self._asleep:
            self.sleep_level = 0

    async def _wake_and_resume(self, deadline_s: float) -> dict[str, float]:
        """Wake what is asleep and resume serving. vLLM resumes its scheduler itself once a
        wake leaves nothing asleep (``vllm_compat.WAKE_RESUMES``): no call of its own then."""
        seconds: dict[str, float] = {}
        woke = bool(self._asleep) and self.sleep_supported
        if self._asleep:
            t = time.perf_counter()
            kv_only = self._asleep == {"kv_cache"}
            await self._wake(TAGS, deadline_s)
            seconds["wake_kv" if kv_only else "wake"] = time.perf_counter() - t
        if not (woke and vllm_compat.WAKE_RESUMES):
            t = time.perf_counter()
            await asyncio.wait_for(vllm_compat.resume_generation(self.engine), deadline_s)
            seconds["resume"] = time.perf_counter() - t
        return seconds

    async def _sleep_again(self, found: Found, deadline_s: float) -> None:
        """Put an engine a failed sync had woken back to sleep as it was found. vLLM sleeps
        only a fully awake engine, so wake the rest first; what it then discards holds no
        weights of the version it served (level 2) or is backed up again (level 1)."""
        woke = set(found.asleep) - self._asleep
        if woke:
            await self._wake(TAGS, deadline_s)
            await self._sleep(found.sleep_level, "abort", deadline_s)
            await self._wake([t for t in TAGS if t not in found.asleep], deadline_s)
        self.weights_intact = found.weights_intact
        self.state = found.state
        if found.owner is not None:
            self._hold(found.owner, found.lease_s)

    async def memory_after_sleep(self) -> GpuMemory | None:
        """``gpu_memory()`` as read right after the last sync's sleep (None if none slept)."""
        return self.last_sleep_memory

    async def sleep(self, level: int, mode: PauseMode = "abort", *, owner: str = "",
                    lease_s: float = 0.0, deadline_s: float = 60.0) -> SleepReply:
        """Stop serving and release device memory for a colocated trainer's step: level 1
        offloads the weights to host memory, level 2 discards them (the next sync brings new
        ones); both release the KV cache. A sync goes straight into the sleeping engine and
        wakes it; ``wake_up`` wakes it without one.

        Where vLLM has no sleep mode (CPU) the engine only pauses, reports why nothing was
        released, and follows the same states, so the same loop runs there.

        With ``owner`` the sleep belongs to that coordinator for ``lease_s`` (renewed while its
        trainer lives); if it goes silent the engine serves again (level 1) or, its weights
        gone, stays asleep fenced (level 2). A sleep that fails part-way fences the engine."""
        if level not in (1, 2):
            raise ConfigError(f"sleep level must be 1 or 2, not {level}", engine=self.spec.name)
        if mode == "keep":
            raise ConfigError("pause mode 'keep' cannot hold requests through sleep: their KV "
                              "cache is released; use 'abort' or 'wait'", engine=self.spec.name)
        self._expect(EngineState.SERVING, EngineState.PAUSED, op="sleep")
        seconds: dict[str, float] = {}
        skipped: tuple[str, ...] = ()
        self._serving.clear()
        before = await self.gpu_memory() if self.sleep_supported else GpuMemory()
        t = time.perf_counter()
        try:
            await asyncio.wait_for(self._all_in_engine.wait(), deadline_s)
            if self.sleep_supported:
                await self._sleep(level, mode, deadline_s)
                await asyncio.wait_for(self._none_running.wait(), deadline_s)
            else:
                await self._pause(mode, deadline_s)
                await self._sleep(level, mode, deadline_s)
                skipped = (f"sleep: sleep mode is CUDA-only; engine {self.spec.name} runs on "
                           f"{self.device}, so it paused and keeps its weights and KV cache "
                           "in memory",)
        except Exception as e:
            self.fence(f"sleep at level {level} failed part-way: {e}")
            raise
        seconds["sleep"] = time.perf_counter() - t
        after = await self.gpu_memory() if self.sleep_supported else GpuMemory()
        self.last_sleep_memory = after
        self.state = EngineState.ASLEEP
        self._hold(owner, lease_s)
        freed = None if after.free is None or before.free is None else after.free - before.free
        return SleepReply(level=level, freed_bytes=freed, free_after=after.free,
                          seconds=seconds, skipped=skipped)

    async def wake_up(self, tags: list[str] | None = None, *, owner: str | None = None,
                      deadline_s: float = 60.0) -> EngineStatus:
        """Wake what ``tags`` names (None: everything). Serving resumes once both the weights
        and the KV cache are awake. Weights that sleep discarded (level 2) are undefined until
        a sync brings new ones: waking them is allowed (a sync can follow), serving them is
        not, so the engine is fenced instead of resuming."""
        self._expect(EngineState.ASLEEP, EngineState.WEIGHTS_AWAKE, op="wake up")
        if self._lease.held_by_other(owner) and self._lease.owner is not None:
            raise IllegalStateError(f"asleep for {self._lease.owner}, not {owner}",
                                    engine=self.spec.name)
        unknown = set(tags or ()) - set(TAGS)
        if unknown:
            raise ConfigError(f"unknown sleep tag(s) {sorted(unknown)}; known: {list(TAGS)}",
                              engine=self.spec.name)
        await self._wake(tags or TAGS, deadline_s)
        if not self._asleep:
            self._lease.release()
            if not self.weights_intact:
                self.fence("woken after sleep level 2 without new weights: weights undefined")
                return self.status()
            await vllm_compat.resume_generation(self.engine)
            self.state = EngineState.SERVING
            self._serving.set()
        elif "weights" not in self._asleep:
            self.state = EngineState.WEIGHTS_AWAKE
        return self.status()
