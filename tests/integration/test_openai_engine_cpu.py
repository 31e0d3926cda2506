"""vLLM's own OpenAI API on each of the session's real engines (``EngineHost.serve_openai``),
driven by the real ``openai`` client: what vLLM serves, what the guard refuses, and the weight
versions it stamps across real syncs, pauses and fences."""

from __future__ import annotations

import json
import re
import threading
import time

import httpx
import openai
import pytest
import ray

from tests.integration.api_server import serve_again
from weightsync.config import TransferConfig
from weightsync.coordinator import SyncCoordinator
from weightsync.testing.reference import perturb_

pytestmark = pytest.mark.integration
TOKEN = "engine-token-7c1d"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def coord(fleet):
    c = SyncCoordinator(fleet, TransferConfig(bucket_bytes=1 << 20))
    yield c
    c.reload_checkpoint(None)  # the original weights for the modules after this one
    c.close()


@pytest.fixture(scope="module")
def urls(fleet, coord):
    """Each engine's base URL (bound to the node's IP, as Ray names it)."""
    return ray.get([a.serve_openai.remote(TOKEN) for a in fleet], timeout=300)


@pytest.fixture(scope="module")
def model(fleet):
    return ray.get(fleet[0].status.remote()).model


@pytest.fixture()
def oai(urls):
    with openai.OpenAI(base_url=f"{urls[0]}/v1", api_key=TOKEN, max_retries=0,
                       timeout=120) as c:
        yield c


@pytest.fixture()
def http(urls):
    with httpx.Client(base_url=urls[0], headers=AUTH, timeout=120) as c:
        yield c


@pytest.fixture(autouse=True)
def serving(fleet, coord, policy):
    """Every test ends with both engines serving (resumed, or resynced if fenced)."""
    yield
    serve_again(fleet, coord, policy)


def _version(actor) -> int:
    return ray.get(actor.status.remote()).version


def _complete(oai, model, **kw):
    raw = oai.completions.with_raw_response.create(model=model, prompt=kw.pop("prompt", PROMPT),
                                                   **kw)
    return raw.parse(), raw.headers


def _metric(http, name: str, label: str = "") -> float:
    """The sum of a Prometheus metric's samples (those whose labels contain ``label``), read
    after vLLM's output handler recorded the last step's stats."""
    time.sleep(0.3)
    text = http.get("/metrics").text
    return sum(float(v) for labels, v in re.findall(
        rf"^{re.escape(name)}{{([^}}]*)}} (\S+)$", text, re.M) if label in labels)


# ---- what vLLM serves ------------------------------------------------------------------------
def test_the_url_is_on_the_nodes_ip_and_status_names_it(fleet, urls):
    ip = ray.util.get_node_ip_address()
    assert all(u.startswith(f"http://{ip}:") for u in urls) and urls[0] != urls[1]
    assert [ray.get(a.status.remote()).openai_url for a in fleet] == urls
    assert ray.get(fleet[0].serve_openai.remote(TOKEN)) == urls[0]  # serving already


def test_greedy_completions_equal_the_ray_path_with_logprobs_and_stamps(fleet, oai, model):
    v = _version(fleet[0])
    res, headers = _complete(oai, model, max_tokens=8, temperature=0, logprobs=1,
                             extra_body={"ignore_eos": True})
    (ray_res,) = ray.get(fleet[0].generate.remote([PROMPT], max_tokens=8, logprobs=True,
                                                  ignore_eos=True))
    choice = res.choices[0]
    assert choice.text == ray_res.text and headers["x-weight-version"] == str(v)
    assert res.model_extra["weight_version"] == v and res.model_extra["weight_versions"] == [v, v]
    assert len(choice.logprobs.token_logprobs) == len(ray_res.token_ids) == 8
    assert max(abs(a - b) for a, b in zip(choice.logprobs.token_logprobs, ray_res.logprobs,
                                          strict=True)) < 1e-4


def test_chat_uses_the_models_chat_template(fleet, oai, model):
    messages = [{"role": "user", "content": "hello world"}]
    res = oai.chat.completions.create(model=model, messages=messages, max_tokens=8,
                                      temperature=0, extra_body={"ignore_eos": True})
    (ray_res,) = ray.get(fleet[0].generate.remote(messages=[messages], max_tokens=8,
                                                  ignore_eos=True))
    assert res.choices[0].message.content == ray_res.text
    assert res.model_extra["weight_version"] == _version(fleet[0])


