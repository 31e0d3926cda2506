"""How an engine host is built: the engine's arguments from its ``EngineSpec``, and the host's
options, fixed at construction, never changed by a call on the running actor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from weightsync.config import EngineSpec

WORKER_EXTENSION = "weightsync.engine.worker_ext.WeightSyncWorkerExtension"


@dataclass(frozen=True, slots=True)
class HostOptions:
    """``keep_caches`` is for tests only: a sync then neither clears vLLM's caches at the
    pause nor resets them after the load, so a test can show that stale encoder / prefix
    caches are real (``tests/gpu/test_vl_gpu.py``). Sleep levels 1 and 2 still clear caches
    inside vLLM, so such a test syncs with ``sleep_level=0``. Production never sets it."""

    keep_caches: bool = False


def engine_args(spec: EngineSpec, device: str, sleep_mode: bool) -> dict[str, Any]:
    """The keyword arguments an engine host builds its engine with
    (``vllm_compat.make_async_engine``, or a stand-in's factory)."""
    return dict(
        model=spec.model, dtype=spec.dtype, max_model_len=spec.max_model_len, seed=spec.seed,
        enforce_eager=spec.enforce_eager, tensor_parallel_size=spec.tensor_parallel_size,
        gpu_memory_utilization=spec.gpu_memory_utilization, enable_sleep_mode=sleep_mode,
        worker_extension_cls=WORKER_EXTENSION, limit_mm_per_prompt=spec.limit_mm_per_prompt,
        kv_cache_bytes=int(spec.cpu_kvcache_gib * (1 << 30)) if device == "cpu" else None,
        engine_args=spec.engine_args,
    )
