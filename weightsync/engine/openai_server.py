"""vLLM's own OpenAI-compatible server for one engine, served from its engine host.

``OpenAIServer`` builds vLLM's app around the host's ``AsyncLLM`` (``vllm_compat.openai_app``:
vLLM's serve argument parser, ``build_app``, ``init_app_state``) with the engine client gated
by the host's serving gate (``engine.gated_engine``), puts ``engine.openai_guard`` in front of
it, and serves that with a plain ``uvicorn.Server`` as a task on the host's event loop (the
engine's), on a free port of the node's IP (or the address it is given).

Not vLLM's ``serve_http``/``run_server``: they install signal handlers (only possible on the
main thread) and shut the engine down on SIGTERM, taking its lifecycle from weightsync. Nor
vLLM's lifespan: it freezes the process's GC heap and runs a stats-logging loop, neither
wanted in an engine host whose process outlives the app. The host closes the server when it
shuts the engine down or starts it again; a restarted engine gets a fresh app from the next
``serve``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from typing import Any

import uvicorn

from weightsync.engine import vllm_compat, vllm_lora
from weightsync.engine.gated_engine import GatedEngineClient, Served
from weightsync.engine.openai_guard import OpenAIGuard
from weightsync.errors import EngineError, UnsupportedError

logger = logging.getLogger(__name__)


class _QuietServer(uvicorn.Server):
    """uvicorn without its signal handlers: the engine host's process decides its own end."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def node_ip() -> str:
    """This node's IP as Ray knows it (127.0.0.1 outside Ray)."""
    import ray

    if not ray.is_initialized():
        return "127.0.0.1"
    return str(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]


class OpenAIServer:
    """vLLM's OpenAI app for one engine host, behind ``OpenAIGuard``; None of it runs until
    ``serve``. ``served_model_name``: the model name requests must give (the same on every
    engine of a fleet: the model they load)."""

    def __init__(self, host: Served, name: str, served_model_name: str) -> None:
        self._host, self._name, self._served = host, name, served_model_name
        self._guard: OpenAIGuard | None = None
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._sock: socket.socket | None = None
        self._bound: tuple[str, int] | None = None
        self._app: Any = None
        host.adapters.on_change(self._publish_adapters)

    def _publish_adapters(self) -> None:
        """The host's LoRA adapters by name in vLLM's app (``model="<name>"`` or
        ``"<name>@v<N>"``), the same table ``generate(lora=...)`` resolves in."""
        if self._app is not None:
            vllm_lora.publish_adapters(self._app, self._host.adapters.requests())

    @property
    def url(self) -> str | None:
        """``http://ip:port`` while it serves."""
        if self._bound is None or self._task is None or self._task.done():
            return None
        return f"http://{self._bound[0]}:{self._bound[1]}"

    async def serve(self, engine: Any, token: str, host: str | None = None) -> str:
        """Serve ``engine`` (the host's ``AsyncLLM``) with ``token``; already serving on the
        same address: ``token`` is accepted too (``OpenAIGuard.grant``). Returns the base
        URL."""
        address = host or node_ip()
        if self.url is not None and self._guard is not None and self._bound is not None \
                and self._bound[0] == address:
            self._guard.grant(token)
            return self.url
        await self.close()
        try:
            app = await vllm_compat.openai_app(GatedEngineClient(engine, self._host),
                                               model=self._served,
                                               served_model_name=self._served)
        except Exception as e:
            logger.warning("engine %s: vLLM's OpenAI app could not be built", self._name,
                           exc_info=True)
            raise UnsupportedError(f"vLLM's OpenAI app could not be built around this "
                                   f"engine: {type(e).__name__}: {e}", engine=self._name) from e
        self._app = app
        self._publish_adapters()
        guard = OpenAIGuard(app, self._host, self._name, token)
        sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET,
                             socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, 0))
        config = uvicorn.Config(guard, lifespan="off", log_level="warning", access_log=False,
                                timeout_graceful_shutdown=5)
        server = _QuietServer(config)
        vllm_compat.attach_http_server(app, server)
        task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
        self._guard, self._server, self._task, self._sock = guard, server, task, sock
        self._bound = (address, sock.getsockname()[1])
        while not server.started:
            if task.done():
                await self.close()
                raise EngineError("the OpenAI server stopped while starting (see the log)",
                                  engine=self._name)
            await asyncio.sleep(0.01)
        logger.info("engine %s: vLLM's OpenAI API on %s", self._name, self.url)
        assert self.url is not None
        return self.url

    async def close(self) -> None:
        """Stop serving (requests in flight get 5 s to finish)."""
        server, task, sock = self._server, self._task, self._sock
        self._guard = self._server = self._task = self._sock = self._bound = self._app = None
        if server is not None and task is not None:
            server.should_exit = True
            try:
                await asyncio.wait_for(asyncio.shield(task), 10)
            except Exception:
                logger.warning("engine %s: the OpenAI server did not stop cleanly",
                               self._name, exc_info=True)
                task.cancel()
        if sock is not None:
            sock.close()
