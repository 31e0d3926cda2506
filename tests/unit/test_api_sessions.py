"""``POST /sessions`` and the other requests on the wire (issue 28): a tensor named twice is a
422 naming it, found in one pass; scalars are strict (no ``"yes"`` for true, no ``"1"``, ``1.0``
or ``true`` for an integer, in shapes included)."""

from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from weightsync.api import create_app
from weightsync.api.fleet import Fleet
from weightsync.api.schemas import SessionRequest
from weightsync.config import Settings
from weightsync.transport.packing import plan_buckets
from weightsync.types import TensorSpec

TOKEN = "unit-token"
AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
MAX_NAMES = 200_000  # SessionRequest.tensors' bound


@pytest.fixture()
def http():
    # 16 MiB: 200,000 specs are ~9 MB of JSON, over the default 8 MiB body limit
    app = create_app(Settings(token=TOKEN, max_body_mib=16))
    app.state.fleet = Fleet({}, coordinator=None)  # validation decides before any engine
    return TestClient(app)


def _specs(n: int) -> list[dict]:
    return [{"name": f"t{i}", "dtype": "bool", "shape": []} for i in range(n)]


def test_a_name_listed_twice_is_a_422_naming_it(http):
    tensors = [{"name": "w", "dtype": "float32", "shape": [2]},
               {"name": "b", "dtype": "float32", "shape": [2]},
               {"name": "w", "dtype": "float32", "shape": [2]}]
    r = http.post("/sessions", json={"tensors": tensors}, headers=AUTH)
    assert r.status_code == 422, r.text
    assert r.json()["code"] == "validation_error"
    assert "'w' is listed twice" in r.json()["message"]


def _grows_linearly(seconds_of) -> None:
    """4x the names must take well under 16x the time (what quadratic work takes): compared
    with itself on the same machine at the same moment, not with a wall-clock bound that a
    loaded machine can miss (it was ~1 s at the most names on 2 cores, minutes when the check
    was quadratic)."""
    small, big = seconds_of(MAX_NAMES // 4), seconds_of(MAX_NAMES)
    print(f"\n{MAX_NAMES // 4} names: {small:.2f}s, {MAX_NAMES} names: {big:.2f}s "
          f"({big / small:.1f}x)")
    assert big < 8 * small, (small, big)


def test_duplicates_among_the_most_names_allowed_are_found_in_linear_time(http):
    def seconds_of(n: int) -> float:
        tensors = _specs(n - 1) + [{"name": "t1234", "dtype": "bool", "shape": []}]
        body = json.dumps({"tensors": tensors}).encode()
        t0 = time.perf_counter()
        r = http.post("/sessions", content=body, headers=AUTH)
        took = time.perf_counter() - t0
        assert r.status_code == 422 and "'t1234' is listed twice" in r.json()["message"], r.text
        return took

    _grows_linearly(seconds_of)


def test_the_plan_check_is_linear_too():
    """``TransferPlan`` refuses names sent twice (a library caller, no HTTP in between)."""
    def seconds_of(n: int) -> float:
        specs = [TensorSpec(name=f"t{i}", dtype="bool", shape=()) for i in range(n)]
        specs.append(TensorSpec(name="t7", dtype="bool", shape=()))
        t0 = time.perf_counter()
        with pytest.raises(ValidationError, match=r"tensor names sent twice: \['t7'\]"):
            plan_buckets(specs, 1 << 20, 1)
        return time.perf_counter() - t0

    _grows_linearly(seconds_of)


@pytest.mark.parametrize("path, body, where", [
    ("/sessions", {"tensors": [{"name": "w", "dtype": "float32", "shape": [1]}],
                   "partial": "yes"}, "body.partial"),
    ("/sessions", {"tensors": [{"name": "w", "dtype": "float32", "shape": [1]}],
                   "partial": 1}, "body.partial"),
    ("/sessions", {"tensors": [{"name": "w", "dtype": "float32", "shape": ["1"]}]},
     "body.tensors.0.shape.0"),
    ("/sessions", {"tensors": [{"name": "w", "dtype": "float32", "shape": [1.0]}]},
     "body.tensors.0.shape.0"),
    ("/sessions", {"tensors": [{"name": "w", "dtype": "float32", "shape": [True]}]},
     "body.tensors.0.shape.0"),
    ("/sessions", {"tensors": [{"name": "w", "dtype": "float32", "shape": "1"}]},
     "body.tensors.0.shape"),
    ("/sessions", {"tensors": [{"name": 5, "dtype": "float32", "shape": [1]}]},
     "body.tensors.0.name"),
    ("/sessions", {"tensors": [{"name": "w", "dtype": "float32", "shape": [1]}],
                   "sleep_level": True}, "body.sleep_level"),
    ("/sessions", {"tensors": [{"name": "w", "dtype": "float32", "shape": [1]}],
                   "sleep_level": "1"}, "body.sleep_level"),
    ("/sessions", {"tensors": [{"name": "w", "dtype": "float32", "shape": [1]}],
                   "sleep_level": 1.0}, "body.sleep_level"),
    ("/sessions", {"tensors": [{"name": "w", "dtype": "float32", "shape": [1]}],
                   "port": "8000"}, "body.port"),
    ("/reload", {"partial": "yes"}, "body.partial"),
    ("/reload", {"partial": "true"}, "body.partial"),
    ("/sleep", {"level": True}, "body.level"),
    ("/sleep", {"level": "2"}, "body.level"),
    ("/sessions/ab12/commit", {"checksums": ["7"]}, "body.checksums.0"),
    ("/sessions/ab12/commit", {"checksums": [7.0]}, "body.checksums.0"),
])
def test_wire_scalars_are_strict(http, path, body, where):
    r = http.post(path, json=body, headers=AUTH)
    assert r.status_code == 422 and r.json()["code"] == "validation_error", r.text
    assert where in r.json()["message"]


def test_well_typed_requests_still_parse():
    req = SessionRequest.model_validate_json(json.dumps({
        "tensors": [{"name": "w", "dtype": "float32", "shape": [2, 3]},
                    {"name": "s", "dtype": "int64", "shape": []}],
        "partial": True, "sleep_level": 1, "port": 8000}))
    assert req.tensors[0].shape == (2, 3) and req.partial and req.sleep_level == 1
    # Python callers (the client) pass tuples and ints as before
    spec = TensorSpec(name="w", dtype="float32", shape=(2, 3))
    assert SessionRequest(tensors=[spec], partial=False, sleep_level=2).tensors == [spec]
