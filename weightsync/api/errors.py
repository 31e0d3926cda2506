"""The one mapping from ``weightsync.errors`` to HTTP, and the control plane's own errors.

Every error leaves the service as JSON ``{code, message, engine}`` (plus ``result`` when a
fleet sync failed part-way, so the caller sees who failed and who is fenced):

    401 AuthError                       no or wrong bearer token
    404 NotFoundError                   unknown engine, unknown session, unknown route
    409 IllegalStateError               wrong engine state, SyncInProgressError, FencedError
    422 ConfigError, ManifestError      bad input, request validation, UnsupportedError (below)
    503 EngineError, TransferError      an engine is unavailable or failed; SyncFailedError
    504 DeadlineExceeded                a phase ran past its deadline

``UnsupportedError`` (sleep mode on a CPU engine) is an ``EngineError`` but maps to 422, not
503 or 409: nothing about it is temporary (503 invites a retry) and no change of engine state
fixes it (409 invites one). The request asks for something this engine can never do.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

# the errors and their statuses, without FastAPI (the client reads them too)
from weightsync.api.http_errors import (
    API_ERRORS,
    FALLBACK_BY_STATUS,
    STATUS,
    AuthError,
    ClientGoneError,
    NotFoundError,
    UnknownEngineError,
    UnknownSessionError,
    status_for,
)
from weightsync.errors import WeightSyncError

__all__ = ["API_ERRORS", "FALLBACK_BY_STATUS", "STATUS", "AuthError", "ClientGoneError",
           "NotFoundError", "UnknownEngineError", "UnknownSessionError",
           "install_error_handlers", "status_for"]

logger = logging.getLogger(__name__)


def _body(code: str, message: str, engine: str | None = None, result=None) -> dict:
    body = {"code": code, "message": message, "engine": engine}
    if result is not None:
        body["result"] = result.model_dump(mode="json")
    return body


async def _weightsync_error(request: Request, exc: WeightSyncError) -> JSONResponse:
    status = status_for(exc)
    log = logger.error if status >= 500 else logger.info
    log("%s %s -> %d %s: %s", request.method, request.url.path, status, exc.code, exc)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(_body(exc.code, exc.message, exc.engine, getattr(exc, "result", None)),
                        status_code=status, headers=headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return JSONResponse(_body("validation_error", "; ".join(parts) or "invalid request"),
                        status_code=422)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    status = exc.status_code
    if status == 400:  # FastAPI: a body that is not even text (bad UTF-8): bad input, 422
        status = 422
    code = {404: "not_found", 405: "method_not_allowed", 422: "invalid_body"}.get(
        status, "http_error")
    headers = dict(getattr(exc, "headers", None) or {})
    if status == 405:  # Starlette names the first route's methods only; a path may have several
        headers["Allow"] = ", ".join(_methods_for(request))
    return JSONResponse(_body(code, str(exc.detail)), status_code=status, headers=headers or None)


def _methods_for(request: Request) -> list[str]:
    """Every method some route serves at this request's path."""
    from starlette.routing import Match

    methods: set[str] = set()
    probe = {**request.scope, "method": "\x00"}  # matches no route's method: PARTIAL = path only
    for route in request.app.router.routes:
        if route.matches(probe)[0] == Match.PARTIAL:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("%s %s: unexpected %s", request.method, request.url.path,
                     type(exc).__name__)
    return JSONResponse(_body("internal_error", f"{type(exc).__name__}: {exc}"), status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    """Map every error once, here. Routes raise typed errors and never build error responses."""
    app.add_exception_handler(WeightSyncError, _weightsync_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
