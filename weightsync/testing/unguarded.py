"""TEST ONLY: a real vLLM engine that takes syncs weightsync refuses for its model
(``vllm_compat.reload_refusal``), to measure what such a sync leaves behind.

``unguarded_engine()`` is a ``make_engine`` (``start_engines(..., make_engine=...)``): vLLM's
``AsyncLLM`` with ``UnguardedWorkerExtension``, weightsync's worker extension without the
refusal. A refusal stands on a measurement (an FP8 MoE engine answered apart from a cold
one after verified syncs); this is how the GPU suite repeats that measurement on each vLLM,
tensor by tensor (``engine.kernel_reads``), to find its cause or to lift the refusal.
"""

from __future__ import annotations

from typing import Any

from weightsync.engine import vllm_compat
from weightsync.engine.worker_ext import WeightSyncWorkerExtension

EXTENSION = f"{__name__}.UnguardedWorkerExtension"


class UnguardedWorkerExtension(WeightSyncWorkerExtension):
    """weightsync's worker extension, taking loads it would refuse."""

    def _refuse_unreloadable(self) -> None:
        return None


def _make(**engine_args: Any) -> Any:
    return vllm_compat.make_async_engine(**{**engine_args, "worker_extension_cls": EXTENSION})


def unguarded_engine() -> Any:
    """``make_engine`` for vLLM's engine with ``UnguardedWorkerExtension``."""
    return _make
