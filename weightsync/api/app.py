"""``create_app``: the control plane's FastAPI application.

The app fronts one fleet: engine actors handed in by the caller, or found as named actors in
the settings' Ray namespace at startup (lifespan). It never starts or stops engines itself —
they are detached and outlive it (``weightsync.api.server`` starts missing ones). The lifespan
also runs the fleet's status poll (``Fleet.watch``), from which ``/status`` answers without
waiting on any engine.
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from weightsync.api.errors import install_error_handlers
from weightsync.api.fleet import Fleet
from weightsync.api.gate import Gate, PageSessions
from weightsync.api.routes import adapters, health, openai, page, sync
from weightsync.api.routes import engines as engine_routes
from weightsync.api.sessions import SessionRegistry
from weightsync.config import MiB, Settings, TransferConfig
from weightsync.coordinator import SyncCoordinator
from weightsync.errors import ConfigError
from weightsync.metrics import SyncMetrics
from weightsync.routing.router import RolloutRouter

logger = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def settle_heap() -> None:
    """Collect once, then freeze what is alive (``gc.freeze``): the modules, Ray's and torch's
    objects, the app. A full collection walks every tracked object with the GIL held — ~230,000
    of them in this process after startup, ~90 ms on one core, during which no thread runs,
    the event loop included; allocations (one burst of requests is enough) start one at any
    time. Frozen objects are never walked again (nor collected: they live as long as the
    process anyway), so a full collection only walks what came after startup."""
    gc.collect()
    gc.freeze()


def check_bind(settings: Settings) -> None:
    """Refuse settings that would expose an unauthenticated control plane."""
    if settings.token is not None and not settings.token.strip():
        raise ConfigError("WEIGHTSYNC_TOKEN is set but empty")
    if settings.token is not None and settings.token != settings.token.strip():
        # HTTP strips whitespace around header values: such a token could never match
        raise ConfigError("WEIGHTSYNC_TOKEN has leading or trailing whitespace")
    if not is_loopback(settings.host) and settings.token is None:
        raise ConfigError(f"refusing to bind {settings.host!r} without a token: anyone who can "
                          "reach it could drive the fleet. Set WEIGHTSYNC_TOKEN, or bind "
                          "127.0.0.1")


def create_app(settings: Settings, *, engines: Sequence[Any] | Mapping[str, Any] | None = None,
               transfer: TransferConfig | None = None) -> FastAPI:
    """The control plane over ``engines`` (actor handles), or over the named engine actors in
    ``settings.namespace`` when omitted. Raises ``ConfigError`` for unsafe settings."""
    check_bind(settings)
    wire = transfer or TransferConfig(bucket_bytes=settings.bucket_mib * MiB)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if engines is None:
            from weightsync.engine.actor import find_engines

            actors = list((await asyncio.to_thread(find_engines, settings.namespace)).values())
        else:
            actors = list(engines.values() if isinstance(engines, Mapping) else engines)
        if not actors:
            raise ConfigError(f"no engine actors in Ray namespace {settings.namespace!r}")
        metrics = app.state.metrics
        fleet = await Fleet.connect(actors, lambda a: SyncCoordinator(a, wire, metrics=metrics))
        await fleet.statuses()  # the first /status answers from memory too
        settle_heap()
        watch = asyncio.create_task(fleet.watch(), name="weightsync-fleet-watch")
        app.state.fleet = fleet
        rollouts = None
        if settings.rollouts:  # the fleet's OpenAI base URL (/v1): weightsync.routing
            rollouts = RolloutRouter(fleet.seen, fleet.statuses,
                                     lambda name, token: fleet.serve_openai(name, token))
            watch_apps = asyncio.create_task(rollouts.keep_adopting(fleet.seen),
                                             name="weightsync-rollout-apps")
            app.state.rollouts = rollouts
        logger.info("control plane up over %s (version %d)", fleet.names,
                    fleet.coordinator.version)
        try:
            yield
        finally:
            app.state.fleet = None  # engines are detached: they keep serving without us
            app.state.rollouts = None
            tasks = [watch] if rollouts is None else [watch, watch_apps]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if rollouts is not None:
                await rollouts.close()
            fleet.close()
            gc.unfreeze()  # what only this app held can be collected once it is gone

    from weightsync import __version__

    # redirect_slashes off: Starlette builds those redirects from the request's Host header
    app = FastAPI(title="weightsync control plane", version=__version__, lifespan=lifespan,
                  redirect_slashes=False,
                  description="Drive a fleet of vLLM engines: sleep, wake, pause, resume, "
                              "reload, and sync sessions for trainers outside the Ray cluster.")
    app.state.settings = settings
    app.state.metrics = SyncMetrics()
    app.state.sessions = SessionRegistry()
    app.state.page_sessions = PageSessions()
    app.state.fleet = None
    app.state.rollouts = None
    app.add_middleware(Gate, settings=settings, sessions=app.state.page_sessions)
    install_error_handlers(app)
    for module in (health, engine_routes, sync, adapters, page, openai):
        app.include_router(module.router)
    return app
