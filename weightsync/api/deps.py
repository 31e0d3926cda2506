"""Dependencies: settings, the fleet, sessions, and the bearer-token checks.

Settings are read once, by the entrypoint (``services/serve.py``, ``weightsync serve``), and
handed to ``create_app``; ``get_settings`` returns that one instance (FastAPI caches it per
request) and tests swap it with ``app.dependency_overrides[get_settings]``.

Auth: with a token configured, every route but ``/healthz`` and ``/favicon.ico`` needs it.
Mutating routes accept only the ``Authorization: Bearer`` header. Read-only GET routes (``/``,
``/status``, ``/engines``, ``/metrics``) also accept the status page's cookie, which
``/?token=...`` sets (HttpOnly, SameSite=Strict) so a browser can show the page; a cookie never
authorises a change, so a cross-site form cannot drive the fleet.
"""

from __future__ import annotations

import hmac

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from weightsync.api.errors import AuthError
from weightsync.api.fleet import Fleet
from weightsync.api.sessions import SessionRegistry
from weightsync.config import Settings
from weightsync.errors import EngineError

COOKIE = "weightsync_token"
bearer_scheme = HTTPBearer(auto_error=False, description="WEIGHTSYNC_TOKEN")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_fleet(request: Request) -> Fleet:
    fleet = getattr(request.app.state, "fleet", None)
    if fleet is None:
        raise EngineError("the control plane is still connecting to its engines")
    return fleet


def get_sessions(request: Request) -> SessionRegistry:
    return request.app.state.sessions


def token_matches(presented: str | None, expected: str) -> bool:
    return presented is not None and hmac.compare_digest(presented.encode(), expected.encode())


def require_token(credentials: HTTPAuthorizationCredentials | None = Depends(bearer_scheme),
                  settings: Settings = Depends(get_settings)) -> None:
    """Every route that changes something: the bearer header and nothing else."""
    if settings.token is None:
        return
    if credentials is None:
        raise AuthError("missing bearer token (Authorization: Bearer <token>)")
    if not token_matches(credentials.credentials, settings.token):
        raise AuthError("wrong bearer token")


def require_reader(request: Request,
                   credentials: HTTPAuthorizationCredentials | None = Depends(bearer_scheme),
                   settings: Settings = Depends(get_settings)) -> None:
    """Read-only routes: the bearer header, or the status page's cookie."""
    if settings.token is None:
        return
    presented = credentials.credentials if credentials is not None else request.cookies.get(COOKIE)
    if presented is None:
        raise AuthError("missing bearer token (Authorization: Bearer <token>, or open /?token=...)")
    if not token_matches(presented, settings.token):
        raise AuthError("wrong bearer token")
