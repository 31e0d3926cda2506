"""The control plane through real uvicorn on loopback, real Ray, real vLLM CPU engines:
sleep/wake/pause/reload round trips, HF parity after /reload, a trainer's sync session,
concurrent reloads, auth, the CLI, and the status page in headless Chromium (schemathesis
runs in ``test_api_fuzz.py``)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import ray

from tests.integration.api_server import AUTH, TOKEN, assert_parity, outputs, save_checkpoint
from weightsync.api import create_app
from weightsync.config import Settings
from weightsync.errors import ConfigError, IllegalStateError
from weightsync.testing.reference import load_trainer_model
from weightsync.types import EngineState

pytestmark = pytest.mark.integration
MUTATING = ["/sleep", "/wake", "/pause", "/resume", "/reload", "/sessions",
            "/sessions/abc123/commit", "/sessions/abc123/abort"]


# ---- auth and startup ----------------------------------------------------------------------
def test_unauthenticated_mutating_calls_get_401_and_change_nothing(service, client):
    before = client.status()
    for path in MUTATING:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic eA=="}):
            r = httpx.post(service.url + path, json={}, headers=headers)
            assert r.status_code == 401, (path, headers, r.text)
            assert r.json()["code"] == "unauthorized"
            assert r.headers["www-authenticate"] == "Bearer"
    for path in ["/status", "/engines", "/metrics", "/"]:
        assert httpx.get(service.url + path).status_code == 401
    assert httpx.get(service.url + "/healthz").json() == {"status": "ok", "engines": 2}
    after = client.status()
    assert [(e.name, e.state, e.version) for e in after.engines] == \
        [(e.name, e.state, e.version) for e in before.engines]


def test_non_loopback_bind_without_token_refuses_to_start(tmp_path):
    with pytest.raises(ConfigError, match="without a token"):
        create_app(Settings(host="0.0.0.0", token=None))
    with pytest.raises(ConfigError, match="empty"):
        create_app(Settings(host="10.1.2.3", token=" "))
    create_app(Settings(host="0.0.0.0", token="x"))  # a token makes it acceptable
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEIGHTSYNC_")}
    env.update(WEIGHTSYNC_HOST="0.0.0.0", WEIGHTSYNC_RAY_ADDRESS="127.0.0.1:1")
    proc = subprocess.run([sys.executable, "-m", "services.serve"], env=env, cwd=Path.cwd(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "refusing to start" in proc.stderr and "without a token" in proc.stderr


# ---- lifecycle round trips ---------------------------------------------------------------
def test_sleep_on_cpu_pauses_with_the_reason_wake_and_pause_resume_round_trip(service, client):
    r = httpx.post(service.url + "/wake", json={"tags": ["weights"]}, headers=AUTH)
    assert r.status_code == 409 and r.json()["code"] == "illegal_state"  # nothing asleep
    r = httpx.post(service.url + "/sleep", json={"level": 1}, headers=AUTH)
    assert r.status_code == 200, r.text
    for rep in r.json()["engines"]:  # no sleep mode on CPU: paused, nothing freed, and why
        assert rep["level"] == 1 and rep["freed_bytes"] is None
        assert "CUDA-only" in rep["skipped"][0] and "keeps its weights" in rep["skipped"][0]
    assert {(e.state, e.sleep_level) for e in client.status().engines} == \
        {(EngineState.ASLEEP, 1)}
    with pytest.raises(IllegalStateError) as e:  # asleep already: nobody is touched
        client.sleep(2, engines=["engine-b"])
    assert e.value.status_code == 409 and "no engine was touched" in str(e.value)
    r = httpx.post(service.url + "/sleep", json={"level": 1, "mode": "keep"}, headers=AUTH)
    assert r.status_code == 422  # keep cannot hold requests through a sleep
    woke = client.wake(["weights"], engines=["engine-b"])
    assert [e.state for e in woke.engines] == [EngineState.WEIGHTS_AWAKE]
    woke = client.wake()
    assert {e.state for e in woke.engines} == {EngineState.SERVING}
    assert all(e.owner is None for e in client.status().engines)

    paused = client.pause("wait", engines=["engine-a"])
    assert [(e.name, e.state) for e in paused.engines] == [("engine-a", EngineState.PAUSED)]
    with pytest.raises(IllegalStateError):  # already paused
        client.pause(engines=["engine-a"])
    with pytest.raises(IllegalStateError) as e:  # engine-b is not paused: nobody resumes
        client.resume()
    assert e.value.engine == "engine-b" and "no engine was touched" in str(e.value)
    assert [e.state for e in client.status().engines] == [EngineState.PAUSED, EngineState.SERVING]
    resumed = client.resume(["engine-a"])
    assert [(e.name, e.state) for e in resumed.engines] == [("engine-a", EngineState.SERVING)]

    r = httpx.post(service.url + "/pause", json={"engines": ["engine-z"]}, headers=AUTH)
    assert r.status_code == 404 and r.json() == {
        "code": "unknown_engine", "engine": "engine-z",
        "message": r.json()["message"]} and "engine-a" in r.json()["message"]


def test_reload_checkpoint_matches_hf_then_original(service, client, fleet, ckpt_root, policy,
                                                    tokenizer, tiny_model):
    model = save_checkpoint(policy, tokenizer, ckpt_root / "step-1", seed=41)
    v0 = client.status().version
    result = client.reload(str(ckpt_root / "step-1"))
    assert result.ok and result.mode == "checkpoint" and result.version == v0 + 1
    assert len({e.fingerprint for e in result.engines}) == 1
    assert_parity(fleet, model, tokenizer, result.version)
    st = client.status()
    assert [e.version for e in st.engines] == [result.version] * 2
    assert st.recent[-1].version == result.version and "reload" in st.recent[-1].seconds

    back = client.reload(None)  # the engines' original model
    assert back.ok and back.version == result.version + 1
    assert_parity(fleet, load_trainer_model(tiny_model), tokenizer, back.version)
    assert 'weightsync_phase_seconds_count{engine="engine-a",mode="checkpoint",phase="reload"}' \
        in client.metrics()


def test_reload_rejects_bad_paths_without_touching_engines(service, client, ckpt_root,
                                                           tmp_path):
    import torch
    from safetensors.torch import save_file

    (ckpt_root / "empty").mkdir(exist_ok=True)
    (ckpt_root / "alien").mkdir(exist_ok=True)
    save_file({"model.layers.7.bogus.weight": torch.zeros(3, 3)},
              str(ckpt_root / "alien" / "model.safetensors"))
    (ckpt_root / "corrupt").mkdir(exist_ok=True)
    (ckpt_root / "corrupt" / "model.safetensors").write_bytes(b"\xff" * 64)
    os.symlink(tmp_path, ckpt_root / "escape", target_is_directory=True)
    before = client.status()
    cases = {
        str(tmp_path): "config_error",                      # outside the roots
        str(ckpt_root / ".." / ckpt_root.name / ".." ): "config_error",
        str(ckpt_root / "escape"): "config_error",          # symlink out of the root
        str(ckpt_root / "missing"): "config_error",
        str(ckpt_root / "empty"): "manifest_error",
        str(ckpt_root / "alien"): "manifest_error",         # does not fit the model
        str(ckpt_root / "corrupt"): "manifest_error",
        str(ckpt_root) + "/\x00x": "validation_error",     # the schema says so
        "relative/dir": "validation_error",
    }
    for path, code in cases.items():
        r = httpx.post(service.url + "/reload", json={"path": path}, headers=AUTH)
        assert (r.status_code, r.json()["code"]) == (422, code), (path, r.text)
    r = httpx.post(service.url + "/reload", json={"engines": ["nope"]}, headers=AUTH)
    assert r.status_code == 404
    after = client.status()
    assert [(e.state, e.version) for e in after.engines] == \
        [(e.state, e.version) for e in before.engines]


def test_two_concurrent_reloads_one_409_and_no_mixed_weights(service, client, fleet, ckpt_root,
                                                             policy, tokenizer):
    models = {seed: save_checkpoint(policy, tokenizer, ckpt_root / f"race-{seed}", seed=seed)
              for seed in (51, 52)}
    barrier = threading.Barrier(2)
    answers: dict[int, httpx.Response] = {}

    def post(seed: int) -> None:
        with httpx.Client(timeout=600) as h:
            body = {"path": str(ckpt_root / f"race-{seed}")}
            barrier.wait()
            answers[seed] = h.post(service.url + "/reload", json=body, headers=AUTH)

    threads = [threading.Thread(target=post, args=(s,)) for s in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(r.status_code for r in answers.values())
    assert codes == [200, 409], {s: r.text for s, r in answers.items()}
    loser = next(r for r in answers.values() if r.status_code == 409)
    assert loser.json()["code"] == "sync_in_progress"
    winner = next(s for s, r in answers.items() if r.status_code == 200)
    result = answers[winner].json()
    assert result["ok"] and len({e["fingerprint"] for e in result["engines"]}) == 1
    # both engines serve exactly the winner's checkpoint, at one version
    assert_parity(fleet, models[winner], tokenizer, result["version"])
    fingerprints = ray.get([a.finish_load.remote(30) for a in fleet])
    assert len({f.fingerprint for f in fingerprints}) == 1


# ---- a trainer outside the Ray cluster -----------------------------------------------------
def test_trainer_session_push_weights_matches_hf(service, client, fleet, policy, tokenizer):
    import copy

    from weightsync.testing.reference import perturb_

    model = copy.deepcopy(policy)
    perturb_(model, scale=0.3, seed=61)
    v0 = client.status().version
    result = client.push_weights(model)
    assert result.ok and result.mode == "external" and result.version == v0 + 1
    assert all(e.checksum_ok for e in result.engines) and len(result.sender_checksums) > 1
    assert_parity(fleet, model, tokenizer, result.version)
    assert client.status().recent[-1].mode == "external"


def test_trainer_that_dies_mid_session_leaves_fleet_on_old_version(service, client, fleet,
                                                                   policy):
    from weightsync.api.schemas import SessionRequest
    from weightsync.transport.broadcast import free_port as store_port
    from weightsync.transport.broadcast import open_group
    from weightsync.transport.packing import named_tensors, spec_of

    before = [[o.token_ids for o in outputs(a)] for a in fleet]
    v0 = client.status().version
    specs = [spec_of(n, t) for n, t in named_tensors(policy)]
    info = client.open_session(SessionRequest(tensors=specs, port=store_port("127.0.0.1")))
    assert info.world_size == 3 and info.rank == 0 and info.version == v0 + 1
    assert len(info.plan.buckets) > 1 and info.engines == ["engine-a", "engine-b"]
    assert httpx.post(service.url + "/reload", json={}, headers=AUTH).status_code == 409
    group = open_group(info.backend, info.host, info.port, 0, info.world_size, 30)
    group.close()  # the trainer dies before sending a byte
    closed = client.abort_session(info.session, "trainer crashed")
    assert not closed.ok and closed.result is not None and not closed.result.ok
    st = client.status()
    assert [(e.state, e.version) for e in st.engines] == [(EngineState.SERVING, v0)] * 2
    assert [[o.token_ids for o in outputs(a)] for a in fleet] == before
    r = httpx.post(service.url + f"/sessions/{info.session}/commit",
                   json={"checksums": [1] * len(info.plan.buckets)}, headers=AUTH)
    assert r.status_code == 409 and "already committed or aborted" in r.json()["message"]
    r = httpx.post(service.url + "/sessions/abc123/commit", json={"checksums": [1]},
                   headers=AUTH)
    assert r.status_code == 404 and r.json()["code"] == "unknown_session"


def test_abort_before_the_trainer_joins_ends_the_session_within_a_second(service, client,
                                                                          fleet, policy):
    """Issue 28: the trainer opens a session and gives up before it hosts the group (nobody
    listens at its port): the abort returns within a second, not at the rendezvous deadline
    (12 s here), every engine serves its old version, and the next sync goes through."""
    import copy
    import time

    from weightsync.api.schemas import SessionRequest
    from weightsync.testing.reference import perturb_
    from weightsync.transport.broadcast import free_port as store_port
    from weightsync.transport.packing import named_tensors, spec_of

    before = [[o.token_ids for o in outputs(a)] for a in fleet]
    v0 = client.status().version
    specs = [spec_of(n, t) for n, t in named_tensors(policy)]
    info = client.open_session(SessionRequest(tensors=specs, port=store_port("127.0.0.1")))
    time.sleep(1.0)  # every engine's workers are in the join, dialling nobody
    t0 = time.perf_counter()
    closed = client.abort_session(info.session, "the trainer gave up before hosting the group")
    took = time.perf_counter() - t0
    print(f"\nabort before the trainer joined (real engines): {took:.2f}s "
          f"(rendezvous deadline {info.transfer.deadlines.rendezvous:g} s)")
    assert not closed.ok and took < 1.0, closed
    st = client.status()
    assert [(e.state, e.version) for e in st.engines] == [(EngineState.SERVING, v0)] * 2
    assert [[o.token_ids for o in outputs(a)] for a in fleet] == before

    model = copy.deepcopy(policy)  # the fleet takes the next sync right away
    perturb_(model, scale=0.3, seed=67)
    t0 = time.perf_counter()
    result = client.push_weights(model)
    print(f"next sync after the abort: ok={result.ok} in {time.perf_counter() - t0:.2f}s")
    assert result.ok and result.version > info.version
    assert all(e.checksum_ok for e in result.engines)


# ---- the CLI ---------------------------------------------------------------------------------
def test_cli_status_reload_sleep_against_the_service(service, client, ckpt_root, policy,
                                                     tokenizer):
    from typer.testing import CliRunner

    from weightsync.cli import app

    runner = CliRunner()
    common = ["--url", service.url, "--token", TOKEN]
    out = runner.invoke(app, ["status", *common])
    assert out.exit_code == 0, out.output
    assert "engine-a" in out.output and "engine-b" in out.output and "serving" in out.output

    save_checkpoint(policy, tokenizer, ckpt_root / "cli", seed=81)
    v0 = client.status().version
    out = runner.invoke(app, ["reload", str(ckpt_root / "cli"), *common])
    assert out.exit_code == 0, out.output
    published = re.search(r"version (\d+) \(checkpoint\) published", out.output)
    assert published and int(published[1]) > v0, out.output  # numbers of failed syncs skipped
    assert [e.version for e in client.status().engines] == [int(published[1])] * 2

    out = runner.invoke(app, ["sleep", "--level", "1", "-e", "engine-a", *common])
    assert out.exit_code == 0 and "CUDA-only" in out.output, out.output
    out = runner.invoke(app, ["wake", "-e", "engine-a", *common])
    assert out.exit_code == 0 and "serving" in out.output, out.output
    out = runner.invoke(app, ["status", "--url", service.url, "--token", "wrong"])
    assert out.exit_code == 1 and "AuthError" in out.output


# ---- the status page in a real browser -----------------------------------------------------
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture()
def browser():
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip(f"headless browser test needs {CHROMIUM} and {CHROMEDRIVER} (Debian "
                    "packages chromium and chromium-driver; scripts/bootstrap.sh installs them "
                    "when it can)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[test]')")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


_PAGE_JS = """
const text = (e, sel) => (e.querySelector(sel) || {textContent: ''}).textContent.trim();
return {
  rows: Object.fromEntries([...document.querySelectorAll('#engines tbody tr')].map(
    r => [r.dataset.engine, [text(r, 'td.name'), text(r, 'td.version'), text(r, '.state')]])),
  bars: [...document.querySelectorAll('#chart rect')].map(b => text(b, 'title')),
  summary: text(document, '#summary'),
};"""


def _page(driver) -> dict:
    """What the status page shows now, read in one script call: the page re-renders itself
    every few seconds, so element handles found one call earlier can be gone (CI saw a
    ``StaleElementReferenceException``)."""
    return driver.execute_script(_PAGE_JS)


def test_status_page_shows_every_engine_version_in_chromium(service, client, browser,
                                                            ckpt_root, policy, tokenizer):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    save_checkpoint(policy, tokenizer, ckpt_root / "page", seed=71)
    published = client.reload(str(ckpt_root / "page")).version  # at least one sync to chart

    browser.get(service.url + "/")  # no cookie yet: the JSON 401
    assert "unauthorized" in browser.page_source
    browser.get_log("browser")  # drop the console's note of that 401
    browser.get(service.url + "/login")  # the sign-in form: the token never enters a URL
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "signin").click()  # sets the cookie, redirects to ./
    WebDriverWait(browser, 30).until(lambda d: d.current_url == service.url + "/")
    assert TOKEN not in browser.current_url
    cookie = browser.get_cookie("weightsync_session")
    assert cookie and cookie["httpOnly"] and TOKEN not in cookie["value"]
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: len(_page(d)["rows"]) == 2)
    status = client.status()
    page = _page(browser)
    for engine in status.engines:
        assert page["rows"][engine.name] == [engine.name, str(engine.version), "serving"]
        assert engine.version == published
    assert page["bars"] and {b.split(":")[0] for b in page["bars"]} >= {"reload", "resume"}
    assert "fleet version" in page["summary"]
    # the page keeps itself current: a new version shows up without a reload of the page
    newer = client.reload(None).version
    wait.until(lambda d: {r[1] for r in _page(d)["rows"].values()} == {str(newer)})
    # no script error, no CSP violation (the inline script runs by nonce only)
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
