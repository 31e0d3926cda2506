"""The fleet's OpenAI base URL: the control plane's rollout router (``weightsync.routing``) in
front of the session's two real engines, driven by the real ``openai`` client over real
sockets. Where requests go (stickiness, never a fenced engine, only the committed version),
what comes back (vLLM's answers unchanged, streams, the versions), and what is refused."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

import httpx
import openai
import pytest
import ray

from tests.integration.api_server import TOKEN, serve_again
from weightsync.config import TransferConfig
from weightsync.coordinator import SyncCoordinator
from weightsync.testing.reference import perturb_

pytestmark = pytest.mark.integration
PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def coord(fleet):
    c = SyncCoordinator(fleet, TransferConfig(bucket_bytes=1 << 20))
    yield c
    c.reload_checkpoint(None)
    c.close()


@pytest.fixture(scope="module")
def router(service, fleet):
    """The control plane's /v1, once it has given both engines their OpenAI apps."""
    end = time.monotonic() + 180
    while not all(ray.get(a.status.remote()).openai_url for a in fleet):
        assert time.monotonic() < end, "the router did not start the engines' apps"
        time.sleep(0.2)
    return f"{service.url}/v1"


@pytest.fixture()
def oai(router):
    with openai.OpenAI(base_url=router, api_key=TOKEN, max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def model(oai_models):
    return oai_models


@pytest.fixture(scope="module")
def oai_models(router):
    with openai.OpenAI(base_url=router, api_key=TOKEN, max_retries=0, timeout=60) as c:
        return c.models.list().data[0].id


@pytest.fixture(autouse=True)
def serving(fleet, coord, policy):
    """Every test ends with both engines serving (resumed, or resynced if fenced)."""
    yield
    serve_again(fleet, coord, policy)


def _complete(oai, model, **kw):
    raw = oai.completions.with_raw_response.create(
        model=model, prompt=kw.pop("prompt", PROMPT), max_tokens=kw.pop("max_tokens", 4),
        **kw)
    return raw.parse(), raw.headers


def _versions(fleet) -> list[int]:
    return [ray.get(a.status.remote()).version for a in fleet]


def test_completions_chat_n_logprobs_stop_and_seed_through_the_router(oai, model, fleet):
    res, headers = _complete(oai, model, max_tokens=8, temperature=0, logprobs=2,
                             extra_body={"ignore_eos": True})
    assert headers["x-engine"] in {"engine-a", "engine-b"}
    assert int(headers["x-weight-version"]) == res.model_extra["weight_version"]
    assert len(res.choices[0].logprobs.token_logprobs) == 8
    many, _ = _complete(oai, model, n=3, temperature=1.0, seed=7, max_tokens=6)
    again, _ = _complete(oai, model, n=3, temperature=1.0, seed=7, max_tokens=6)
    assert len(many.choices) == 3 and [c.text for c in many.choices] == \
        [c.text for c in again.choices]
    stop = many.choices[0].text[2:4] or " "
    cut, _ = _complete(oai, model, temperature=1.0, seed=7, max_tokens=6, stop=[stop])
    assert stop not in cut.choices[0].text
    chat = oai.chat.completions.create(model=model, max_tokens=5, temperature=0,
                                       messages=[{"role": "user", "content": "hello"}],
                                       logprobs=True, extra_body={"ignore_eos": True})
    assert len(chat.choices[0].logprobs.content) == 5 and chat.model_extra["weight_version"] \
        in set(_versions(fleet))


def test_a_stream_passes_through_unchanged_and_equals_the_whole_answer(oai, model):
    whole, _ = _complete(oai, model, max_tokens=8, temperature=0, extra_body={"ignore_eos": True},
                         extra_headers={"X-Session-ID": "stream-s"})
    parts, stamps = [], set()
    for chunk in oai.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0,
                                        stream=True, extra_body={"ignore_eos": True},
                                        extra_headers={"X-Session-ID": "stream-s"}):
        parts.append(chunk.choices[0].text if chunk.choices else "")
        stamps.add(chunk.model_extra.get("weight_version"))
    assert "".join(parts) == whole.choices[0].text and len(stamps) == 1