def test_a_stream_equals_the_whole_answer_and_each_chunk_names_its_version(fleet, oai, model):
    v = _version(fleet[0])
    whole, _ = _complete(oai, model, max_tokens=12, temperature=0)
    chunks = list(oai.completions.create(model=model, prompt=PROMPT, max_tokens=12,
                                         temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert {c.model_extra["weight_version"] for c in chunks} == {v}
    chat = list(oai.chat.completions.create(model=model, stream=True, max_tokens=6,
                                            messages=[{"role": "user", "content": "hi"}]))
    assert len(chat) > 2 and {c.model_extra["weight_version"] for c in chat} == {v}


def test_seeded_samples_repeat_n_choices_differ_and_stop_strings_cut(oai, model):
    kw = dict(max_tokens=10, temperature=1.0, seed=5, n=3)
    a, _ = _complete(oai, model, **kw)
    b, _ = _complete(oai, model, **kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len(a.choices) == 3 and len({c.text for c in a.choices}) > 1
    full, _ = _complete(oai, model, max_tokens=16, temperature=0,
                        extra_body={"ignore_eos": True})
    text = full.choices[0].text
    stop = text[len(text) // 2:][:3]
    assert stop.strip()
    cut, _ = _complete(oai, model, max_tokens=16, temperature=0, stop=[stop],
                       extra_body={"ignore_eos": True})
    assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].text


def test_models_tokenize_token_in_token_out_health_version_metrics(http, oai, model,
                                                                   tokenizer):
    assert [m.id for m in oai.models.list()] == [model]
    ids = tokenizer(PROMPT).input_ids
    r = http.post("/tokenize", json={"model": model, "prompt": PROMPT})
    assert r.status_code == 200 and r.json()["tokens"] == ids
    assert http.post("/detokenize", json={"model": model, "tokens": ids}).json()["prompt"] \
        == PROMPT
    r = http.post("/inference/v1/generate", json={
        "model": model, "token_ids": ids, "sampling_params": {"max_tokens": 4,
                                                             "temperature": 0}})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"][0]["token_ids"]) == 4 and "weight_version" in r.json()
    assert http.get("/health").status_code == 200 and "version" in http.get("/version").json()
    assert _metric(http, "vllm:prefix_cache_queries_total") > 0


# ---- what the guard refuses ------------------------------------------------------------------
def test_no_token_or_a_wrong_one_is_401(urls, model):
    for path in ("/health", "/v1/models", "/metrics", "/pause"):
        r = httpx.get(urls[0] + path)
        assert r.status_code == 401 and r.json()["code"] == "unauthorized"
    with openai.OpenAI(base_url=f"{urls[0]}/v1", api_key="wrong", max_retries=0) as c, \
            pytest.raises(openai.AuthenticationError):
        c.models.list()


@pytest.mark.parametrize("method, path", [
    ("POST", "/pause"), ("POST", "/resume"), ("POST", "/sleep"), ("POST", "/wake_up"),
    ("POST", "/collective_rpc"), ("POST", "/update_weights"), ("POST", "/init_weight_transfer"),
    ("POST", "/update_weight_version"), ("POST", "/scale_elastic_ep"),
    ("POST", "/inference/v1/abort_requests"), ("POST", "/abort_requests"),
    ("POST", "/invocations"), ("POST", "/v1/load_lora_adapter"),
    ("POST", "/v1/unload_lora_adapter"), ("POST", "/reset_prefix_cache"), ("GET", "/docs"),
    ("GET", "/openapi.json"), ("POST", "/render"), ("GET", "/ping"), ("POST", "/v1/responses"),
    ("GET", "/load"), ("GET", "/server_info"), ("GET", "/metrics/x")])
def test_every_route_outside_the_allowlist_is_404(http, method, path):
    r = http.request(method, path, json={})
    assert r.status_code == 404 and r.json()["code"] == "not_found"


def test_a_second_router_gets_its_own_token_without_taking_the_engine(fleet, urls):
    assert ray.get(fleet[0].serve_openai.remote("other-token")) == urls[0]
    assert httpx.get(urls[0] + "/health", headers=AUTH).status_code == 200
    assert httpx.get(urls[0] + "/health", headers={
        "Authorization": "Bearer other-token"}).status_code == 200
    assert httpx.get(urls[0] + "/health", headers={
        "Authorization": "Bearer never-given"}).status_code == 401


# ---- the serving gate and the versions ---------------------------------------------------------
def test_stamps_follow_a_real_sync_on_both_engines(fleet, urls, coord, policy, model):
    perturb_(policy, scale=0.2, seed=41)
    res = coord.sync(policy)
    assert res.ok
    for url in urls:
        with openai.OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0) as c:
            out, headers = _complete(c, model, max_tokens=4, temperature=0)
        assert headers["x-weight-version"] == str(res.version)
        assert out.model_extra["weight_versions"] == [res.version, res.version]


def test_a_request_during_a_sync_waits_and_runs_on_the_new_version(fleet, coord, policy,
                                                                   oai, model):
    """Sent once the sync paused the engines (its transfer phase, held 0.5 s), the request
    waits at the gate and runs on the new weights."""
    sent = {}

    def send() -> None:
        sent["t"] = time.monotonic()
        sent["out"] = _complete(oai, model, max_tokens=4, temperature=0)
        sent["took"] = time.monotonic() - sent["t"]

    def hold(phase: str, engine: str | None) -> None:
        if phase == "transfer" and "thread" not in sent:
            sent["thread"] = threading.Thread(target=send)
            sent["thread"].start()
            time.sleep(0.5)
    perturb_(policy, scale=0.2, seed=43)
    coord.on_phase = hold
    try:
        res = coord.sync(policy)
    finally:
        coord.on_phase = None
    sent["thread"].join(120)
    out, headers = sent["out"]
    assert headers["x-weight-version"] == str(res.version) and sent["took"] > 0.4
    assert out.model_extra["weight_version"] == res.version


def test_a_paused_engine_is_waited_for_or_503_with_retry_after(fleet, http, model):
    ray.get(fleet[0].pause.remote("abort"))
    body = {"model": model, "prompt": PROMPT, "max_tokens": 2}
    r = http.post("/v1/completions", json=body, headers={"X-Wait-S": "0.3"})
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
    assert r.json()["code"] == "deadline_exceeded"
    threading.Timer(1.0, lambda: ray.get(fleet[0].resume.remote())).start()
    t0 = time.monotonic()
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200 and time.monotonic() - t0 > 0.9


def test_a_minimum_version_above_the_engines_is_409(fleet, http, model):
    v = _version(fleet[0])
    body = {"model": model, "prompt": PROMPT, "max_tokens": 2}
    r = http.post("/v1/completions", json=body, headers={"X-Min-Weight-Version": str(v + 1)})
    assert r.status_code == 409 and r.json()["code"] == "weight_version_behind"
    assert http.post("/v1/completions", json=body,
                     headers={"X-Min-Weight-Version": str(v)}).status_code == 200


def test_a_fenced_engine_is_503_with_its_reason(fleet, http, model, policy):
    ray.get(fleet[0].fence.remote("test: bad weights"))
    r = http.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 2})
    assert r.status_code == 503 and r.json()["code"] == "fenced"
    assert "bad weights" in r.json()["message"] and "retry-after" not in r.headers
    assert http.get("/health").status_code == 503
    assert http.get("/v1/models").status_code == 200  # nothing generated: still answered


