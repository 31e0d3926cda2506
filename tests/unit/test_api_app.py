"""The app's pure behaviour, in-process (ASGI, no engines attached): auth before anything,
one JSON error shape, request validation, the OpenAPI contract, sessions' handshake logic."""

from __future__ import annotations

import threading

import pytest
from fastapi.testclient import TestClient

from weightsync.api import create_app
from weightsync.api.deps import get_settings
from weightsync.api.fleet import Fleet
from weightsync.api.sessions import ExternalSession
from weightsync.config import Settings
from weightsync.errors import DeadlineExceeded, IllegalStateError, TransferError
from weightsync.types import EngineSyncReport, SyncResult

TOKEN = "unit-token"
POSTS = ["/sleep", "/wake", "/pause", "/resume", "/reload", "/sessions",
         "/sessions/ab12/commit", "/sessions/ab12/abort"]


@pytest.fixture()
def app():
    return create_app(Settings(token=TOKEN))


@pytest.fixture()
def http(app):
    return TestClient(app)  # no lifespan: no engines, the fleet is "still connecting"


@pytest.mark.parametrize("path", POSTS)
def test_auth_comes_first_and_errors_are_json(http, path):
    r = http.post(path, json={})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json() == {"code": "unauthorized", "engine": None,
                        "message": "missing bearer token (Authorization: Bearer <token>)"}
    r = http.post(path, json={}, headers={"Authorization": f"Bearer {TOKEN}x"})
    assert r.status_code == 401 and r.json()["message"] == "wrong bearer token"


def test_cookie_authorises_reads_but_never_writes(http):
    http.cookies.set("weightsync_token", TOKEN)
    assert http.get("/status").status_code == 503  # authorised; no engines attached
    assert http.post("/pause", json={}).status_code == 401


def test_healthz_needs_no_token_and_settings_are_overridable(app, http):
    assert http.get("/healthz").json() == {"status": "ok", "engines": 0}
    icon = http.get("/favicon.ico")  # browsers fetch it for any document, the JSON 401 too
    assert icon.status_code == 200 and icon.headers["content-type"] == "image/svg+xml"
    assert icon.content.startswith(b"<svg")
    app.dependency_overrides[get_settings] = lambda: Settings(token="other")
    assert http.post("/pause", json={}, headers={"Authorization": f"Bearer {TOKEN}"}) \
        .status_code == 401
    assert http.post("/pause", json={}, headers={"Authorization": "Bearer other"}) \
        .status_code == 503


@pytest.mark.parametrize("path, body, where", [
    ("/sleep", {"level": 3}, "body.level"),
    ("/sleep", {"level": 1, "oops": 1}, "body.oops"),
    ("/wake", {"tags": ["brain"]}, "body.tags.0"),
    ("/pause", {"engines": []}, "body.engines"),
    ("/pause", {"engines": ["bad name!"]}, "body.engines.0"),
    ("/reload", {"path": ""}, "body.path"),
    ("/sessions", {"tensors": []}, "body.tensors"),
    ("/sessions", {"tensors": [{"name": "w", "dtype": "complex7", "shape": [1]}]}, "dtype"),
    ("/sessions", {"tensors": [{"name": "w", "dtype": "float32", "shape": [-1]}]}, "shape"),
    ("/sessions/ab12/commit", {"checksums": [-1]}, "body.checksums.0"),
    ("/sessions/NOT-HEX/commit", {"checksums": []}, "path.session"),
])
def test_bad_input_is_422_with_the_field_named(app, http, path, body, where):
    app.state.fleet = Fleet({}, coordinator=None)  # an empty fleet: validation decides
    r = http.post(path, json=body, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 422 and r.json()["code"] == "validation_error"
    assert where in r.json()["message"]


def test_undecodable_body_and_unknown_route_keep_the_json_shape(http):
    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    r = http.post("/pause", content=b"\xc7", headers=auth)
    assert r.status_code == 422 and set(r.json()) == {"code", "message", "engine"}
    r = http.get("/nope", headers=auth)
    assert r.status_code == 404 and r.json()["code"] == "not_found"
    r = http.get("/reload", headers=auth)
    assert r.status_code == 405 and r.json()["code"] == "method_not_allowed"


def test_every_route_declares_its_response_and_errors(app):
    spec = app.openapi()
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            ok = op["responses"].get("200") or op["responses"].get("201")
            assert ok and ok.get("content"), (method, path)
            if path != "/healthz":
                assert "401" in op["responses"], (method, path)
                assert "application/json" in op["responses"]["401"]["content"], (method, path)
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_session_handshake_commit_abort_and_deadline():
    s = ExternalSession("ab", "127.0.0.1", 1234, ["engine-a"])
    with pytest.raises(DeadlineExceeded):
        s.wait_checksums(0.01)
    threading.Timer(0.05, s.commit, args=([7, 8],)).start()
    assert s.wait_checksums(30) == [7, 8]
    with pytest.raises(IllegalStateError, match="already"):
        s.commit([1])
    s2 = ExternalSession("cd", "127.0.0.1", 1234, ["engine-a"])
    s2.abort("trainer crashed")
    with pytest.raises(TransferError, match="trainer crashed"):
        s2.wait_checksums(1)


def test_recent_syncs_keep_the_slowest_engine_per_phase():
    fleet = Fleet({}, coordinator=None, history=2)
    for v in (1, 2, 3):
        fleet.record(SyncResult(version=v, ok=True, mode="checkpoint", nbytes=0, engines=(
            EngineSyncReport(engine="a", ok=True, version=v,
                             seconds={"reload": 0.2, "pause": 0.01, "total": 9.0}),
            EngineSyncReport(engine="b", ok=True, version=v, seconds={"reload": 0.5}))))
    assert [r.version for r in fleet.recent] == [2, 3]
    assert fleet.recent[-1].seconds == {"reload": 0.5, "pause": 0.01}