def test_a_session_sticks_to_one_engine_and_sessions_spread(oai, model):
    homes = {}
    for s in range(12):
        seen = {_complete(oai, model, user=f"session-{s}")[1]["x-engine"] for _ in range(3)}
        assert len(seen) == 1, seen  # the body's `user` is the key when no header says
        homes[s] = seen.pop()
    assert set(homes.values()) == {"engine-a", "engine-b"}
    by_header = {_complete(oai, model, extra_headers={"X-Session-ID": "h-1"})[1]["x-engine"]
                 for _ in range(4)}
    assert len(by_header) == 1
    plain = Counter(_complete(oai, model)[1]["x-engine"] for _ in range(6))
    assert set(plain) == {"engine-a", "engine-b"}  # no key: least-loaded, in turn


def test_a_fenced_engine_is_never_routed_to_and_its_sessions_come_back(fleet, oai, model, coord,
                                                                       policy):
    home = _complete(oai, model, user="fence-s")[1]["x-engine"]
    actor = fleet[0] if home == "engine-a" else fleet[1]
    ray.get(actor.fence.remote("test: fenced"))
    time.sleep(0.7)  # the router's view (polled every 0.5 s; the engine refuses anyway)
    went = Counter(_complete(oai, model, user=f"u{i}")[1]["x-engine"] for i in range(8))
    assert home not in went and sum(went.values()) == 8
    assert coord.sync(policy).ok  # a verified sync unfences it
    time.sleep(0.7)
    assert _complete(oai, model, user="fence-s")[1]["x-engine"] == home


def test_versions_follow_a_sync_and_a_bound_is_met_or_refused(fleet, oai, model, coord, policy):
    perturb_(policy, scale=0.1, seed=5)
    res = coord.sync(policy)
    assert res.ok
    v = res.version
    # right after the sync: a request bound to the new version is served by it (the router
    # asks the fleet again rather than trust a view from before the commit)
    out, headers = _complete(oai, model, extra_body={"min_weight_version": v})
    assert out.model_extra["weight_version"] == v and headers["x-weight-version"] == str(v)
    with pytest.raises(openai.APIStatusError) as e:
        _complete(oai, model, extra_headers={"X-Min-Weight-Version": str(v + 5)})
    assert e.value.status_code == 409 and "no engine serves weight version" in \
        e.value.response.json()["message"]
    stale, _ = _complete(oai, model, extra_body={"max_weight_staleness": 0})
    assert stale.model_extra["weight_version"] == v


def test_a_request_during_a_sync_waits_for_it_and_reports_the_new_version(fleet, oai, model,
                                                                          coord, policy):
    """Sent once the sync paused both engines (its transfer phase, held 0.8 s), bound to the
    version that sync brings: the router waits for it instead of a 409, and it is served by
    the new weights."""
    perturb_(policy, scale=0.1, seed=6)
    v = max(_versions(fleet)) + 1
    got: dict = {}

    def send() -> None:
        t0 = time.monotonic()
        got["out"] = _complete(oai, model, extra_body={"min_weight_version": v},
                               extra_headers={"X-Wait-S": "60"})
        got["took"] = time.monotonic() - t0

    def hold(phase: str, engine: str | None) -> None:
        if phase == "transfer" and "thread" not in got:
            got["thread"] = threading.Thread(target=send)
            got["thread"].start()
            time.sleep(0.8)

    coord.on_phase = hold
    try:
        assert coord.sync(policy).ok
    finally:
        coord.on_phase = None
    got["thread"].join(60)
    out, headers = got["out"]
    assert out.model_extra["weight_version"] == v and got["took"] > 0.5
    # before any sync brings it, the same bound is refused at once
    with pytest.raises(openai.APIStatusError) as e:
        _complete(oai, model, extra_body={"min_weight_version": v + 1})
    assert e.value.status_code == 409


