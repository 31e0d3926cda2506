"""Real vLLM engines with one behaviour changed for a test, built by ``make_engine``
(``EngineHost(spec, make_engine=...)``, ``start_engines(..., make_engine=...)``), so the host
itself carries no test switches."""

from __future__ import annotations

from typing import Any

from weightsync.engine import vllm_compat, vllm_lora


class CacheKeepingEngine:
    """vLLM's engine whose cache clears and resets do nothing during a sync: a sync then
    neither clears its prefix, multimodal and encoder caches at the pause nor resets them
    after the load, so a test can show that stale caches are real (``tests/gpu/
    test_vl_gpu.py``). Between syncs (from the resume to the next pause) a reset is vLLM's
    own, so the host's ``reset_caches`` shows the reset alone brings the new weights in.
    Sleep levels 1 and 2 still clear the caches inside vLLM: such a test syncs with
    ``sleep_level=0``. Everything else is the engine's own."""

    # without these, vllm_compat.pause_generation goes through pause_generation below
    engine_core = None
    renderer = None

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self._syncing = False  # paused for a sync: resets do nothing until the resume

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    async def pause_generation(self, *, mode: str = "abort", clear_cache: bool = True) -> None:
        self._syncing = True
        await self._engine.pause_generation(mode=mode, clear_cache=False)

    async def resume_generation(self) -> None:
        await self._engine.resume_generation()
        self._syncing = False

    async def reset_prefix_cache(self, *args: Any, **kwargs: Any) -> bool:
        return True if self._syncing else bool(
            await self._engine.reset_prefix_cache(*args, **kwargs))

    async def reset_mm_cache(self) -> None:
        if not self._syncing:
            await self._engine.reset_mm_cache()

    async def reset_encoder_cache(self) -> None:
        if not self._syncing:
            await self._engine.reset_encoder_cache()


def cache_keeping_engine(**engine_args: Any) -> CacheKeepingEngine:
    """``make_engine`` for a ``CacheKeepingEngine`` around vLLM's ``AsyncLLM``."""
    return CacheKeepingEngine(vllm_compat.make_async_engine(**engine_args))


COLD_ADAPTER = "weightsync_cold_adapter"  # the SamplingParams.extra_args key ColdAdapterEngine reads


class ColdAdapterEngine:
    """vLLM's engine that serves a request whose sampling parameters carry
    ``extra_args={COLD_ADAPTER: <directory>}`` with the peft adapter saved in that directory,
    loaded the way vLLM loads one itself: a ``LoRARequest`` naming the directory, read from
    disk on first use (its own name and id, never one of the host's). That is the cold-load
    oracle an adapter synced from memory is compared with (``tests/integration/
    test_lora_cpu.py``). Everything else is the engine's own."""

    FIRST_ID = 1_000_000  # far above the ids the host gives its versions

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self._ids: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def generate(self, prompt: Any, params: Any, *, request_id: str, **kwargs: Any) -> Any:
        path = (getattr(params, "extra_args", None) or {}).get(COLD_ADAPTER)
        if path is not None:
            lora_id = self._ids.setdefault(path, self.FIRST_ID + len(self._ids))
            kwargs["lora_request"] = vllm_lora.lora_request(f"cold:{path}", lora_id, path)
        return self._engine.generate(prompt, params, request_id=request_id, **kwargs)


def cold_adapter_engine(**engine_args: Any) -> ColdAdapterEngine:
    """``make_engine`` for a ``ColdAdapterEngine`` around vLLM's ``AsyncLLM``."""
    return ColdAdapterEngine(vllm_compat.make_async_engine(**engine_args))
