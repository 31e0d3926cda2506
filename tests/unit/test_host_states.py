"""The engine host's pause: requests past the gate, and what a pause waits for (pure logic: a
stand-in for AsyncLLM's calls; the real ones run in tests/integration and tests/gpu). Sleep and
wake: tests/unit/test_colocated.py."""

import asyncio

import pytest

from weightsync.config import EngineSpec
from weightsync.engine.host import EngineHost
from weightsync.types import EngineState


class _Engine:
    def __init__(self):
        self.calls = []

    async def sleep(self, level):
        self.calls.append(("sleep", level))

    async def wake_up(self, tags=None):
        self.calls.append(("wake_up", tags))

    async def resume_generation(self):
        self.calls.append(("resume",))


def _host():
    h = EngineHost(EngineSpec(name="e", model="/m"))
    h.engine, h.sleep_supported, h.state = _Engine(), True, EngineState.SERVING
    h.gate.open()
    return h


class _Out:
    def __init__(self):
        c = type("C", (), {})()
        c.text, c.token_ids, c.logprobs, c.finish_reason = "x", [1], None, "length"
        self.outputs = [c]


class _GenEngine(_Engine):
    async def generate(self, prompt, params, request_id):
        await asyncio.sleep(0.05)  # the request reaches the engine a little later
        self.calls.append(("started", request_id))
        yield _Out()

    async def pause_generation(self, mode="abort", clear_cache=True):
        self.calls.append(("pause", mode))


def test_sync_waits_for_requests_already_past_the_gate():
    """A request admitted just before begin_sync must reach vLLM before the pause, so it runs
    (and is stamped) on exactly one version instead of being parked across the sync."""
    async def run():
        h = _host()
        h.engine = _GenEngine()
        gen = asyncio.create_task(h.generate(["p"], max_tokens=1))
        while not h.gate.admitted:  # generate passes the gate and is admitted, not yet started
            await asyncio.sleep(0)
        await h.begin_sync(pause_mode="wait", sleep_level=0, deadline_s=5)
        kinds = [c[0] for c in h.engine.calls]
        assert kinds.index("started") < kinds.index("pause")
        (res,) = await gen
        assert res.versions == (0, 0) and res.version == 0

    asyncio.run(run())


class _AbortingEngine(_Engine):
    """Its pause returns at once; the aborted request's final output arrives 0.1 s later (in
    vLLM it travels through the output handler after the scheduler paused)."""

    def __init__(self):
        super().__init__()
        self.paused = asyncio.Event()

    async def generate(self, prompt, params, request_id):
        yield _Out()  # running: its first output
        await self.paused.wait()
        await asyncio.sleep(0.1)
        yield _Out()  # the final output of the aborted request

    async def pause_generation(self, mode="abort", clear_cache=True):
        self.paused.set()


@pytest.mark.parametrize("mode, waits", [("abort", True), ("wait", True), ("keep", False)])
def test_pause_returns_once_in_flight_requests_have_their_final_output(mode, waits):
    """No fixed sleep: an idle pause returns at once; with requests in flight it returns once
    their final outputs are in (each stamped with the version that produced it), except in
    ``keep`` mode, where they finish after the sync."""
    async def run():
        h = _host()
        h.engine = _AbortingEngine()
        t0 = asyncio.get_running_loop().time()
        await h.begin_sync(pause_mode=mode, sleep_level=0, deadline_s=5)  # idle
        assert asyncio.get_running_loop().time() - t0 < 0.05
        await h.abort_sync("test")
        gen = asyncio.create_task(h.generate(["p"], max_tokens=1))
        while not h.gate.running:
            await asyncio.sleep(0)
        await asyncio.sleep(0.01)
        await h.begin_sync(pause_mode=mode, sleep_level=0, deadline_s=5)
        assert gen.done() == waits
        if waits:
            assert (await gen)[0].version == 0
        await h.abort_sync("test")
        await gen

    asyncio.run(run())


class _CountingEngine(_Engine):
    """Records each pause's clear_cache; its requests finish at once."""

    async def pause_generation(self, mode="abort", clear_cache=True):
        self.calls.append(("pause", clear_cache))

    async def generate(self, prompt, params, request_id):
        yield _Out()


def test_a_pause_clears_vllm_caches_only_when_a_request_ran_since_they_were_cleared():
    """Clearing walks every KV block inside vLLM (tens of ms on a large GPU cache): an idle
    engine whose caches nothing has filled since the last clear pauses without it, and the
    sync after the load skips the reset because the caches are known clean either way."""
    async def run():
        h = _host()
        h.engine = _CountingEngine()
        clears = []
        for requests in (0, 1, 0, 0, 2):
            for _ in range(requests):
                await h.generate(["p"], max_tokens=1)
            await h.begin_sync(pause_mode="abort", sleep_level=0, deadline_s=5)
            clears.append(h.engine.calls[-1])
            await h.abort_sync("test")
        # the host starts not knowing what vLLM cached, so its first pause clears
        assert clears == [("pause", True), ("pause", True), ("pause", False), ("pause", False),
                          ("pause", True)]

    asyncio.run(run())