def test_the_gate_counts_http_requests_a_pause_waits_for_them(fleet, http, model):
    """A pause (as a sync's) in "wait" mode returns only once the HTTP request running in
    vLLM has its final output: the stream is whole, on one version."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": 480, "stream": True,
            "temperature": 0, "ignore_eos": True, "stream_options": {"include_usage": True}}
    v, texts, done = _version(fleet[0]), [], {}
    with http.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        texts.append(next(line for line in lines if line.startswith("data: {")))
        pause = threading.Thread(target=lambda: done.setdefault(
            "paused", (ray.get(fleet[0].pause.remote("wait")), time.monotonic())))
        pause.start()
        texts += [line for line in lines if line.startswith("data: ")]
        ended = time.monotonic()
    pause.join(120)
    # whole: every token came (a loaded box merges several tokens into one event)
    assert texts[-1] == "data: [DONE]"
    assert json.loads(texts[-2].removeprefix("data: "))["usage"]["completion_tokens"] == 480
    assert done["paused"][1] >= ended - 0.2  # not before the stream's end
    assert all(f'"weight_version": {v}' in t for t in texts[:-1])


def test_an_http_request_leaves_the_caches_dirty_so_the_next_pause_clears_them(fleet, http,
                                                                               model):
    """The gate's cache flag: after a pause nothing ran, caches are clean; an HTTP request
    caches its prompt; the next pause must clear it (a prefix hit after it would mean the
    gate never saw the request)."""
    long = " ".join(["weights move from the trainer into the engines"] * 30)  # ~340 tokens:
    body = {"model": model, "prompt": long, "max_tokens": 1}  # full KV blocks (128 on CPU)
    for _ in range(2):
        ray.get(fleet[0].pause.remote("abort"))
        ray.get(fleet[0].resume.remote())
    hits = _metric(http, "vllm:prefix_cache_hits_total")
    for _ in range(2):
        assert http.post("/v1/completions", json=body).status_code == 200
    assert _metric(http, "vllm:prefix_cache_hits_total") > hits  # the prefix was cached
    ray.get(fleet[0].pause.remote("abort"))
    ray.get(fleet[0].resume.remote())
    hits = _metric(http, "vllm:prefix_cache_hits_total")
    assert http.post("/v1/completions", json=body).status_code == 200
    assert _metric(http, "vllm:prefix_cache_hits_total") == hits


def test_a_client_that_disconnects_aborts_its_request_in_vllm(fleet, http, model):
    """Gone after its first chunk, the stream's request leaves vLLM (vLLM's cancellation
    closes the gated generator, which aborts it): a draining pause right after returns long
    before the request would have finished, and the gate counts nothing running."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": 480, "ignore_eos": True}
    t0 = time.monotonic()
    assert http.post("/v1/completions", json=body).status_code == 200
    whole = time.monotonic() - t0
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        next(line for line in r.iter_lines() if line.startswith("data: {"))
    t0 = time.monotonic()
    ray.get(fleet[0].pause.remote("wait"), timeout=120)
    assert time.monotonic() - t0 < whole / 2, whole
