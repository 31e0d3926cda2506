"""How an engine host builds its engine: the engine's arguments from its ``EngineSpec``."""

from __future__ import annotations

from typing import Any

from weightsync.config import EngineSpec

WORKER_EXTENSION = "weightsync.engine.worker_ext.WeightSyncWorkerExtension"


def engine_args(spec: EngineSpec, device: str, sleep_mode: bool) -> dict[str, Any]:
    """The keyword arguments an engine host builds its engine with
    (``vllm_compat.make_async_engine``, or a stand-in's factory)."""
    return dict(
        model=spec.model, dtype=spec.dtype, max_model_len=spec.max_model_len, seed=spec.seed,
        enforce_eager=spec.enforce_eager, tensor_parallel_size=spec.tensor_parallel_size,
        gpu_memory_utilization=spec.gpu_memory_utilization, enable_sleep_mode=sleep_mode,
        worker_extension_cls=WORKER_EXTENSION, limit_mm_per_prompt=spec.limit_mm_per_prompt,
        kv_cache_bytes=_gib(spec.cpu_kvcache_gib if device == "cpu" else spec.gpu_kvcache_gib),
        engine_args=spec.engine_args,
    )


def _gib(size: float | None) -> int | None:
    return None if size is None else int(size * (1 << 30))
