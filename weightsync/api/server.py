"""Run the control plane: connect to Ray, start or find the engines, serve with uvicorn.

Engines are detached named actors (``engine-0`` .. ``engine-N-1``) in the settings' Ray
namespace: they outlive this process, and a restarted service finds them instead of starting
new ones. Called by ``services/serve.py`` and ``weightsync serve``, which read ``Settings``.
"""

from __future__ import annotations

import logging
from typing import Any

from weightsync.api.app import check_bind, create_app
from weightsync.config import EngineSpec, Settings
from weightsync.errors import ConfigError

logger = logging.getLogger(__name__)


def engine_name(i: int) -> str:
    return f"engine-{i}"


def ensure_engines(settings: Settings, *, timeout_s: float = 900.0) -> list[Any]:
    """The ``settings.engines`` engine actors of this namespace, starting any that are missing.

    Needs ``settings.model`` only when an engine has to be started.
    """
    import ray

    from weightsync.engine.actor import spawn_engine

    actors, booting = [], []
    for i in range(settings.engines):
        name = engine_name(i)
        try:
            actors.append(ray.get_actor(name, namespace=settings.namespace))
            logger.info("found engine %s in namespace %s", name, settings.namespace)
            continue
        except ValueError:
            pass
        if not settings.model:
            raise ConfigError(f"engine {name} is not running in namespace "
                              f"{settings.namespace!r} and WEIGHTSYNC_MODEL is not set")
        spec = EngineSpec(name=name, model=settings.model, device=settings.device,
                          load_roots=settings.load_roots)
        actor = spawn_engine(spec, namespace=settings.namespace, detached=True)
        actors.append(actor)
        booting.append(actor.start.remote())
        logger.info("starting engine %s (%s) in namespace %s", name, settings.model,
                    settings.namespace)
    if booting:
        ray.get(booting, timeout=timeout_s)
    return actors


def serve(settings: Settings) -> None:
    """Blocks until the server stops. Refuses unsafe settings before touching Ray."""
    import ray
    import uvicorn

    check_bind(settings)
    ray.init(address=settings.ray_address, namespace=settings.namespace,
             ignore_reinit_error=True, log_to_driver=False)
    engines = ensure_engines(settings)
    app = create_app(settings, engines=engines)
    logger.info("serving the control plane on http://%s:%d (auth %s)", settings.host,
                settings.port, "on" if settings.token else "off")
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info",
                proxy_headers=False, server_header=False)
