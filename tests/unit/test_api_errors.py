"""The one error mapping (library errors -> HTTP status and JSON body), and the client's way
back from a response to the same typed error."""

from __future__ import annotations

import httpx
import pytest

from weightsync.api.app import check_bind, is_loopback
from weightsync.api.errors import (
    AuthError,
    NotFoundError,
    UnknownEngineError,
    UnknownSessionError,
    status_for,
)
from weightsync.client import _error_from
from weightsync.config import Settings
from weightsync.errors import (
    ConfigError,
    DeadlineExceeded,
    EngineError,
    FencedError,
    IllegalStateError,
    ManifestError,
    ReloadError,
    SyncFailedError,
    SyncInProgressError,
    TransferError,
    UnsupportedError,
    VerificationError,
    WeightSyncError,
)
from weightsync.types import EngineSyncReport, SyncResult


@pytest.mark.parametrize("err, status", [
    (AuthError("x"), 401),
    (UnknownEngineError("x"), 404), (UnknownSessionError("x"), 404), (NotFoundError("x"), 404),
    (IllegalStateError("x"), 409), (SyncInProgressError("x"), 409), (FencedError("x"), 409),
    (ConfigError("x"), 422), (ManifestError("x"), 422),
    (UnsupportedError("x"), 422),  # permanent for this engine: neither a retry nor a state fix
    (EngineError("x"), 503), (ReloadError("x"), 503), (TransferError("x"), 503),
    (VerificationError("x"), 503), (SyncFailedError("x"), 503),
    (DeadlineExceeded("x"), 504),
    (WeightSyncError("x"), 500),
])
def test_every_error_class_has_one_status(err, status):
    assert status_for(err) == status


def _response(status: int, body) -> httpx.Response:
    return httpx.Response(status, json=body, request=httpx.Request("POST", "http://t/x"))


@pytest.mark.parametrize("code, status, cls", [
    ("unsupported", 422, UnsupportedError), ("sync_in_progress", 409, SyncInProgressError),
    ("unknown_engine", 404, UnknownEngineError), ("unauthorized", 401, AuthError),
    ("deadline_exceeded", 504, DeadlineExceeded), ("manifest_error", 422, ManifestError),
    ("validation_error", 422, ConfigError),  # a code the library does not know: by status
    ("something_new", 503, EngineError),
])
def test_client_turns_error_bodies_back_into_typed_errors(code, status, cls):
    err = _error_from(_response(status, {"code": code, "message": "m", "engine": "engine-a"}))
    assert type(err) is cls and err.engine == "engine-a" and err.status_code == status
    assert "m" in str(err)


def test_client_keeps_the_result_of_a_failed_sync_and_survives_non_json():
    result = SyncResult(version=3, ok=False, mode="checkpoint", nbytes=0, engines=(
        EngineSyncReport(engine="engine-a", ok=False, version=2, error="boom", fenced=True),))
    err = _error_from(_response(503, {"code": "sync_failed", "message": "m", "engine": None,
                                      "result": result.model_dump(mode="json")}))
    assert isinstance(err, SyncFailedError) and err.result == result
    plain = httpx.Response(502, text="bad gateway", request=httpx.Request("GET", "http://t/"))
    err = _error_from(plain)
    assert type(err) is WeightSyncError and "bad gateway" in str(err)


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.8.9.1", True), ("::1", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("10.0.0.5", False), ("example.internal", False),
])
def test_loopback_detection(host, loopback):
    assert is_loopback(host) is loopback


def test_non_loopback_bind_needs_a_non_empty_token():
    check_bind(Settings(host="127.0.0.1"))
    check_bind(Settings(host="0.0.0.0", token="s3cret"))
    with pytest.raises(ConfigError, match="without a token"):
        check_bind(Settings(host="0.0.0.0"))
    with pytest.raises(ConfigError, match="empty"):
        check_bind(Settings(host="127.0.0.1", token=""))


def test_sync_failures_keep_their_class_and_result_across_a_process_boundary():
    """Ray pickles an error raised in an actor: a ``SyncFailedError`` subclass (the fleet
    adapter flip's) must arrive as itself, with its engine and per-engine result."""
    import pickle

    from weightsync.errors import AdapterSyncFailedError, SyncFailedError

    for cls in (SyncFailedError, AdapterSyncFailedError):
        e = pickle.loads(pickle.dumps(cls("failed on b", engine="b", result={"failed": ["b"]})))
        assert type(e) is cls and e.engine == "b" and e.result == {"failed": ["b"]}
        assert e.message == "failed on b"
