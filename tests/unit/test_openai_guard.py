"""The guard in front of vLLM's OpenAI app and the gated engine client (pure ASGI: a stand-in
for vLLM's app that calls ``engine_client.generate`` as vLLM's handlers do, and a stand-in
engine; the real app on real engines: tests/integration/test_openai_engine_cpu.py)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from weightsync.config import EngineSpec
from weightsync.engine.adapters import Adapters
from weightsync.engine.gated_engine import GatedEngineClient
from weightsync.engine.openai_guard import MAX_SALT, OpenAIGuard, salted
from weightsync.engine.serving import ServingGate
from weightsync.engine.worker_calls import WorkerCalls
from weightsync.errors import WeightSyncError
from weightsync.types import EngineState, EngineStatus

TOKEN = "t0k3n"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class _Host:
    def __init__(self) -> None:
        self.gate, self.version = ServingGate(), 3
        self.state, self.fenced_reason, self.owner = EngineState.SERVING, None, None
        self.adapters = Adapters(EngineSpec(name="e", model="/m"), WorkerCalls("e"))  # none
        self.gate.open()

    def status(self) -> EngineStatus:
        return EngineStatus(name="e", state=self.state, version=self.version, device="cpu",
                            sleep_supported=False, model="/m", fenced_reason=self.fenced_reason,
                            owner=self.owner, last_sync={"total": 2.2})


class _Engine:
    """Yields ``steps`` outputs, each after ``step`` (a coroutine function, if set)."""

    def __init__(self, steps: int = 2) -> None:
        self.steps, self.step, self.calls = steps, None, []

    async def generate(self, prompt, params, request_id, **kw):
        self.calls.append((prompt, kw))
        for i in range(self.steps):
            if self.step is not None:
                await self.step(i)
            yield f"out{i}"

    async def get_supported_tasks(self):
        return ("generate",)


def _vllm_like(client: GatedEngineClient, seen: list) -> Starlette:
    """What the guard fronts: routes that call the engine client as vLLM's handlers do."""

    async def completions(request: Request) -> Response:
        body = await request.json()
        seen.append(body)
        if body.get("close_gate_first"):  # a sync began while vLLM rendered the prompt
            client._host.gate.close()
        gen = client.generate(body.get("prompt"), None, "r1", priority=0)
        if body.get("stream"):
            async def events():
                try:
                    async for out in gen:
                        yield f"data: {json.dumps({'text': out})}\n\n"
                except WeightSyncError as e:  # vLLM: an error chunk
                    yield f"data: {json.dumps({'error': str(e)})}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        try:
            outs = [o async for o in gen]
        except WeightSyncError as e:  # vLLM: its error response
            return JSONResponse({"error": str(e)}, status_code=500)
        return JSONResponse({"choices": outs, "salt": body.get("cache_salt")})

    async def ok(request: Request) -> Response:
        seen.append(request.url.path)
        return JSONResponse({"ok": True})

    return Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]),
                             Route("/v1/models", ok), Route("/health", ok),
                             Route("/pause", ok, methods=["POST"]),
                             Route("/collective_rpc", ok, methods=["POST"])])


@pytest.fixture()
def rig():
    host, engine, seen = _Host(), _Engine(), []
    client = GatedEngineClient(engine, host)
    guard = OpenAIGuard(_vllm_like(client, seen), host, "e", TOKEN)
    return host, engine, seen, guard


def _run(guard, fn):
    async def go():
        transport = httpx.ASGITransport(app=guard)
        async with httpx.AsyncClient(transport=transport, base_url="http://e") as c:
            return await fn(c)
    return asyncio.run(go())


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"},
                                     {"Authorization": TOKEN}])
@pytest.mark.parametrize("path", ["/health", "/v1/models", "/pause", "/metrics"])
def test_every_path_needs_the_bearer_token(rig, headers, path):
    host, _, seen, guard = rig
    r = _run(guard, lambda c: c.get(path, headers=headers))
    assert r.status_code == 401 and r.json()["code"] == "unauthorized"
    assert "x-weight-version" not in r.headers and not seen


@pytest.mark.parametrize("path", ["/pause", "/collective_rpc", "/v1/load_lora_adapter",
                                  "/v1/completions/", "/metrics/x", "/invocations"])
