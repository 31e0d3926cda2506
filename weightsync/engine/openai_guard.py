"""The ASGI guard in front of vLLM's own OpenAI app on an engine host: who may call, which
routes exist, when a request may run, and which weight version answered it.

In order, for every HTTP request (vLLM's app itself is never changed):

1. a bearer token, compared in constant time: 401 otherwise (the only answer that carries no
   version);
2. an allowlist of paths (``ALLOWED``): 404 for everything else, so vLLM's control routes
   (``/pause``, ``/sleep``, ``/collective_rpc``, weight transfer, ``/scale_elastic_ep``,
   ``/inference/v1/abort_requests``, ``/invocations``, LoRA loading...) cannot be reached
   whatever vLLM registers;
3. generation routes (``GENERATION``) pass the serving gate: an engine that cannot serve is a
   503 with the reason (fenced, stopped, asleep with no sync holding it); a gate closed by a
   sync or pause is waited for up to ``X-Wait-S`` seconds (default 30, at most 300), then a 503
   with ``Retry-After``; ``X-Min-Weight-Version: N`` is a 409 when the engine's version is
   still below N after the wait (never older weights). vLLM's engine client admits each
   sub-request at the gate (``engine.gated_engine``), which also waits if a sync closed the
   gate while vLLM was rendering the prompt;
4. the request's ``cache_salt`` (accepted by completions, chat and ``/inference/v1/generate``
   in vLLM 0.24 and 0.32) is set to one that names the engine's version, joined with the
   caller's own salt: a new version never reuses an old version's prefix KV even if a cache
   clear were missed;
5. stamps: every response carries ``X-Weight-Version`` (the version at admission; the current
   one for routes that generate nothing); a JSON answer of a generation route gets
   ``weight_version`` (null when a sync changed the version during the request) and
   ``weight_versions: [first, last]``; each streamed SSE chunk gets ``weight_version``, the
   engine's version when vLLM produced the output it carries. A request that named a LoRA
   adapter (``model="<name>"`` or ``"<name>@v<N>"``, ``engine.adapters``) also gets
   ``X-Adapter-Version: <name>@v<N>``, the version that ran it (vLLM's ``model`` field in
   the answer names it too).

The response's start is held until its first body part, so the header names the version the
request was admitted at; a request refused inside vLLM's app (the gate closed after this
guard let it in and did not open in time) gets this guard's 503 instead of vLLM's error.
A client that disconnects aborts its request in vLLM (vLLM's own cancellation: the generator
is closed, ``AsyncLLM.generate`` aborts).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.datastructures import Headers, MutableHeaders

from weightsync.asgi import replayed
from weightsync.engine.gated_engine import (
    TICKET,
    Served,
    Ticket,
    retry_after,
    unavailable,
    wait_routable,
)
from weightsync.errors import DeadlineExceeded, WeightSyncError

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

GENERATION = frozenset({"/v1/completions", "/v1/chat/completions", "/inference/v1/generate"})
ALLOWED = GENERATION | {"/v1/models", "/tokenize", "/detokenize", "/health", "/version",
                        "/metrics"}
WAIT_S, MAX_WAIT_S = 30.0, 300.0
MAX_SALT = 128  # vLLM 0.32's limit (validate_cache_salt)


def salted(body: bytes, version: int) -> bytes:
    """The request body with ``cache_salt`` naming ``version`` (joined with the caller's salt;
    hashed when the two would pass vLLM's 128 characters). A body that is not a JSON object,
    or a salt vLLM would refuse anyway, is left for vLLM to refuse."""
    try:
        data = json.loads(body)
    except ValueError:
        return body
    user = data.get("cache_salt") if isinstance(data, dict) else None
    if not isinstance(data, dict) or (user is not None and (not isinstance(user, str)
                                                            or not user)):
        return body
    salt = f"weightsync-v{version}"
    if user:
        joined = f"{salt}-{user}"
        salt = joined if len(joined) <= MAX_SALT else \
            f"{salt}-{hashlib.sha256(user.encode()).hexdigest()}"
    data["cache_salt"] = salt
    return json.dumps(data).encode()


def _header_number(headers: Headers, name: str, default: float, cap: float) -> float:
    raw = headers.get(name)
    if raw is None:
        return default
    value = float(raw)  # ValueError: a 422
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, not {raw!r}")
    return min(value, cap)


class OpenAIGuard:
    """ASGI app: the guard (see the module's doc) around vLLM's OpenAI ``app`` for one engine
    host. Tokens are added while it serves (``EngineHost.serve_openai``, ``grant``): the
    ``TOKENS`` most recent are accepted, so several routers (the control plane's, a job's
    own) share the engine without taking it from each other."""

    TOKENS = 4

    def __init__(self, app: ASGIApp, host: Served, name: str, token: str) -> None:
        self.app, self.host, self.name = app, host, name
        self.tokens: list[bytes] = []
        self.grant(token)

    def grant(self, token: str) -> None:
        """Accept ``token`` too (the oldest of more than ``TOKENS`` is dropped)."""
        if not token or token != token.strip():
            raise ValueError("the OpenAI server needs a non-empty token without surrounding "
                             "whitespace")
        raw = token.encode()
        self.tokens = [raw, *(t for t in self.tokens if t != raw)][:self.TOKENS]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":  # no allowed route is one
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":
            return
        headers = Headers(scope=scope)
        if not self._authorized(headers.get("authorization", "")):
            await self._error(send, 401, "unauthorized", "a valid bearer token is required",
                              stamp=False, extra={"www-authenticate": "Bearer"})
            return
        path = scope["path"]
        if path not in ALLOWED:
            await self._error(send, 404, "not_found", f"{path} is not served here")
            return
        if path in GENERATION:
            await self._generation(scope, receive, send, headers)
            return
        if path == "/health":
            why = unavailable(self.host.status())
            if why is not None:
                await self._error(send, 503, why.code, why.message)
                return
        await self.app(scope, receive, _Stamps(send, self.host, None, self).send)

    def _authorized(self, value: str) -> bool:
        scheme, _, presented = value.partition(" ")
        given = presented.strip().encode()
        # every token compared (no early exit): the time says nothing about which matched
        return scheme.lower() == "bearer" and \
            sum(hmac.compare_digest(given, t) for t in self.tokens) > 0

    async def _generation(self, scope: Scope, receive: Receive, send: Send,
                          headers: Headers) -> None:
        try:
            wait_s = _header_number(headers, "x-wait-s", WAIT_S, MAX_WAIT_S)
            least = int(headers.get("x-min-weight-version", "0"))
        except ValueError as e:
            await self._error(send, 422, "invalid_header", str(e))
            return
        ticket = Ticket(deadline=time.monotonic() + wait_s)
        try:
            await wait_routable(self.host, wait_s)
        except WeightSyncError as e:
            await self.refuse(send, e)
            return
        if self.host.version < least:
            await self._error(send, 409, "weight_version_behind",
                              f"engine {self.name} serves weight version {self.host.version}, "
                              f"the request needs at least {least}")
            return
        body = await _read_body(receive)
        if body is None:  # the client left
            return
        body = salted(body, self.host.version)
        scope = dict(scope)
        raw = MutableHeaders(raw=list(scope["headers"]))
        raw["content-length"] = str(len(body))
        scope["headers"] = raw.raw
        token = TICKET.set(ticket)
        try:
            await self.app(scope, replayed(body, receive),
                           _Stamps(send, self.host, ticket, self).send)
        finally:
            TICKET.reset(token)

    async def refuse(self, send: Send, error: WeightSyncError) -> None:
        """A 503 for an engine that cannot serve now (``Retry-After`` when it only did not
        serve in time)."""
        extra = {"retry-after": str(retry_after(self.host.status()))} \
            if isinstance(error, DeadlineExceeded) else {}
        await self._error(send, 503, error.code, error.message, extra=extra)

    async def _error(self, send: Send, status: int, code: str, message: str, *,
                     stamp: bool = True, extra: dict[str, str] | None = None) -> None:
        body = json.dumps({"code": code, "message": message, "engine": self.name}).encode()
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode())]
        if stamp:
            headers.append((b"x-weight-version", str(self.host.version).encode()))
        headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


async def _read_body(receive: Receive) -> bytes | None:
    parts = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)



class _Stamps:
    """One response on its way out: its start held until its first body part, then sent with
    ``X-Weight-Version``; a JSON answer of a generation route stamped whole, an SSE stream
    chunk by chunk; a request refused inside vLLM's app answered with the guard's 503."""

    def __init__(self, send: Send, host: Served, ticket: Ticket | None,
                 guard: OpenAIGuard) -> None:
        self._send, self._host, self._ticket, self._guard = send, host, ticket, guard
        self._start: Message | None = None
        self._mode: str | None = None  # plain, sse, json or refused, from the first part
        self._held = b""

    def _version(self) -> int:
        t = self._ticket
        return t.first if t is not None and t.first is not None else self._host.version

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self._start = dict(message)
            return
        if message["type"] != "http.response.body" or self._start is None:
            await self._send(message)
            return
        if self._mode is None:
            self._mode = await self._begin()
        more = message.get("more_body", False)
        body = message.get("body", b"")
        if self._mode == "refused":
            return
        if self._mode == "plain":
            await self._send(message)
            return
        self._held += body
        if self._mode == "sse":
            events, _, self._held = self._held.rpartition(b"\n\n")
            out = b"".join(self._stamp_event(e) + b"\n\n" for e in events.split(b"\n\n")) \
                if events else b""
            if not more:
                out, self._held = out + self._held, b""
            if out or not more:
                await self._send({"type": "http.response.body", "body": out, "more_body": more})
        elif not more:  # json: the whole answer
            out = self._stamp_json(self._held)
            self._set_header("content-length", str(len(out)))
            await self._send(self._start)
            await self._send({"type": "http.response.body", "body": out})

    async def _begin(self) -> str:
        """The mode, from the held start; sends the start unless the body changes its
        length (json) or it is replaced (refused)."""
        assert self._start is not None
        t = self._ticket
        if t is not None and t.refused is not None:
            await self._guard.refuse(self._send, t.refused)
            return "refused"
        self._set_header("x-weight-version", str(self._version()))
        if t is not None and t.adapter is not None:
            self._set_header("x-adapter-version", t.adapter)
        kind = Headers(raw=self._start.get("headers", [])).get("content-type", "")
        if t is not None and self._start["status"] == 200 and \
                kind.startswith("application/json"):
            return "json"  # its start goes with the stamped body (a new length)
        await self._send(self._start)
        return "sse" if t is not None and kind.startswith("text/event-stream") else "plain"

    def _set_header(self, name: str, value: str) -> None:
        assert self._start is not None
        headers = MutableHeaders(raw=list(self._start.get("headers", [])))
        headers[name] = value
        self._start["headers"] = headers.raw

    def _stamp_event(self, event: bytes) -> bytes:
        if not event.startswith(b"data: ") or event == b"data: [DONE]":
            return event
        try:
            data = json.loads(event[6:])
        except ValueError:
            return event
        if not isinstance(data, dict):
            return event
        t = self._ticket
        data["weight_version"] = t.last if t is not None and t.last is not None \
            else self._host.version
        return b"data: " + json.dumps(data).encode()

    def _stamp_json(self, body: bytes) -> bytes:
        try:
            data = json.loads(body)
        except ValueError:
            return body
        t = self._ticket
        if not isinstance(data, dict) or t is None or t.first is None or t.last is None:
            return body
        data["weight_version"] = t.first if t.first == t.last else None
        data["weight_versions"] = [t.first, t.last]
        return json.dumps(data).encode()
