"""The serving gate of an engine host: requests in, versions stamped, and the pause that waits
for exactly what it must.

A request passes the gate, is admitted, reaches vLLM, and comes back stamped with the weight
version(s) that produced it. A sync closes the gate, lets admitted requests reach vLLM, pauses
it (abort, wait or keep), and waits for the final outputs of what it aborted or drained — no
fixed sleep. The gate also knows whether vLLM's caches are clean: cleared (by a pause that
cleared them, or a sleep) with no request run since.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from weightsync.engine import vllm_compat
from weightsync.types import GenerationResult, PauseMode


class ServingGate:
    """Admission, the requests in flight, and cache cleanliness, for one engine.

    Invariants: ``admitted`` counts requests past the gate that vLLM has not started yet, and
    ``running`` those whose final output has not come back; the events that wait for each to
    reach 0 are set exactly when it is 0. ``caches_clean`` is true only between a clearing
    (``caches_cleared``) and the next request."""

    def __init__(self) -> None:
        self._open = asyncio.Event()
        self._admitted = 0
        self._all_in_engine = asyncio.Event()
        self._all_in_engine.set()
        self._running = 0
        self._none_running = asyncio.Event()
        self._none_running.set()
        # vLLM cleared its prefix, multimodal and encoder caches (pause or sleep) and no request
        # has run since: a reset (after loading, or at the next pause) would find them empty
        self._caches_clean = False

    # ---- the gate ----------------------------------------------------------------------------
    def open(self) -> None:
        self._open.set()

    def close(self) -> None:
        self._open.clear()

    @property
    def is_open(self) -> bool:
        return self._open.is_set()

    async def wait_open(self, wait_s: float) -> None:
        """Until the gate opens (``TimeoutError`` after ``wait_s``)."""
        await asyncio.wait_for(self._open.wait(), wait_s)

    @property
    def admitted(self) -> int:
        return self._admitted

    @property
    def running(self) -> int:
        return self._running

    @property
    def caches_clean(self) -> bool:
        return self._caches_clean

    def caches_cleared(self) -> None:
        """vLLM just cleared its caches (a pause that cleared them, or a sleep)."""
        self._caches_clean = True

    def admit(self, k: int) -> None:
        """``k`` requests passed the gate (no await between the gate and this)."""
        self._admitted += k
        if self._admitted:
            self._all_in_engine.clear()

    def _in_engine(self) -> None:
        self._admitted -= 1
        if not self._admitted:
            self._all_in_engine.set()

    async def all_in_engine(self, deadline_s: float) -> None:
        """Until every admitted request has reached vLLM."""
        await asyncio.wait_for(self._all_in_engine.wait(), deadline_s)

    async def none_running(self, deadline_s: float) -> None:
        """Until every request vLLM runs has its final output."""
        await asyncio.wait_for(self._none_running.wait(), deadline_s)

    # ---- requests and the pause ------------------------------------------------------------
    async def outputs(self, engine: Any, prompt: Any, params: Any, request_id: str,
                      **kwargs: Any) -> AsyncIterator[Any]:
        """One admitted request through vLLM: its outputs as vLLM yields them, counted in
        flight (``admitted`` until the first output, ``running`` until the last) and marking
        the caches dirty. Both ways in share it: ``run`` (Ray path) and the OpenAI app's
        engine client (``engine.gated_engine``); ``kwargs`` go to vLLM's ``generate``. A
        consumer that stops early (an HTTP client gone) closes vLLM's generator, which aborts
        the request in vLLM."""
        first = True
        self._running += 1
        self._none_running.clear()
        self._caches_clean = False  # what it computes may be cached from here on
        try:
            async with aclosing(vllm_compat.generate(engine, prompt, params, request_id,
                                                     **kwargs)) as stream:
                async for out in stream:
                    if first:
                        self._in_engine()  # its first output: vLLM is running it
                        first = False
                    yield out
        finally:
            if first:
                self._in_engine()
            self._running -= 1
            if not self._running:
                self._none_running.set()

    async def run(self, engine: Any, prompt: Any, params: Any, version: Callable[[], int],
                  adapter: tuple[str, Any] | None = None) -> GenerationResult:
        """One admitted request through vLLM, stamped with the version(s) that served it.
        ``adapter``: the LoRA adapter version's name and vLLM ``LoRARequest``."""
        v0 = version()
        final = None
        extra = {} if adapter is None else {"lora_request": adapter[1]}
        async for out in self.outputs(engine, prompt, params, uuid.uuid4().hex, **extra):
            final = out
        v1 = version()
        c = vllm_compat.completion(final)
        return GenerationResult(
            prompt=prompt if isinstance(prompt, str) else None, text=c.text,
            token_ids=c.token_ids, logprobs=c.logprobs, finish_reason=c.finish_reason,
            version=v0 if v0 == v1 else None, versions=(v0, v1),
            aborted=c.finish_reason == "abort", adapter=None if adapter is None else adapter[0],
        )

    async def pause(self, engine: Any, mode: PauseMode, deadline_s: float,
                    clear_cache: bool = True) -> None:
        """Pause vLLM, then wait until every request it aborted or drained has its final
        output (so each is stamped with the version that produced it), and no longer: an idle
        pause costs what vLLM's own steps cost. Requests frozen by ``keep`` finish after the
        sync, on the new weights.

        ``clear_cache``: vLLM clears its prefix, multimodal and encoder caches (and preempts
        kept requests) as it pauses, unless no request has run since it last did: its prefix
        cache reset walks every KV block in Python (vLLM 0.24 ``BlockPool``; ~280k blocks for
        a 0.5B model at a 0.4 share of an H200), which is most of a pause there."""
        clear = clear_cache and not self._caches_clean
        await asyncio.wait_for(vllm_compat.pause_generation(engine, mode, clear_cache=clear),
                               deadline_s)
        if clear:
            self._caches_clean = True
        if mode != "keep":
            await self.none_running(deadline_s)
