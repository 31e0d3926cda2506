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
    unauthorized = {"code": "unauthorized", "engine": None,
                    "message": "missing or wrong bearer token (Authorization: Bearer <token>)"}
    for headers in ({}, {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": TOKEN}):
        r = http.post(path, json={}, headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json() == unauthorized


@pytest.mark.parametrize("body", [b"{not json", b"[" * 100_000 + b"]" * 100_000,
                                  b'{"level": 3}', b"x" * (9 << 20)])
def test_without_a_token_no_body_is_read_or_parsed(http, body):
    """401, never 422 or 413: the gate decides before FastAPI reads the body."""
    r = http.post("/sleep", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 401 and r.json()["code"] == "unauthorized"


def test_bodies_over_the_limit_are_413_before_parsing(app, http):
    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    app.state.fleet = Fleet({}, coordinator=None)
    big = b'{"tensors": [' + b",".join([b'{"name":"w","dtype":"float32","shape":[1]}'] *
                                         250_000) + b"]}"
    assert len(big) > 8 << 20
    r = http.post("/sessions", content=big, headers=auth)
    assert r.status_code == 413 and r.json()["code"] == "body_too_large"

    def chunks():  # no Content-Length: the gate counts
        for _ in range(10):
            yield b" " * (1 << 20)

    r = http.post("/sessions", content=chunks(), headers=auth)
    assert r.status_code == 413 and r.json()["code"] == "body_too_large"
    r = http.post("/login", content=b"token=" + b"x" * 9000,
                  headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 413


def test_credentials_in_urls_are_refused(http):
    for url in ("/?token=" + TOKEN, "/status?access_token=x", "/pause?Token=1"):
        r = http.request("POST" if "pause" in url else "GET", url,
                         headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 422 and r.json()["code"] == "credentials_in_url", url
        assert TOKEN not in r.text


def test_page_login_sets_a_session_cookie_that_is_not_the_token(http):
    assert http.get("/login").status_code == 200 and 'name="token"' in http.get("/login").text
    r = http.post("/login", data={"token": "wrong"}, follow_redirects=False)
    assert r.status_code == 401 and not r.cookies
    r = http.post("/login", data={"token": TOKEN}, follow_redirects=False,
                  headers={"Host": "evil.example"})
    assert r.status_code == 303 and r.headers["location"] == "./"  # never built from Host
    cookie = r.cookies["weightsync_session"]
    assert cookie and TOKEN not in cookie
    assert "httponly" in r.headers["set-cookie"].lower()
    assert "samesite=strict" in r.headers["set-cookie"].lower()
    assert http.get("/status").status_code == 503  # authorised; no engines attached
    assert http.post("/pause", json={}).status_code == 401  # a cookie never authorises writes
    http.cookies.clear()
    http.cookies.set("weightsync_session", TOKEN)  # the token itself is no session
    assert http.get("/status").status_code == 401
    http.cookies.set("weightsync_session", "forged")
    assert http.get("/status").status_code == 401


def test_trailing_slashes_are_not_redirected_through_the_host_header(http):
    r = http.get("/status/", headers={"Authorization": f"Bearer {TOKEN}", "Host": "evil.example"},
                 follow_redirects=False)
    assert r.status_code == 404 and "location" not in r.headers


def test_healthz_needs_no_token_and_settings_are_overridable(app, http):
    assert http.get("/healthz").json() == {"status": "ok", "engines": 0}
    icon = http.get("/favicon.ico")  # browsers fetch it for any document, the JSON 401 too
    assert icon.status_code == 200 and icon.headers["content-type"] == "image/svg+xml"
    assert icon.content.startswith(b"<svg")
    app.dependency_overrides[get_settings] = lambda: Settings(token=TOKEN, max_body_mib=1)
    assert http.post("/pause", json={}, headers={"Authorization": f"Bearer {TOKEN}"}) \
        .status_code == 503


def test_tokens_with_surrounding_whitespace_are_refused_at_start():
    from weightsync.errors import ConfigError

    for bad in (" x", "x\n", "\tx"):
        with pytest.raises(ConfigError, match="whitespace"):
            create_app(Settings(token=bad))


@pytest.mark.parametrize("path, body, where", [
    ("/sleep", {"level": 3}, "body.level"),
    ("/sleep", {"level": 1, "oops": 1}, "body.oops"),
    ("/wake", {"tags": ["brain"]}, "body.tags.0"),
    ("/pause", {"engines": []}, "body.engines"),
    ("/pause", {"engines": ["bad name!"]}, "body.engines.0"),
    ("/reload", {"path": ""}, "body.path"),
    ("/reload", {"path": "relative/dir"}, "body.path"),
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
            ok = op["responses"].get("200") or op["responses"].get("201") or \
                op["responses"].get("303")
            assert ok and (ok.get("content") or "303" in op["responses"]), (method, path)
            if path not in ("/healthz", "/login") or method == "post":
                assert "401" in op["responses"], (method, path)
                assert "application/json" in op["responses"]["401"]["content"], (method, path)
            if method == "post" and path != "/login":
                assert "413" in op["responses"], (method, path)
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_the_schema_states_what_the_server_enforces(app):
    schemas = app.openapi()["components"]["schemas"]
    assert schemas["ReloadRequest"]["properties"]["path"]["anyOf"][0]["pattern"].startswith("^/")
    dtype = schemas["TensorSpec"]["properties"]["dtype"]
    assert set(dtype["enum"]) >= {"float32", "bfloat16", "int64"}
    assert schemas["TensorSpec"]["properties"]["shape"]["items"]["minimum"] == 0
    assert "partial" in schemas["ReloadRequest"]["properties"]
    assert "partial" in schemas["SessionRequest"]["properties"]
    checksum = schemas["CommitRequest"]["properties"]["checksums"]["items"]
    assert checksum["minimum"] == 0 and checksum["exclusiveMaximum"] == 2.0 ** 64


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


def test_405_names_every_method_of_the_path(http):
    r = http.request("PUT", "/login")
    assert r.status_code == 405 and r.headers["allow"] == "GET, POST"
    r = http.request("DELETE", "/healthz")
    assert r.status_code == 405 and r.headers["allow"] == "GET"


@pytest.mark.parametrize("method,path", [("post", "/v1/completions"),
                                         ("post", "/v1/chat/completions"),
                                         ("get", "/v1/models")])
def test_rollout_routes_are_gated_documented_and_say_when_no_router_runs(app, http, method,
                                                                        path):
    """The ``/v1`` routes skip FastAPI's request handling (``ProxiedRoute``): the gate still
    answers 401 first, the app's handlers still shape a 503 while no router runs, and OpenAPI
    still documents the router's own parameters and the bearer scheme."""
    call = getattr(http, method)
    kwargs = {"json": {"model": "m", "prompt": "x"}} if method == "post" else {}
    r = call(path, **kwargs)
    assert r.status_code == 401 and r.json()["code"] == "unauthorized"
    r = call(path, headers={"Authorization": f"Bearer {TOKEN}"}, **kwargs)
    assert r.status_code == 503 and set(r.json()) == {"code", "message", "engine"}
    assert "rollout router is not running" in r.json()["message"]
    op = app.openapi()["paths"][path][method]
    assert op["security"] == [{"HTTPBearer": []}] and "503" in op["responses"]
    if method == "post":
        assert {p["name"] for p in op["parameters"]} >= {"X-Session-ID", "X-Min-Weight-Version"}
