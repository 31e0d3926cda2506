"""How an engine host asks another engine of its fleet what became of an adapter commit both
took part in (``EngineHost.adapter_outcome``): the termination of a settle round whose
coordinator died part-way (``engine.adapters``). The peers are engine actors named in this
actor's Ray namespace; one that is gone, silent or not a Ray actor answers nothing."""

from __future__ import annotations

import asyncio
import logging

logger = logging.getLogger(__name__)


async def ask_outcome(peer: str, name: str, version: int, wait_s: float) -> str | None:
    """``peer``'s ``adapter_outcome(name, version)``, or None if it cannot answer."""
    import ray

    if not ray.is_initialized():  # an engine outside Ray (in-process): no peer to ask
        return None
    try:
        handle = await asyncio.to_thread(ray.get_actor, peer)
        ref = handle.adapter_outcome.remote(name, version)
        answer = await asyncio.wait_for(asyncio.wrap_future(ref.future()), wait_s)
    except Exception as e:  # noqa: BLE001 - gone or silent: it serves nothing of it
        logger.info("peer %s did not say what became of %s@v%d: %s", peer, name, version, e)
        return None
    return str(answer)
