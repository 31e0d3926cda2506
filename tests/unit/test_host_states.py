"""The engine host's manual sleep/wake state machine (pure logic: a stand-in for AsyncLLM's
sleep/wake calls; the real ones are exercised on the GPU in tests/gpu)."""

import asyncio

import pytest

from weightsync.config import EngineSpec
from weightsync.engine.host import EngineHost
from weightsync.errors import IllegalStateError
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
    h._serving.set()
    return h


def test_serving_resumes_only_when_weights_and_kv_are_both_awake():
    async def run():
        h = _host()
        await h.sleep(1)
        assert h.state == EngineState.ASLEEP and not h._serving.is_set()
        await h.wake_up(["kv_cache"])
        assert h.state == EngineState.ASLEEP  # weights still asleep: not serving
        await h.wake_up(["weights"])
        assert h.state == EngineState.SERVING and h._serving.is_set()
        assert ("resume",) in h.engine.calls
        with pytest.raises(IllegalStateError):
            await h.wake_up(None)  # nothing asleep any more

    asyncio.run(run())


def test_weights_woken_after_level_2_without_a_sync_fence_the_engine():
    async def run():
        h = _host()
        await h.sleep(2)
        await h.wake_up(["weights"])
        assert h.state == EngineState.FENCED and "level 2" in h.fenced_reason

    asyncio.run(run())


def test_wake_weights_then_kv_after_level_1():
    async def run():
        h = _host()
        await h.sleep(1)
        await h.wake_up(["weights"])
        assert h.state == EngineState.WEIGHTS_AWAKE
        await h.wake_up(["kv_cache"])
        assert h.state == EngineState.SERVING

    asyncio.run(run())


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
        while not h._admitted:  # generate passes the gate and is admitted, not yet started
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
        while not h._running:
            await asyncio.sleep(0)
        await asyncio.sleep(0.01)
        await h.begin_sync(pause_mode=mode, sleep_level=0, deadline_s=5)
        assert gen.done() == waits
        if waits:
            assert (await gen)[0].version == 0
        await h.abort_sync("test")
        await gen

    asyncio.run(run())
