"""The control plane over the in-process fleet (``weightsync.testing.fleet``): real routes, real
coordinator, real engine hosts and workers; only vLLM and Ray are stood in for. What a client
sees when a checkpoint is malformed (issue 28): a 422 naming the problem, and every engine as it
was found."""

from __future__ import annotations

import asyncio
import json
import os
import struct
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient

from weightsync.api import create_app
from weightsync.api.fleet import Fleet
from weightsync.config import Settings
from weightsync.coordinator import SyncCoordinator
from weightsync.remote import HostCall
from weightsync.testing.fleet import save_tiny_model

TOKEN = "unit-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class _Actor:
    """A Ray actor handle's shape (``actor.method.remote(...)`` is awaitable) over an
    in-process host, for ``Fleet``."""

    def __init__(self, engines: Any, name: str) -> None:
        self._engines, self._name = engines, name

    def __getattr__(self, method: str) -> SimpleNamespace:
        def remote(*args: Any, **kwargs: Any) -> asyncio.Future:
            return asyncio.wrap_future(self._engines.inner.start(
                self._name, HostCall(method, args, kwargs)))

        return SimpleNamespace(remote=remote)


@pytest.fixture()
def served(local_fleet, tmp_path):
    """(client, load root, coordinator) over engines ``a`` and ``b``."""
    root = tmp_path / "root"
    root.mkdir()
    engines = local_fleet()
    coord = SyncCoordinator(engines)
    app = create_app(Settings(token=TOKEN, load_roots=(str(root),)))
    app.state.fleet = Fleet({n: _Actor(engines, n) for n in engines.handles}, coord)
    try:
        yield TestClient(app), root, coord
    finally:
        coord.close()


def _bad_file(d: Path, header: dict | None = None, data: bytes = b"", raw: bytes | None = None,
              name: str = "model.safetensors") -> Path:
    d.mkdir()
    text = raw if raw is not None else json.dumps(header).encode()
    (d / name).write_bytes(struct.pack("<Q", len(text)) + text + data)
    return d


def _t(shape=(8, 8), offsets=(0, 256), dtype="F32") -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


DEEP = 100_000
MALFORMED = {  # issue 28, finding 2 (each is a ManifestError in weightsync.checkpoint)
    "overlapping": ({"proj.weight": _t(), "proj.bias": _t((8,), (0, 32))}, b"\0" * 256, None),
    "shifted": ({"proj.weight": _t(offsets=(32, 288))}, b"\0" * 288, None),
    "trailing": ({"proj.weight": _t()}, b"\0" * 300, None),
    "metadata": ({"__metadata__": {"format": 1}, "proj.weight": _t()}, b"\0" * 256, None),
    "string_shape": ({"proj.weight": _t(shape=("8", "8"))}, b"\0" * 256, None),
    "float_offsets": ({"proj.weight": _t(offsets=(0.0, 256.0))}, b"\0" * 256, None),
    "shape_1e400": (None, b"\0" * 4,
                    b'{"w":{"dtype":"F32","shape":[1e400],"data_offsets":[0,4]}}'),
    "deep": (None, b"", b"[" * DEEP + b"]" * DEEP),
}


def _states(http: TestClient) -> dict[str, tuple[str, int]]:
    r = http.get("/status", headers=AUTH)
    assert r.status_code == 200, r.text
    return {e["name"]: (e["state"], e["version"]) for e in r.json()["engines"]}