def test_routes_outside_the_allowlist_are_404_and_never_reach_vllm(rig, path):
    host, _, seen, guard = rig
    r = _run(guard, lambda c: c.post(path, headers=AUTH, json={}))
    assert r.status_code == 404 and r.json() == {"code": "not_found", "engine": "e",
                                                 "message": f"{path} is not served here"}
    assert not seen


def test_a_completion_is_admitted_counted_salted_and_stamped(rig):
    host, engine, seen, guard = rig

    async def step(i):
        assert host.gate.running == 1  # counted in flight like a Ray-path request
    engine.step = step
    r = _run(guard, lambda c: c.post("/v1/completions", headers=AUTH,
                                     json={"prompt": "p", "cache_salt": "mine"}))
    assert r.status_code == 200 and r.headers["x-weight-version"] == "3"
    assert r.json() == {"choices": ["out0", "out1"], "salt": "weightsync-v3-mine",
                        "weight_version": 3, "weight_versions": [3, 3]}
    assert int(r.headers["content-length"]) == len(r.content)
    assert engine.calls == [("p", {"priority": 0})]  # vLLM's own keywords pass through
    assert host.gate.running == 0 and host.gate.admitted == 0 and not host.gate.caches_clean


def test_a_version_change_mid_request_shows_in_the_body_and_in_each_chunk(rig):
    host, engine, seen, guard = rig

    async def step(i):
        host.version = 3 + i  # a keep-mode sync committed between the two outputs
    engine.step = step
    r = _run(guard, lambda c: c.post("/v1/completions", headers=AUTH, json={"prompt": "p"}))
    assert r.json()["weight_version"] is None and r.json()["weight_versions"] == [3, 4]
    host.version = 3
    r = _run(guard, lambda c: c.post("/v1/completions", headers=AUTH,
                                     json={"prompt": "p", "stream": True}))
    events = [e for e in r.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and r.headers["x-weight-version"] == "3"
    assert [json.loads(e[6:]) for e in events[:-1]] == [
        {"text": "out0", "weight_version": 3}, {"text": "out1", "weight_version": 4}]


def test_a_closed_gate_is_waited_for_then_503_with_retry_after(rig):
    host, _, seen, guard = rig

    async def both(c):
        host.gate.close()
        short = await c.post("/v1/completions", json={"prompt": "p"},
                             headers={**AUTH, "X-Wait-S": "0.05"})

        async def commit():
            await asyncio.sleep(0.1)
            host.version = 4
            host.gate.open()
        task = asyncio.create_task(commit())
        waited = await c.post("/v1/completions", headers=AUTH, json={"prompt": "p"})
        await task
        return short, waited
    short, waited = _run(guard, both)
    assert short.status_code == 503 and short.headers["retry-after"] == "3"
    assert short.json()["code"] == "deadline_exceeded" and len(seen) == 1
    assert waited.status_code == 200 and waited.json()["weight_versions"] == [4, 4]
    assert waited.json()["salt"] == "weightsync-v4"


@pytest.mark.parametrize("state, owner, code", [
    (EngineState.FENCED, None, "fenced"), (EngineState.STOPPED, None, "engine_error"),
    (EngineState.ASLEEP, None, "engine_error")])
def test_an_engine_that_cannot_serve_is_503_at_once(rig, state, owner, code):
    host, _, seen, guard = rig
    host.state, host.owner, host.fenced_reason = state, owner, "bad load"
    host.gate.close()
    r = _run(guard, lambda c: c.post("/v1/completions", json={"prompt": "p"},
                                     headers={**AUTH, "X-Wait-S": "60"}))
    assert r.status_code == 503 and r.json()["code"] == code and "retry-after" not in r.headers
    assert _run(guard, lambda c: c.get("/health", headers=AUTH)).status_code == 503
    assert not seen


def test_asleep_for_a_sync_is_waited_for(rig):
    host, _, _, guard = rig
    host.state, host.owner = EngineState.ASLEEP, "coordinator"
    host.gate.close()
    r = _run(guard, lambda c: c.post("/v1/completions", json={"prompt": "p"},
                                     headers={**AUTH, "X-Wait-S": "0.05"}))
    assert r.status_code == 503 and r.json()["code"] == "deadline_exceeded"


def test_min_weight_version_above_the_engines_is_409(rig):
    host, _, seen, guard = rig
    r = _run(guard, lambda c: c.post("/v1/completions", json={"prompt": "p"},
                                     headers={**AUTH, "X-Min-Weight-Version": "4"}))
    assert r.status_code == 409 and r.json()["code"] == "weight_version_behind" and not seen
    r = _run(guard, lambda c: c.post("/v1/completions", json={"prompt": "p"},
                                     headers={**AUTH, "X-Min-Weight-Version": "3"}))
    assert r.status_code == 200


@pytest.mark.parametrize("header", [{"X-Wait-S": "soon"}, {"X-Wait-S": "-1"},
                                    {"X-Min-Weight-Version": "1.5"}])
def test_bad_headers_are_422(rig, header):
    _, _, seen, guard = rig
    r = _run(guard, lambda c: c.post("/v1/completions", json={}, headers={**AUTH, **header}))
    assert r.status_code == 422 and r.json()["code"] == "invalid_header" and not seen


@pytest.mark.parametrize("stream", [False, True])
def test_a_gate_closed_while_vllm_rendered_is_the_guards_503(rig, stream):
    """The guard let the request in; a sync closed the gate before vLLM called generate and
    did not open it in time: the engine client refuses, and the client gets the guard's 503
    instead of vLLM's error (or an error chunk)."""
    host, engine, _, guard = rig
    r = _run(guard, lambda c: c.post("/v1/completions", headers={**AUTH, "X-Wait-S": "0.05"},
                                     json={"prompt": "p", "close_gate_first": True,
                                           "stream": stream}))
    assert r.status_code == 503 and r.json()["code"] == "deadline_exceeded"
    assert r.headers["retry-after"] == "3" and not engine.calls
    assert host.gate.admitted == 0 and host.gate.running == 0


def test_other_allowed_routes_pass_with_the_current_version(rig):
    host, _, seen, guard = rig
    r = _run(guard, lambda c: c.get("/v1/models", headers=AUTH))
    assert r.status_code == 200 and r.json() == {"ok": True}
    assert r.headers["x-weight-version"] == "3" and seen == ["/v1/models"]


def test_tokens_granted_later_are_accepted_too_and_the_oldest_goes(rig):
    _, _, _, guard = rig

    def status(token: str) -> int:
        return _run(guard, lambda c: c.get("/v1/models", headers={
            "Authorization": f"Bearer {token}"})).status_code

    guard.grant("router-2")  # a second router: both work
    assert _run(guard, lambda c: c.get("/v1/models", headers=AUTH)).status_code == 200
    assert status("router-2") == 200 and status("router-3") == 401
    for i in range(3, 3 + guard.TOKENS - 1):
        guard.grant(f"router-{i}")
    assert _run(guard, lambda c: c.get("/v1/models", headers=AUTH)).status_code == 401
    assert all(status(f"router-{i}") == 200 for i in range(2, 2 + guard.TOKENS))
    with pytest.raises(ValueError):
        guard.grant(" spaced ")


def test_salts_name_the_version_and_keep_the_callers():
    def salt(body, v=7):
        return json.loads(salted(json.dumps(body).encode(), v))["cache_salt"]
    assert salt({}) == "weightsync-v7"
    assert salt({"cache_salt": "abc"}) == "weightsync-v7-abc"
    long = salt({"cache_salt": "x" * 200})
    assert len(long) <= MAX_SALT and long.startswith("weightsync-v7-") and long != salt(
        {"cache_salt": "y" * 200})
    for untouched in (b"not json", b"[1]", b'{"cache_salt": ""}', b'{"cache_salt": 3}'):
        assert salted(untouched, 7) == untouched  # vLLM answers these itself


def test_the_engine_client_passes_everything_else_to_the_engine():
    engine = _Engine()
    client = GatedEngineClient(engine, _Host())
    assert asyncio.run(client.get_supported_tasks()) == ("generate",)
    assert client.calls is engine.calls


def test_an_in_process_stand_in_engine_cannot_serve_the_openai_app(local_fleet):
    """vLLM's app needs a real ``AsyncLLM``: the in-process fleet's engines refuse, typed."""
    from weightsync.errors import UnsupportedError

    engines = local_fleet()
    ok, bad = engines.wait({"a": engines.serve_openai("a", TOKEN)}, 30)
    assert not ok and isinstance(bad["a"], UnsupportedError)
    assert "could not be built" in str(bad["a"])
