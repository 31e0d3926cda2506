"""Dependencies: settings, the fleet, sessions, and the bearer-token checks.

Settings are read once, by the entrypoint (``services/serve.py``, ``weightsync serve``), and
handed to ``create_app``; ``get_settings`` returns that one instance (FastAPI caches it per
request) and tests swap it with ``app.dependency_overrides[get_settings]``.

Auth: with a token configured, every route but the public ones (``weightsync.api.gate.PUBLIC``)
needs it. Mutating routes accept only the ``Authorization: Bearer`` header. Read-only GET routes
(``/``, ``/status``, ``/engines``, ``/metrics``) also accept the status page's cookie, which a
sign-in at ``POST /login`` sets (HttpOnly, SameSite=Strict, a random session id — never the
token itself); a cookie never authorises a change, so a cross-site form cannot drive the fleet.
``weightsync.api.gate.Gate`` applies ``authorized`` before any body is read; the dependencies
below apply it again per route and declare the scheme in the OpenAPI document.

Every dependency is ``async def``: each does a few dictionary reads, and FastAPI runs a plain
``def`` dependency in one of anyio's worker threads — a thread hop and a GIL hand-off per
dependency per request (50 racing reloads made ~200, and a reader's own hops queued behind
them), and when no worker is idle (such a burst, or the first request after 10 s of quiet,
when idle workers are dropped) the event loop itself starts a thread and waits until it runs
(``benchmarks/control_latency.py --stalls`` caught the loop there).
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from weightsync.api.errors import AuthError
from weightsync.api.fleet import Fleet
from weightsync.api.sessions import SessionRegistry
from weightsync.config import Settings
from weightsync.errors import EngineError

if TYPE_CHECKING:
    from weightsync.api.gate import PageSessions

COOKIE = "weightsync_session"
bearer_scheme = HTTPBearer(auto_error=False, description="WEIGHTSYNC_TOKEN")


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_fleet(request: Request) -> Fleet:
    fleet = getattr(request.app.state, "fleet", None)
    if fleet is None:
        raise EngineError("the control plane is still connecting to its engines")
    return fleet


async def get_sessions(request: Request) -> SessionRegistry:
    return request.app.state.sessions


def token_matches(presented: str | None, expected: str) -> bool:
    return presented is not None and hmac.compare_digest(presented.encode(), expected.encode())


def authorized(authorization: str | None, cookie: str | None, settings: Settings,
               page_sessions: PageSessions, *, write: bool) -> bool:
    """Whether a request may pass: the bearer header, or (reads only) a page session."""
    if settings.token is None:
        return True
    scheme, _, credentials = (authorization or "").partition(" ")
    if scheme.lower() == "bearer" and token_matches(credentials.strip(), settings.token):
        return True
    return not write and page_sessions.valid(cookie)


def _check(request: Request, credentials: HTTPAuthorizationCredentials | None,
           settings: Settings, write: bool) -> None:
    header = f"Bearer {credentials.credentials}" if credentials is not None else None
    if not authorized(header, request.cookies.get(COOKIE), settings,
                      request.app.state.page_sessions, write=write):
        raise AuthError("missing or wrong bearer token (Authorization: Bearer <token>)")


async def require_token(
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer_scheme),
        settings: Settings = Depends(get_settings)) -> None:
    """Every route that changes something: the bearer header and nothing else."""
    _check(request, credentials, settings, write=True)


async def require_reader(
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer_scheme),
        settings: Settings = Depends(get_settings)) -> None:
    """Read-only routes: the bearer header, or the status page's session cookie."""
    _check(request, credentials, settings, write=False)
