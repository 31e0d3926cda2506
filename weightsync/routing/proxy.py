"""Forwarding one request to an engine and streaming its answer back, unchanged.

``ProxyResponse`` is what a ``/v1`` route returns: a plain ASGI response that picks the engine
(``RolloutRouter.pick``), sends the request, and passes the engine's status, headers and body
bytes through as they arrive (server-sent events included), adding ``X-Engine``. While it
runs it listens for the client going away: a disconnect cancels the work, which closes the
connection to the engine, and vLLM aborts the request there (its routes cancel on
disconnect). Refusals by an engine (503, or 401 from one that lost this router's token) are
retried on another engine within the request's wait; nothing has been sent to the client then.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import aiohttp

from weightsync.routing.router import Ask, RolloutRouter, RoutingError

logger = logging.getLogger(__name__)

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# not passed back: hop-by-hop headers, and what the router's own server writes
DROPPED = frozenset({"connection", "keep-alive", "transfer-encoding", "proxy-authenticate",
                     "proxy-authorization", "te", "trailer", "upgrade", "server", "date"})


async def send_error(send: Send, err: RoutingError) -> None:
    """The router's own answer, shaped as the control plane's errors: ``{code, message,
    engine}``."""
    body = json.dumps({"code": err.code, "message": err.message, "engine": err.engine}).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    if err.retry_after is not None:
        headers.append((b"retry-after", str(max(1, round(err.retry_after))).encode()))
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class ProxyResponse:
    """An ASGI response that forwards ``ask`` to an engine (see the module docstring)."""

    def __init__(self, router: RolloutRouter, method: str, path: str, headers: Any,
                 ask: Ask) -> None:
        self.router, self.method, self.path = router, method, path
        self.headers, self.ask = headers, ask
        self.background = None  # (what Starlette reads off a response)

    async def __call__(self, scope: Any, receive: Receive, send: Send) -> None:
        work = asyncio.ensure_future(self._forward(send))
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (work, gone):
                if not task.done():
                    task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await gone
        if work.cancelled():
            logger.info("client went away: %s %s cancelled", self.method, self.path)
            with contextlib.suppress(asyncio.CancelledError):
                await work
            return
        work.result()

    async def _forward(self, send: Send) -> None:
        router, ask = self.router, self.ask
        deadline = time.monotonic() + ask.wait_s
        skip: set[str] = set()
        retokened: set[str] = set()
        while True:
            try:
                route = await router.pick(ask, deadline, frozenset(skip))
            except RoutingError as e:
                await send_error(send, e)
                return
            router.in_flight[route.engine] += 1
            try:
                try:
                    response = await router.client.request(
                        self.method, route.url + self.path, data=ask.body or None,
                        headers=router.upstream_headers(self.headers,
                                                        deadline - time.monotonic(),
                                                        ask.min_version))
                except (TimeoutError, aiohttp.ClientConnectionError) as e:
                    logger.warning("engine %s unreachable (%s: %s): trying another",
                                   route.engine, type(e).__name__, e)
                    skip.add(route.engine)
                    continue
                try:
                    if response.status == 401 and route.engine not in retokened:
                        retokened.add(route.engine)  # restarted, or re-tokened by another router
                        await router.adopt(await router.fresh(), again=frozenset({route.engine}))
                        continue
                    if response.status == 503 and time.monotonic() < deadline:
                        skip.add(route.engine)  # it began a sync or was fenced since
                        continue
                    headers = [(k, v) for k, v in response.raw_headers
                               if k.lower().decode("latin-1") not in DROPPED]
                    headers.append((b"x-engine", route.engine.encode()))
                    await send({"type": "http.response.start", "status": response.status,
                                "headers": headers})
                    async for chunk in response.content.iter_any():
                        await send({"type": "http.response.body", "body": chunk,
                                    "more_body": True})
                    await send({"type": "http.response.body", "body": b""})
                    return
                finally:
                    # read to the end, the connection goes back to the pool; otherwise (a
                    # refusal not read, the client gone) it is closed, and vLLM aborts there
                    response.release()
            finally:
                router.in_flight[route.engine] -= 1
