"""Real vLLM engines with one behaviour changed for a test, built by ``make_engine``
(``EngineHost(spec, make_engine=...)``, ``start_engines(..., make_engine=...)``), so the host
itself carries no test switches."""

from __future__ import annotations

from typing import Any

from weightsync.engine import vllm_compat


class CacheKeepingEngine:
    """vLLM's engine whose cache clears and resets do nothing: a sync then neither clears its
    prefix, multimodal and encoder caches at the pause nor resets them after the load, so a
    test can show that stale caches are real (``tests/gpu/test_vl_gpu.py``). Sleep levels 1
    and 2 still clear them inside vLLM: such a test syncs with ``sleep_level=0``. Everything
    else is the engine's own."""

    # without these, vllm_compat.pause_generation goes through pause_generation below
    engine_core = None
    renderer = None

    def __init__(self, engine: Any) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    async def pause_generation(self, *, mode: str = "abort", clear_cache: bool = True) -> None:
        await self._engine.pause_generation(mode=mode, clear_cache=False)

    async def reset_prefix_cache(self, *args: Any, **kwargs: Any) -> bool:
        return True

    async def reset_mm_cache(self) -> None:
        return None

    async def reset_encoder_cache(self) -> None:
        return None


def cache_keeping_engine(**engine_args: Any) -> CacheKeepingEngine:
    """``make_engine`` for a ``CacheKeepingEngine`` around vLLM's ``AsyncLLM``."""
    return CacheKeepingEngine(vllm_compat.make_async_engine(**engine_args))