def test_a_rolling_sync_routes_around_its_wave(fleet, oai, model, coord, policy):
    perturb_(policy, scale=0.1, seed=8)
    stop = threading.Event()
    seen: list[tuple[str, int]] = []

    def hammer() -> None:
        while not stop.is_set():
            out, headers = _complete(oai, model, max_tokens=2)
            seen.append((headers["x-engine"], out.model_extra["weight_version"]))

    t = threading.Thread(target=hammer)
    t.start()
    try:
        res = coord.sync(policy, wave_size=1)
    finally:
        stop.set()
        t.join(60)
    assert res.ok and len(seen) >= 2
    v = res.version
    # every answer came from a whole version (old or new), never a mix, and the new version
    # was served once its engine committed
    assert {w for _, w in seen} <= {v - 1, v}


def test_no_token_is_401_and_vllms_own_routes_are_not_reachable(router, fleet):
    r = httpx.post(f"{router}/completions", json={"prompt": "x"})
    assert r.status_code == 401
    auth = {"Authorization": f"Bearer {TOKEN}"}
    base = router.removesuffix("/v1")
    # vLLM's own lifecycle and weight routes: the router forwards none of them (the control
    # plane's own /pause, /sleep, ... are weightsync's, behind the same token)
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/collective_rpc",
                 "/scale_elastic_ep", "/update_weight_version", "/init_weight_transfer_engine",
                 "/update_weights", "/wake_up", "/is_sleeping", "/reset_prefix_cache",
                 "/inference/v1/abort_requests", "/invocations", "/v1/responses"):
        assert httpx.post(base + path, headers=auth, json={}).status_code in (404, 405), path
    url = ray.get(fleet[0].status.remote()).openai_url
    # the engine itself: not with the control plane's token (only the router's)
    assert httpx.post(f"{url}/v1/completions", headers=auth, json={}).status_code == 401


def test_a_client_that_goes_away_aborts_the_engines_request(fleet, router, model):
    """Gone after its first chunk through the router, the stream's request leaves vLLM on its
    engine: a draining pause of that engine right after returns long before the request would
    have finished."""
    auth = {"Authorization": f"Bearer {TOKEN}", "X-Session-ID": "gone-1"}
    body = {"model": model, "prompt": PROMPT, "max_tokens": 480, "ignore_eos": True}
    with httpx.Client(timeout=120) as c:
        t0 = time.monotonic()
        r = c.post(f"{router}/completions", json=body, headers=auth)
        whole = time.monotonic() - t0
        home = fleet[0] if r.headers["x-engine"] == ray.get(fleet[0].status.remote()).name \
            else fleet[1]
        with c.stream("POST", f"{router}/completions", json={**body, "stream": True},
                      headers=auth) as r:
            assert r.status_code == 200
            next(line for line in r.iter_lines() if line.startswith("data: {"))
    t0 = time.monotonic()
    ray.get(home.pause.remote("wait"), timeout=120)
    try:
        assert time.monotonic() - t0 < whole / 2, whole
    finally:
        ray.get(home.resume.remote())


def test_a_stream_that_lives_across_a_keep_mode_sync_shows_both_versions(fleet, router, model,
                                                                         coord, policy):
    """vLLM holds the request through a ``keep``-mode sync and finishes it on the new weights:
    its chunks say which version produced them, old first, then new."""
    perturb_(policy, scale=0.1, seed=9)
    v = max(_versions(fleet))
    body = {"model": model, "prompt": PROMPT, "max_tokens": 480, "ignore_eos": True,
            "stream": True}
    stamps: list[int] = []
    synced: dict = {}

    def sync() -> None:
        synced["res"] = coord.sync(policy, pause_mode="keep")

    with httpx.Client(timeout=120) as c, c.stream(
            "POST", f"{router}/completions", json=body,
            headers={"Authorization": f"Bearer {TOKEN}", "X-Session-ID": "keep-1"}) as r:
        t = None
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            stamps.append(json.loads(line[6:])["weight_version"])
            if t is None:  # the first chunk is out: sync now, while the rest is generated
                t = threading.Thread(target=sync)
                t.start()
        t.join(60)
    assert synced["res"].ok and synced["res"].version == v + 1
    assert stamps[0] == v and stamps[-1] == v + 1, sorted(set(stamps))
    assert stamps == sorted(stamps)  # never back to the old weights
