"""Run the control plane: connect to Ray, start or find the engines, serve with uvicorn.

Engines are detached named actors (``engine-0`` .. ``engine-N-1``) in the settings' Ray
namespace: in an external Ray cluster they outlive this process, and a restarted service finds
them instead of starting new ones. When the service started Ray itself, nothing could find them
after it stops, so it stops the engines it started (``Settings.keep_engines`` overrides either
way): vLLM's engine-core and worker processes go with them instead of lingering as orphans.
Called by ``services/serve.py`` and ``weightsync serve``, which read ``Settings``.
"""

from __future__ import annotations

import copy
import logging
import signal
from typing import Any

from weightsync.api.app import check_bind, create_app, is_loopback
from weightsync.api.gate import redact_url_credentials
from weightsync.config import EngineSpec, Settings
from weightsync.errors import ConfigError
from weightsync.local_ray import init_kwargs, starts_own_ray, unauthenticated
from weightsync.ray_compat import check_driver

logger = logging.getLogger(__name__)

class RedactCredentials(logging.Filter):
    """Blanks ``token=...`` in query strings of log lines (uvicorn's access log prints every
    request's URL). The service refuses such requests, but the attempt is still logged. A key
    is a credential exactly when the gate says so (``gate.url_credential``: ``%74oken`` too)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact_url_credentials(a) if isinstance(a, str) else a
                                for a in record.args)
        elif isinstance(record.msg, str):
            record.msg = redact_url_credentials(record.msg)
        return True


def log_config() -> dict[str, Any]:
    """uvicorn's logging config with ``RedactCredentials`` on every handler."""
    from uvicorn.config import LOGGING_CONFIG

    cfg = copy.deepcopy(LOGGING_CONFIG)
    cfg.setdefault("filters", {})["redact"] = {"()": f"{__name__}.RedactCredentials"}
    for handler in cfg["handlers"].values():
        handler.setdefault("filters", []).append("redact")
    return cfg


def engine_name(i: int) -> str:
    return f"engine-{i}"


def ensure_engines(settings: Settings, *, timeout_s: float = 900.0) -> tuple[list[Any], list[Any]]:
    """The ``settings.engines`` engine actors of this namespace, starting any that are missing.
    Returns (all of them, the ones started here). Needs ``settings.model`` only when an engine
    has to be started."""
    import ray

    from weightsync.engine.actor import spawn_engine, stop_engines

    actors, started = [], []
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
                          load_roots=settings.load_roots, engine_args=settings.engine_args)
        actor = spawn_engine(spec, namespace=settings.namespace, detached=True)
        actors.append(actor)
        started.append(actor)
        logger.info("starting engine %s (%s) in namespace %s", name, settings.model,
                    settings.namespace)
    if started:
        try:
            ray.get([a.start.remote() for a in started], timeout=timeout_s)
        except BaseException:
            stop_engines(started)
            raise
    return actors, started


def serve(settings: Settings, auth_mode: str | None) -> None:
    """Blocks until the server stops (SIGINT/SIGTERM: uvicorn shuts down gracefully), then
    stops the engines it started unless they should outlive it. Refuses unsafe settings
    before touching Ray. ``auth_mode``: the ``RAY_AUTH_MODE`` Ray runs under, as the
    entrypoint's ``ray_compat.prepare`` returned it."""
    import ray
    import uvicorn

    check_bind(settings)
    own_ray = starts_own_ray(settings.ray_address)  # this process starts Ray
    extra: dict[str, Any] = {}
    if own_ray:  # token-authenticated, no dashboard (weightsync.local_ray)
        if unauthenticated(auth_mode) and not is_loopback(settings.host):
            raise ConfigError(f"refusing to bind {settings.host!r} next to a Ray this process "
                              f"starts without authentication (RAY_AUTH_MODE={auth_mode!r}): "
                              "anyone who reaches its "
                              "ports could drive the engines. Leave RAY_AUTH_MODE unset "
                              "(weightsync turns Ray's token authentication on) or bind "
                              "127.0.0.1")
        check_driver(auth_mode)
        extra = init_kwargs()
    ray.init(address=settings.ray_address, namespace=settings.namespace,
             ignore_reinit_error=True, log_to_driver=False, **extra)
    logger.info("Ray at %s (%s)", ray.get_runtime_context().gcs_address,
                f"started here, RAY_AUTH_MODE={auth_mode}" if own_ray
                else "an existing cluster: its own authentication applies")
    keep = settings.keep_engines if settings.keep_engines is not None else not own_ray
    started: list[Any] = []
    try:
        engines, started = ensure_engines(settings)
        app = create_app(settings, engines=engines)
        logger.info("serving the control plane on http://%s:%d (auth %s)", settings.host,
                    settings.port, "on" if settings.token else "off")
        try:
            uvicorn.run(app, host=settings.host, port=settings.port, log_level="info",
                        log_config=log_config(), proxy_headers=False, server_header=False)
        except SystemExit as e:  # uvicorn re-raises the signal it stopped on; Ray's driver
            if e.code not in (signal.SIGTERM, signal.SIGINT):  # handler turns it into exit
                raise
            logger.info("stopped by signal %d", e.code)
    finally:
        if started and not keep:
            from weightsync.engine.actor import stop_engines

            stop_engines(started)
        ray.shutdown()


class ServerThread:
    """An app served by uvicorn in a daemon thread of this process (on ``host``, loopback by
    default), lifespan included: the control plane (and its rollout router) next to a job that
    drives the fleet itself (``services.grpo --rollout openai``), tests, benchmarks. ``port``
    0: a free one."""

    def __init__(self, app: Any, port: int = 0, *, host: str = "127.0.0.1",
                 log_level: str = "warning", own_logging: bool = True) -> None:
        """``own_logging``: uvicorn's loggers with credentials redacted (``log_config``);
        False: into the root logger as the process configured it."""
        import socket
        import threading

        import uvicorn

        self._socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.port = self._socket.getsockname()[1]
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        self.url = f"http://{shown}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(
            app, log_level=log_level, lifespan="on",
            log_config=log_config() if own_logging else None))
        self.thread = threading.Thread(target=self.server.run,
                                       kwargs={"sockets": [self._socket]},
                                       name="weightsync-uvicorn", daemon=True)

    def start(self, timeout_s: float = 180.0) -> ServerThread:
        import time

        self.thread.start()
        end = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("uvicorn exited during startup (see the log)")
            if time.monotonic() > end:
                raise RuntimeError(f"uvicorn not started after {timeout_s}s")
            time.sleep(0.05)
        return self

    def stop(self, timeout_s: float = 60.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)
        self._socket.close()
