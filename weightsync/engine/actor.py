"""The Ray actor that hosts one engine, and how to start or find one.

A thin wrapper: ``EngineHost`` holds the logic; Ray gives it a process, a name in a namespace
and (on GPU) a device. It is an async actor, so status and health calls interleave with a
running sync instead of queueing behind it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import ray

from weightsync.config import EngineSpec
from weightsync.engine.host import EngineHost

logger = logging.getLogger(__name__)

EngineActor = ray.remote(EngineHost)


def spawn_engine(spec: EngineSpec, *, namespace: str | None = None, detached: bool = False,
                 num_cpus: float = 0.0, runtime_env: dict | None = None,
                 make_engine: Callable[..., Any] | None = None) -> ray.actor.ActorHandle:
    """Start an engine actor named ``spec.name``; call ``.start.remote()`` to boot vLLM.

    ``num_cpus`` defaults to 0: vLLM's own processes do the work, the actor only steers them.
    ``make_engine``: what builds its engine from the spec's arguments (default vLLM's
    ``AsyncLLM``; a test passes a wrapped engine from ``weightsync.testing``), fixed for the
    actor's life.
    """
    opts: dict = dict(name=spec.name, num_cpus=num_cpus, num_gpus=spec.num_gpus,
                      max_concurrency=64)
    if spec.resources:
        opts["resources"] = dict(spec.resources)
    if namespace:
        opts["namespace"] = namespace
    if detached:
        opts["lifetime"] = "detached"
    if runtime_env:
        opts["runtime_env"] = runtime_env
    kwargs = {} if make_engine is None else {"make_engine": make_engine}
    return EngineActor.options(**opts).remote(spec, **kwargs)


def start_engines(specs: list[EngineSpec], *, timeout_s: float = 600.0, **kw) -> list:
    """Spawn and boot several engines in parallel; returns their handles once all serve."""
    actors = [spawn_engine(s, **kw) for s in specs]
    ray.get([a.start.remote() for a in actors], timeout=timeout_s)
    return actors


def stop_engines(actors: list[Any], timeout_s: float = 60.0) -> None:
    """Shut each engine down (vLLM stops its engine-core and worker processes), then end its
    actor. Best effort: an engine that does not answer is killed."""
    refs = [a.shutdown.remote() for a in actors]
    try:
        ray.get(refs, timeout=timeout_s)
    except Exception:
        logger.warning("engine shutdown did not finish cleanly", exc_info=True)
    for a in actors:
        try:
            ray.kill(a)
        except Exception:  # noqa: BLE001 - already gone
            pass
    logger.info("stopped %d engine(s)", len(actors))


def find_engines(namespace: str) -> dict[str, ray.actor.ActorHandle]:
    """Named engine actors alive in ``namespace`` (for the control plane and CLI)."""
    from ray.util.state import list_actors

    out = {}
    for a in list_actors(filters=[("state", "=", "ALIVE")]):
        if a.get("ray_namespace", namespace) != namespace or not a.get("name"):
            continue
        if a.get("class_name") not in ("EngineHost", "EngineActor"):
            continue
        out[a["name"]] = ray.get_actor(a["name"], namespace=namespace)
    return out