def test_each_malformed_checkpoint_is_a_422_and_no_engine_changes(served):
    http, root, _ = served
    before = _states(http)
    assert {s for s, _ in before.values()} == {"serving"}
    for case, (header, data, raw) in MALFORMED.items():
        d = _bad_file(root / case, header, data, raw)
        r = http.post("/reload", json={"path": str(d)}, headers=AUTH)
        assert r.status_code == 422, (case, r.status_code, r.text)
        body = r.json()
        assert body["code"] == "manifest_error" and "safetensors header" in body["message"], body
        assert "Error" not in body["message"].split(":")[0], body  # no exception name
        assert _states(http) == before, case
    idx = root / "index_list"
    save_tiny_model(idx)
    (idx / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": [["proj.weight", "model.safetensors"]]}))
    r = http.post("/reload", json={"path": str(idx)}, headers=AUTH)
    assert (r.status_code, r.json()["code"]) == (422, "manifest_error"), r.text
    assert "weight_map" in r.json()["message"]
    assert _states(http) == before


def test_a_good_checkpoint_still_reloads(served):
    http, root, _ = served
    good = save_tiny_model(root / "good", seed=3)
    r = http.post("/reload", json={"path": str(good)}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert {s for s, _ in _states(http).values()} == {"serving"}


def _checkpoint_bytes(directory: Path) -> int:
    from weightsync.checkpoint import read_checkpoint

    return read_checkpoint(str(directory)).nbytes


def test_a_reload_counts_the_checkpoints_bytes(served):
    http, root, coord = served
    good = save_tiny_model(root / "counted", seed=4)
    expected = _checkpoint_bytes(good)
    assert expected > 0
    r = http.post("/reload", json={"path": str(good)}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["nbytes"] == expected
    metric = coord.metrics.bytes.labels("a", "checkpoint")._value.get()
    assert metric == expected


@pytest.fixture()
def kept_stdout():
    """vLLM's ``suppress_stdout`` (around every gloo group's creation) swaps fd 1 and is not
    thread-safe: with the trainer and every engine's worker creating their groups at once in
    this one process, fd 1 can be left on /dev/null, and pytest's own output with it. Put it
    back after the test (each rank is a process of its own outside the tests)."""
    saved = os.dup(1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _join_threads() -> list[str]:
    import threading

    return [t.name for t in threading.enumerate() if t.name.startswith("ws-join-")]


@pytest.mark.parametrize("rendezvous", [3.0, None], ids=["rendezvous-3s", "default-deadlines"])
def test_abort_before_the_trainer_joins_ends_the_session_within_a_second(local_fleet,
                                                                          kept_stdout,
                                                                          rendezvous):
    """The trainer opens a session and gives up before it hosts the group: the abort ends the
    session at once (not at the rendezvous deadline), every engine serves its old version,
    the workers stop dialling, and the fleet takes the next session right away."""
    import vllm.distributed.utils  # noqa: F401 - imported here, not within a rendezvous deadline

    from weightsync.config import Deadlines, TransferConfig
    from weightsync.testing.fleet import TinyModel
    from weightsync.transport.broadcast import BroadcastSender, open_group
    from weightsync.types import TransferPlan

    engines = local_fleet()
    deadlines = Deadlines() if rendezvous is None else Deadlines(rendezvous=rendezvous)
    coord = SyncCoordinator(engines, TransferConfig(deadlines=deadlines))
    app = create_app(Settings(token=TOKEN))
    app.state.fleet = Fleet({n: _Actor(engines, n) for n in engines.handles}, coord)
    http = TestClient(app)
    model = TinyModel.seeded(5)
    specs = [{"name": n, "dtype": "float32", "shape": list(p.shape)}
             for n, p in model.named_parameters()]
    try:
        before = _states(http)
        r = http.post("/sessions", json={"tensors": specs}, headers=AUTH)
        assert r.status_code == 201, r.text
        end = time.monotonic() + 5.0
        while len(_join_threads()) < 2 and time.monotonic() < end:
            time.sleep(0.01)
        assert len(_join_threads()) == 2  # both engines' workers dial the trainer's address
        t0 = time.perf_counter()  # the trainer never hosts the group, and gives up
        r = http.post(f"/sessions/{r.json()['session']}/abort", json={}, headers=AUTH)
        took = time.perf_counter() - t0
        print(f"\nabort before the trainer joined: {took:.2f}s "
              f"(rendezvous deadline {deadlines.rendezvous:g} s)")
        assert r.status_code == 200 and not r.json()["ok"], r.text
        assert took < 1.0
        assert _states(http) == before  # serving, old version, nobody fenced
        end = time.monotonic() + 1.0
        while _join_threads() and time.monotonic() < end:
            time.sleep(0.02)
        assert not _join_threads()  # every cancelled join stopped dialling
        if rendezvous is not None:
            return  # (a 3 s rendezvous is too tight for a real sync on a loaded 2-core box)

        # the fleet takes the next session at once, and it syncs
        r = http.post("/sessions", json={"tensors": specs}, headers=AUTH)
        assert r.status_code == 201, r.text
        info = r.json()
        plan = TransferPlan.model_validate(info["plan"])
        group = open_group(info["backend"], info["host"], info["port"], 0,
                           info["world_size"], deadlines.rendezvous)
        try:
            sums = BroadcastSender(group).send(plan, model, deadlines.transfer)
        finally:
            group.close()
        r = http.post(f"/sessions/{info['session']}/commit", json={"checksums": sums},
                      headers=AUTH)
        assert r.status_code == 200 and r.json()["ok"], r.text
        assert {(s, v) for s, v in _states(http).values()} == {("serving", info["version"])}
    finally:
        coord.close()
