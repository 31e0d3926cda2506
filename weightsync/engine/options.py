"""How an engine host is built, beyond its ``EngineSpec``: fixed at construction, never changed
by a call on the running actor."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class HostOptions:
    """``keep_caches`` is for tests only: a sync then neither clears vLLM's caches at the
    pause nor resets them after the load, so a test can show that stale encoder / prefix
    caches are real (``tests/gpu/test_vl_gpu.py``). Sleep levels 1 and 2 still clear caches
    inside vLLM, so such a test syncs with ``sleep_level=0``. Production never sets it."""

    keep_caches: bool = False
