"""The gate in front of every route: authentication and the body-size limit, before the app
reads a byte of the body.

FastAPI reads and parses a request's body before it runs a route's dependencies, so a bearer
check in a dependency alone would let anyone make the service parse 50 MB of JSON (or answer
422 instead of 401). ``Gate`` is plain ASGI middleware and decides from the request line and
headers only:

- paths in ``PUBLIC`` pass (liveness, the icon, the OpenAPI document, the login form);
- with a token configured, a request without valid credentials is a 401 — the bearer header
  for anything that changes something, the header or the status page's session cookie for
  GET/HEAD reads (``weightsync.api.deps.authorized``);
- a body over the limit is a 413 (by ``Content-Length``, or by counting a chunked body);
- credentials in a URL (``?token=``, ``?%74oken=``) are a 422: they would land in access logs
  and history. ``url_credential`` decides what a credential's key is, for this check and for
  the access log's redaction (``redact_url_credentials``) alike, so the two cannot disagree.

``PageSessions`` holds the status page's logins: the cookie carries a random session id, never
the bearer token, and sessions expire.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import unquote

from starlette.datastructures import Headers
from starlette.requests import cookie_parser

from weightsync.api.deps import COOKIE, authorized
from weightsync.asgi import replayed
from weightsync.config import Settings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

PUBLIC = frozenset({"/healthz", "/favicon.ico", "/openapi.json", "/docs",
                    "/docs/oauth2-redirect", "/redoc", "/login"})
LOGIN_BODY_LIMIT = 8 * 1024  # the login form carries one token
URL_CREDENTIALS = frozenset({"token", "access_token"})
READS = frozenset({"GET", "HEAD"})
# One query parameter in a log line: its separator, raw key and raw value. ``;`` separates too
# (some servers split on it), so the log redacts at least every key the gate sees. A key never
# holds ``/`` (a path with ``=`` is no key); a value runs to the next separator or whitespace.
_QUERY_PARAM = re.compile(r"(^|[?&;])([^=&;?#/\s\"]*)=([^&;\s]*)")


def url_credential(raw_key: str) -> bool:
    """Whether a query parameter's key, as it appears in the URL (percent-encoded, ``+`` for
    space), names a credential: decoded as ``urllib.parse.parse_qsl`` decodes keys. The gate
    refuses a request with one; the access log redacts its value."""
    return unquote(raw_key.replace("+", " "), errors="replace").lower() in URL_CREDENTIALS


def redact_url_credentials(text: str) -> str:
    """``text`` (a log line, a URL) with the value of every credential parameter replaced by
    ``[redacted]``, its key left as written (``?%74oken=[redacted]``)."""
    if "=" not in text:
        return text
    return _QUERY_PARAM.sub(
        lambda m: f"{m[1]}{m[2]}=[redacted]" if url_credential(m[2]) else m[0], text)


class PageSessions:
    """Status-page logins: random ids with an expiry. The id is the cookie's value."""

    def __init__(self, ttl_s: float = 12 * 3600, limit: int = 1024) -> None:
        self.ttl_s, self.limit = ttl_s, limit
        self._expiry: dict[str, float] = {}

    def new(self) -> str:
        now = time.monotonic()
        self._expiry = {s: t for s, t in self._expiry.items() if t > now}
        while len(self._expiry) >= self.limit:  # oldest first
            self._expiry.pop(next(iter(self._expiry)))
        sid = secrets.token_urlsafe(32)
        self._expiry[sid] = now + self.ttl_s
        return sid

    def valid(self, sid: str | None) -> bool:
        return sid is not None and self._expiry.get(sid, 0.0) > time.monotonic()


async def _answer(send: Send, status: int, code: str, message: str,
                  headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"code": code, "message": message, "engine": None}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class Gate:
    """ASGI middleware: see the module docstring. ``settings`` and ``sessions`` are the app's."""

    def __init__(self, app: Callable, *, settings: Settings, sessions: PageSessions) -> None:
        self.app, self.settings, self.sessions = app, settings, sessions
        self.max_body = settings.max_body_mib << 20

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        query = scope.get("query_string", b"").decode("latin-1")
        if any(url_credential(raw.partition("=")[0]) for raw in query.split("&")):
            await _answer(send, 422, "credentials_in_url",
                          "credentials are refused in URLs (they end up in logs and browser "
                          "history): send 'Authorization: Bearer <token>', or sign in to the "
                          "status page at /login")
            return
        headers = Headers(scope=scope)
        if self.settings.token is not None and path not in PUBLIC:
            if not authorized(headers.get("authorization"), self._cookie(headers),
                              self.settings, self.sessions, write=method not in READS):
                await _answer(send, 401, "unauthorized",
                              "missing or wrong bearer token (Authorization: Bearer <token>)",
                              {"WWW-Authenticate": "Bearer"})
                return
        limit = LOGIN_BODY_LIMIT if path == "/login" else self.max_body
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                await _answer(send, 400, "bad_request", "Content-Length is not a number")
                return
            if int(length) > limit:
                await _answer(send, 413, "body_too_large",
                              f"request body of {length} bytes is over the limit of {limit}")
                return
            await self.app(scope, receive, send)
            return
        if method in READS:
            await self.app(scope, receive, send)
            return
        body = await self._read_limited(receive, limit)  # chunked: count as it comes
        if body is None:
            await _answer(send, 413, "body_too_large",
                          f"request body is over the limit of {limit} bytes")
            return
        await self.app(scope, replayed(body, receive), send)

    @staticmethod
    def _cookie(headers: Headers) -> str | None:
        return cookie_parser(headers.get("cookie", "")).get(COOKIE)

    @staticmethod
    async def _read_limited(receive: Receive, limit: int) -> bytes | None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

