"""``testing.engines.CacheKeepingEngine``: the clears and resets a sync asks of vLLM do
nothing, a reset between syncs is vLLM's own, everything else reaches the engine it wraps
(pure forwarding logic; the real use is ``tests/gpu/test_vl_gpu.py`` on a vLLM engine)."""

from __future__ import annotations

import asyncio

from weightsync.engine import vllm_compat
from weightsync.testing.engines import CacheKeepingEngine


class _Recording:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    async def pause_generation(self, *, mode: str = "abort", clear_cache: bool = True) -> None:
        self.calls.append(("pause", mode, clear_cache))

    async def resume_generation(self) -> None:
        self.calls.append(("resume",))

    async def reset_prefix_cache(self, **kw) -> bool:
        self.calls.append(("reset_prefix",))
        return True

    async def reset_mm_cache(self) -> None:
        self.calls.append(("reset_mm",))

    async def reset_encoder_cache(self) -> None:
        self.calls.append(("reset_encoder",))

    def get_tokenizer(self) -> str:
        return "the engine's own"


def test_a_sync_through_it_clears_and_resets_nothing_and_the_rest_is_the_engines():
    inner = _Recording()
    engine = CacheKeepingEngine(inner)

    async def sync_steps() -> bool:
        await vllm_compat.pause_generation(engine, "abort", clear_cache=True)
        return await vllm_compat.reset_caches(engine)

    assert asyncio.run(sync_steps()) is True
    assert inner.calls == [("pause", "abort", False)]  # paused, nothing cleared or reset
    assert vllm_compat.tokenizer(engine) == "the engine's own"


def test_a_reset_between_syncs_is_vllms_own():
    """The GPU test resets the caches after a sync to show the reset alone brings the new
    weights in: at 26e8953 that reset went to the no-ops too, and the test failed."""
    inner = _Recording()
    engine = CacheKeepingEngine(inner)

    async def sync_then_reset() -> bool:
        await vllm_compat.pause_generation(engine, "abort", clear_cache=True)
        await vllm_compat.reset_caches(engine)  # the sync's: kept
        await vllm_compat.resume_generation(engine)
        return await vllm_compat.reset_caches(engine)  # the host's reset_caches

    assert asyncio.run(sync_then_reset()) is True
    assert inner.calls == [("pause", "abort", False), ("resume",), ("reset_prefix",),
                           ("reset_mm",), ("reset_encoder",)]
