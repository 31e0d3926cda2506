"""Readers never wait on engine work (issue 28: ``/healthz`` and ``/status`` within 10 ms p99
while reloads and syncs run): ``/status`` answers from the statuses last seen, kept fresh by
the poll and by every change the service makes; no dependency runs in a worker thread; the
coordinator's blocking calls get the fleet's own thread, and a reload that cannot start takes
none. The latency itself is measured on real engines by ``benchmarks/control_latency.py``."""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient

from weightsync.api import create_app
from weightsync.api.fleet import Fleet
from weightsync.api.view import FleetView
from weightsync.config import Settings
from weightsync.types import EngineState, EngineStatus

TOKEN = "unit-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
S = EngineState


def _status(name: str, state: EngineState = S.SERVING, version: int = 0) -> EngineStatus:
    return EngineStatus(name=name, state=state, version=version, device="cpu",
                        sleep_supported=False, model="tiny")


class _Engine:
    """An actor handle's shape (``actor.status.remote()`` is awaitable) whose status answers
    after ``delay`` seconds, with whatever ``state`` holds when it is asked."""

    def __init__(self, name: str) -> None:
        self.name, self.state, self.delay, self.asked = name, S.SERVING, 0.0, 0

    def __getattr__(self, method: str) -> SimpleNamespace:
        assert method == "status", method

        async def answer() -> EngineStatus:
            self.asked += 1
            state = self.state
            await asyncio.sleep(self.delay)
            return _status(self.name, state)

        return SimpleNamespace(remote=lambda: answer())


def _fleet(*names: str) -> tuple[Fleet, dict[str, _Engine]]:
    engines = {n: _Engine(n) for n in names}
    return Fleet(engines, coordinator=SimpleNamespace(version=3)), engines


# ---- the view -------------------------------------------------------------------------------
def test_a_reply_asked_earlier_never_replaces_one_asked_later():
    view = FleetView(["a", "b"])
    assert view.statuses() is None and view.age() == float("inf")
    view.update([_status("a", S.PAUSED)], asked_at=10.0)
    assert view.statuses() is None  # b never seen
    view.update([_status("a", S.SERVING), _status("b")], asked_at=5.0)  # a slow poll lands
    assert [s.state for s in view.statuses()] == [S.PAUSED, S.SERVING]
    view.update([_status("a", S.FENCED)], asked_at=10.0)  # asked at the same time: newest wins
    assert view.statuses()[0].state == S.FENCED
    assert view.age(now=12.0) == pytest.approx(7.0)  # b's answer is the oldest


# ---- the fleet ------------------------------------------------------------------------------
def test_seen_answers_from_memory_while_an_engine_is_slow():
    fleet, engines = _fleet("a", "b")

    async def main() -> None:
        assert [s.state for s in await fleet.seen()] == [S.SERVING] * 2  # the first read asks
        engines["a"].state, engines["a"].delay = S.PAUSED, 5.0  # busy in a long reload
        t = time.perf_counter()
        held = await fleet.seen()
        assert time.perf_counter() - t < 0.05 and held[0].state == S.SERVING
        watch = asyncio.create_task(fleet.watch(period_s=0.01))
        engines["a"].delay = 0.0
        await asyncio.sleep(0.2)  # the poll catches a change made outside the service
        assert (await fleet.seen())[0].state == S.PAUSED
        watch.cancel()

    asyncio.run(main())


def test_a_stale_view_is_asked_again_in_the_background_without_a_poll(monkeypatch):
    from weightsync.api import fleet as fleet_module

    monkeypatch.setattr(fleet_module, "STALE_S", 0.0)
    fleet, engines = _fleet("a")

    async def main() -> None:
        await fleet.seen()
        engines["a"].state, engines["a"].delay = S.PAUSED, 0.05
        for _ in range(3):  # answers at once, asks behind: one ask in flight at a time
            assert (await fleet.seen())[0].state == S.SERVING
        await asyncio.sleep(0.2)
        assert engines["a"].asked == 2
        assert (await fleet.seen())[0].state == S.PAUSED

    asyncio.run(main())


def test_blocking_calls_run_in_the_fleets_own_thread():
    fleet, _ = _fleet("a")

    async def main() -> str:
        return await fleet.run(lambda: threading.current_thread().name)

    try:
        assert asyncio.run(main()).startswith("ws-fleet")
    finally:
        fleet.close()


# ---- the app --------------------------------------------------------------------------------
def _served(*names: str) -> tuple[TestClient, Fleet, dict[str, _Engine]]:
    app = create_app(Settings(token=TOKEN))
    fleet, engines = _fleet(*names)
    app.state.fleet = fleet
    return TestClient(app), fleet, engines


def test_status_does_not_wait_for_a_busy_engine():
    http, _, engines = _served("a", "b")
    assert http.get("/status", headers=AUTH).json()["version"] == 3
    engines["b"].delay = 5.0
    t = time.perf_counter()
    r = http.get("/status", headers=AUTH)
    took = time.perf_counter() - t
    assert r.status_code == 200 and took < 1.0, took
    assert [e["state"] for e in r.json()["engines"]] == ["serving", "serving"]
    assert http.get("/engines", headers=AUTH).status_code == 200


def test_a_reload_that_cannot_start_takes_no_thread_and_asks_no_engine():
    http, fleet, engines = _served("a")
    asked = engines["a"].asked
    with fleet.exclusive():
        r = http.post("/reload", json={}, headers=AUTH)
    assert (r.status_code, r.json()["code"]) == (409, "sync_in_progress")
    assert fleet._executor is None and engines["a"].asked == asked


def _dependencies(dependant: Any) -> list[Any]:
    out = []
    for dep in dependant.dependencies:
        out.append(dep.call)
        out.extend(_dependencies(dep))
    return out


def test_no_route_runs_a_dependency_or_handler_in_a_worker_thread():
    """FastAPI runs a plain ``def`` in its thread pool: a hop per call, queued behind every
    other request's (50 racing reloads made ~200)."""
    app = create_app(Settings(token=TOKEN))
    for route in app.routes:
        dependant = getattr(route, "dependant", None)
        if dependant is None:
            continue
        for call in (dependant.call, *_dependencies(dependant)):
            target = call if inspect.isfunction(call) else type(call).__call__
            assert inspect.iscoroutinefunction(target), (route.path, call)
