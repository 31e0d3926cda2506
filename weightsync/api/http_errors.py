"""The control plane's own errors and the one mapping from ``weightsync.errors`` to HTTP
statuses (``weightsync.api.errors`` installs it). No FastAPI here: the client reads it too."""

from __future__ import annotations

from weightsync.errors import (
    ConfigError,
    DeadlineExceeded,
    EngineError,
    IllegalStateError,
    SyncFailedError,
    TransferError,
    UnsupportedError,
    WeightSyncError,
)


class AuthError(WeightSyncError):
    """Missing or wrong bearer token (HTTP 401)."""

    code = "unauthorized"


class NotFoundError(ConfigError):
    """The request names something that does not exist (HTTP 404)."""

    code = "not_found"


class UnknownEngineError(NotFoundError):
    code = "unknown_engine"


class UnknownSessionError(NotFoundError):
    code = "unknown_session"


class ClientGoneError(IllegalStateError):
    """The client disconnected before a change began; nothing was changed (logged as 409)."""

    code = "client_gone"


# Most specific first: the first class an error is an instance of decides its status.
STATUS: tuple[tuple[type[WeightSyncError], int], ...] = (
    (AuthError, 401),
    (NotFoundError, 404),
    (UnsupportedError, 422),
    (IllegalStateError, 409),
    (ConfigError, 422),
    (DeadlineExceeded, 504),
    (EngineError, 503),
    (TransferError, 503),
    (SyncFailedError, 503),
)

# For clients: a status whose body carries a code this library does not know.
FALLBACK_BY_STATUS: dict[int, type[WeightSyncError]] = {
    401: AuthError, 404: NotFoundError, 409: IllegalStateError, 413: ConfigError, 422: ConfigError,
    503: EngineError, 504: DeadlineExceeded,
}

API_ERRORS: tuple[type[WeightSyncError], ...] = (AuthError, NotFoundError, UnknownEngineError,
                                                 UnknownSessionError, ClientGoneError)


def status_for(err: WeightSyncError) -> int:
    for cls, status in STATUS:
        if isinstance(err, cls):
            return status
    return 500
