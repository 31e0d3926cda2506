"""The serving half of an engine host: requests in, versions stamped, and the pause that waits
for exactly what it must.

A request passes the serving gate, is admitted, reaches vLLM, and comes back stamped with the
weight version(s) that produced it. A sync closes the gate, lets admitted requests reach vLLM,
pauses it (abort, wait or keep), and waits for the final outputs of what it aborted or drained
— no fixed sleep. Mixed into ``weightsync.engine.host.EngineHost``, whose state it reads.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from weightsync.engine import vllm_compat
from weightsync.errors import EngineError, FencedError
from weightsync.types import EngineState, GenerationResult, PauseMode


class Serving:
    """Requests and the pause (``EngineHost`` sets up ``_serving``, ``_admitted``,
    ``_all_in_engine``, ``_running``, ``_none_running`` and ``_caches_clean``)."""

    async def generate(self, prompts: list[Any], *, max_tokens: int = 16,
                       temperature: float = 0.0, logprobs: bool = False, seed: int | None = None,
                       ignore_eos: bool = False, n: int = 1,
                       wait_s: float = 300.0) -> list[GenerationResult]:
        """Generate for each prompt (a string, or a vLLM prompt dict with multimodal data).

        Requests that arrive during a sync wait for it and run on the new weights; each result
        names the version(s) that produced it.
        """
        self._require_routable()
        try:
            await asyncio.wait_for(self._serving.wait(), wait_s)
        except TimeoutError as e:
            raise EngineError(f"engine not serving after {wait_s}s (state {self.state.value})",
                              engine=self.spec.name) from e
        self._require_routable()
        self._admit(len(prompts) * n)  # no await since the gate: begin_sync will wait for them

        def params(i: int):  # a seeded request with n copies: copy i uses seed + i
            return vllm_compat.sampling_params(
                max_tokens=max_tokens, temperature=temperature, logprobs=0 if logprobs else None,
                seed=None if seed is None else seed + i, ignore_eos=ignore_eos)

        return list(await asyncio.gather(*(self._one(p, params(i))
                                           for p in prompts for i in range(n))))

    def _admit(self, k: int) -> None:
        self._admitted += k
        if self._admitted:
            self._all_in_engine.clear()

    def _in_engine(self) -> None:
        self._admitted -= 1
        if not self._admitted:
            self._all_in_engine.set()

    async def _one(self, prompt: Any, params: Any) -> GenerationResult:
        v0 = self.version
        final = None
        self._running += 1
        self._none_running.clear()
        self._caches_clean = False  # what it computes may be cached from here on
        try:
            async for out in vllm_compat.generate(self.engine, prompt, params,
                                                  request_id=uuid.uuid4().hex):
                if final is None:
                    self._in_engine()  # its first output: vLLM is running it
                final = out
        finally:
            if final is None:
                self._in_engine()
            self._running -= 1
            if not self._running:
                self._none_running.set()
        v1 = self.version
        c = vllm_compat.completion(final)
        return GenerationResult(
            prompt=prompt if isinstance(prompt, str) else None, text=c.text,
            token_ids=c.token_ids, logprobs=c.logprobs, finish_reason=c.finish_reason,
            version=v0 if v0 == v1 else None, versions=(v0, v1),
            aborted=c.finish_reason == "abort",
        )

    async def _pause(self, mode: PauseMode, deadline_s: float, clear_cache: bool = True) -> None:
        """Pause vLLM, then wait until every request it aborted or drained has its final
        output (so each is stamped with the version that produced it), and no longer: an idle
        pause costs what vLLM's own steps cost. Requests frozen by ``keep`` finish after the
        sync, on the new weights.

        ``clear_cache``: vLLM clears its prefix, multimodal and encoder caches (and preempts
        kept requests) as it pauses, unless no request has run since it last did: its prefix
        cache reset walks every KV block in Python (vLLM 0.24 ``BlockPool``; ~280k blocks for
        a 0.5B model at a 0.4 share of an H200), which is most of a pause there."""
        clear = clear_cache and not self._caches_clean
        await asyncio.wait_for(vllm_compat.pause_generation(self.engine, mode,
                                                            clear_cache=clear), deadline_s)
        if clear:
            self._caches_clean = True
        if mode != "keep":
            await asyncio.wait_for(self._none_running.wait(), deadline_s)

    def _require_routable(self) -> None:
        if self.state == EngineState.FENCED:
            raise FencedError(f"fenced: {self.fenced_reason}", engine=self.spec.name)
        if self.state in (EngineState.STARTING, EngineState.STOPPED):
            raise EngineError(f"engine is {self.state.value}", engine=self.spec.name)
