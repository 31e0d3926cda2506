"""The control plane against what an outsider tried (issue: checkpoint reload and control-plane
hardening), through real uvicorn on loopback, real Ray and real vLLM CPU engines: partial and
empty checkpoints, validation that does not drift to the last loaded directory, a FIFO and a
file symlink in a load root, glob characters in a name, refused requests on a paused engine,
authentication before any body is read, and (in its own process) a service whose token never
reaches a log and whose shutdown leaves no engine process behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
import torch
from safetensors.torch import save_file

from tests.integration.api_server import (
    AUTH,
    TOKEN,
    assert_parity,
    free_port,
    outputs,
    save_checkpoint,
)
from weightsync.coordinator import SyncCoordinator
from weightsync.errors import IllegalStateError
from weightsync.testing.reference import load_trainer_model
from weightsync.types import EngineState

pytestmark = pytest.mark.integration
NORM = "model.norm.weight"


def _states(client):
    return [(e.name, e.state, e.version) for e in client.status().engines]


def _reload(service, body: dict) -> httpx.Response:
    return httpx.post(service.url + "/reload", json=body, headers=AUTH, timeout=600)


# ---- what a checkpoint must hold ---------------------------------------------------------
def test_partial_and_empty_checkpoints_are_refused_unless_partial_is_asked(
        service, client, fleet, ckpt_root, tiny_model, tokenizer):
    client.reload(None)
    base = load_trainer_model(tiny_model)
    n_tensors = len(dict(base.state_dict())) - (1 if "lm_head.weight" in base.state_dict()
                                                and base.config.tie_word_embeddings else 0)
    new_norm = torch.linspace(0.5, 1.5, base.model.norm.weight.numel())
    (ckpt_root / "one-tensor").mkdir()
    save_file({NORM: new_norm}, str(ckpt_root / "one-tensor" / "model.safetensors"))
    (ckpt_root / "no-tensor").mkdir()
    save_file({}, str(ckpt_root / "no-tensor" / "model.safetensors"))
    before = _states(client)

    r = _reload(service, {"path": str(ckpt_root / "one-tensor")})
    assert (r.status_code, r.json()["code"]) == (422, "manifest_error"), r.text
    assert f"incomplete update: {n_tensors - 1} of the model's" in r.json()["message"]
    r = _reload(service, {"path": str(ckpt_root / "no-tensor")})
    assert (r.status_code, r.json()["code"]) == (422, "manifest_error"), r.text
    r = _reload(service, {"path": str(ckpt_root / "no-tensor"), "partial": True})
    assert r.status_code == 422 and "no tensors" in r.json()["message"]
    assert _states(client) == before  # nothing published, nothing touched

    result = client.reload(str(ckpt_root / "one-tensor"), partial=True)  # asked for: allowed
    assert result.ok and result.partial and result.version == before[0][2] + 1
    with torch.no_grad():
        base.model.norm.weight.copy_(new_norm)
    assert_parity(fleet, base, tokenizer, result.version)  # the rest kept the old weights


def test_validation_stays_on_the_model_the_engine_started_with(
        service, client, fleet, ckpt_root, policy, tokenizer):
    """A partial reload, then the last loaded directory deleted: full checkpoints and a
    trainer's full tensor list are still accepted (validated against the model at start)."""
    (ckpt_root / "norm-only").mkdir()
    save_file({NORM: torch.ones(policy.model.norm.weight.numel())},
              str(ckpt_root / "norm-only" / "model.safetensors"))
    assert client.reload(str(ckpt_root / "norm-only"), partial=True).partial
    full = save_checkpoint(policy, tokenizer, ckpt_root / "full-a", seed=91)
    result = client.reload(str(ckpt_root / "full-a"))
    assert result.ok and not result.partial
    assert_parity(fleet, full, tokenizer, result.version)
    shutil.rmtree(ckpt_root / "full-a")  # vLLM would have validated against this directory
    other = save_checkpoint(policy, tokenizer, ckpt_root / "full-b", seed=92)
    result = client.reload(str(ckpt_root / "full-b"))
    assert_parity(fleet, other, tokenizer, result.version)
    shutil.rmtree(ckpt_root / "full-b")
    pushed = client.push_weights(other)  # a trainer's session with the model's own tensors
    assert pushed.ok and not pushed.partial and pushed.version == result.version + 1
    back = client.reload(None)  # and the original model, from the engine's own files
    assert back.ok


# ---- files a client can put in a load root ---------------------------------------------------
def test_a_fifo_in_a_load_root_is_refused_at_once_and_nothing_stalls(service, client,
                                                                      ckpt_root):
    (ckpt_root / "fifo").mkdir()
    os.mkfifo(ckpt_root / "fifo" / "model.safetensors")
    before = _states(client)
    health: list[int] = []
    done = threading.Event()

    def probe() -> None:  # /healthz keeps answering while the reload is handled
        with httpx.Client(timeout=5) as h:
            while not done.is_set():
                health.append(h.get(service.url + "/healthz").status_code)
                time.sleep(0.05)

    t = threading.Thread(target=probe)
    t.start()
    try:
        t0 = time.monotonic()
        r = _reload(service, {"path": str(ckpt_root / "fifo")})
        took = time.monotonic() - t0
    finally:
        done.set()
        t.join()
    assert (r.status_code, r.json()["code"]) == (422, "manifest_error"), r.text
    assert "not a regular file" in r.json()["message"]
    print(f"\nFIFO refused in {took * 1e3:.0f} ms; /healthz answered {len(health)} times")
    assert health and set(health) == {200}
    assert _states(client) == before


def test_a_file_symlink_out_of_the_load_root_is_refused(service, client, ckpt_root, policy,
                                                        tokenizer, tmp_path):
    save_checkpoint(policy, tokenizer, tmp_path / "outside", seed=93)
    (ckpt_root / "sneaky").mkdir()
    os.symlink(tmp_path / "outside" / "model.safetensors",
               ckpt_root / "sneaky" / "model.safetensors")
    before = _states(client)
    r = _reload(service, {"path": str(ckpt_root / "sneaky")})
    assert (r.status_code, r.json()["code"]) == (422, "config_error"), r.text
    assert "outside the allowed load roots" in r.json()["message"]
    assert _states(client) == before


def test_glob_characters_in_a_checkpoint_name_are_only_characters(service, client, fleet,
                                                                  ckpt_root, policy, tokenizer):
    model = save_checkpoint(policy, tokenizer, ckpt_root / "gl[ob]*?", seed=94)
    result = client.reload(str(ckpt_root / "gl[ob]*?"))
    assert result.ok
    assert_parity(fleet, model, tokenizer, result.version)


# ---- state conflicts ---------------------------------------------------------------------------
def test_a_file_swapped_between_validation_and_load_is_refused_whole_never_fenced(
        service, client, ckpt_root, policy, tokenizer):
    """A symlink in a load root flipped between a good checkpoint file and one safetensors
    refuses (trailing bytes after the data), all through a burst of reloads: each reload is
    either the good file, loaded and verified, or a 422 with every engine serving as it was.
    Engines open each file once, check its header and load that open file (PinnedFiles), so a
    flip can never land between the check and the load (before: 30 of 150 tries fenced)."""
    client.reload(None)
    good_dir = ckpt_root / "swap-good"
    save_checkpoint(policy, tokenizer, good_dir, seed=41)
    good = good_dir / "model.safetensors"
    bad = ckpt_root / "swap-bad.safetensors"
    bad.write_bytes(good.read_bytes() + b"\0" * 8)  # safetensors: trailing bytes, refused
    served = ckpt_root / "swap"
    served.mkdir()
    link = served / "model.safetensors"
    link.symlink_to(good)
    stop = threading.Event()

    def flip() -> None:
        i = 0
        while not stop.is_set():
            tmp = served / f".flip-{i}"
            tmp.symlink_to(bad if i % 2 else good)
            os.replace(tmp, link)  # atomic: the link always names one of the two
            i += 1
            time.sleep(0.002)

    flipper = threading.Thread(target=flip, daemon=True)
    flipper.start()
    codes: list[int] = []
    try:
        for _ in range(12):
            before = _states(client)
            r = _reload(service, {"path": str(served)})
            codes.append(r.status_code)
            assert r.status_code in (200, 422), r.text
            states = [e.state for e in client.status().engines]
            assert all(s == EngineState.SERVING for s in states), (r.text, states)
            if r.status_code == 422:
                assert _states(client) == before  # nothing changed anywhere
    finally:
        stop.set()
        flipper.join(5)
    print(f"\nswap burst: {codes.count(200)} loaded, {codes.count(422)} refused, 0 fenced")
    client.reload(None)


def test_reload_and_sessions_on_a_paused_engine_are_409_and_fence_nothing(
        service, client, fleet, ckpt_root, policy, tokenizer):
    from weightsync.transport.packing import named_tensors, spec_of

    save_checkpoint(policy, tokenizer, ckpt_root / "while-paused", seed=95)
    client.pause(engines=["engine-a"])
    before = _states(client)
    r = _reload(service, {"path": str(ckpt_root / "while-paused")})
    assert (r.status_code, r.json()["code"]) == (409, "illegal_state"), r.text
    assert r.json()["engine"] == "engine-a" and "no engine was touched" in r.json()["message"]
    assert _reload(service, {}).status_code == 409
    specs = [spec_of(n, t).model_dump() for n, t in named_tensors(policy)]
    r = httpx.post(service.url + "/sessions", json={"tensors": specs}, headers=AUTH,
                   timeout=120)
    assert (r.status_code, r.json()["code"]) == (409, "illegal_state"), r.text
    # the library refuses the same way, before it pauses anyone
    coord = SyncCoordinator(fleet)
    with pytest.raises(IllegalStateError, match="while paused"):
        coord.sync(policy)
    assert _states(client) == before  # engine-a still paused, not fenced; engine-b serving
    resumed = client.resume(["engine-a"])
    assert [e.state for e in resumed.engines] == [EngineState.SERVING]
    assert [o.aborted for a in fleet for o in outputs(a)] == [False] * 4


# ---- authentication before any body, on real sockets ---------------------------------------
def test_no_body_is_read_before_authentication_and_bodies_are_bounded(service, client):
    big = b"[" * (50 << 20)  # 50 MB of JSON that would nest 52 million levels deep
    with httpx.Client(timeout=120) as h:
        for body in (big, b"{not json", b"[" * 100_000 + b"]" * 100_000):
            t0 = time.monotonic()
            try:
                r = h.post(service.url + "/sessions", content=body,
                           headers={"Content-Type": "application/json"})
            except httpx.TransportError:  # the server answered before the upload ended
                r = None
            took = time.monotonic() - t0
            if r is not None:
                assert (r.status_code, r.json()["code"]) == (401, "unauthorized")
            print(f"\nunauthenticated {len(body)} B body: "
                  f"{r.status_code if r is not None else 'closed'} in {took * 1e3:.0f} ms")
        r = h.post(service.url + "/sessions", content=big,
                   headers={**AUTH, "Content-Type": "application/json"})
        assert (r.status_code, r.json()["code"]) == (413, "body_too_large")
        assert h.get(service.url + "/healthz").status_code == 200
    assert all(e.state == EngineState.SERVING for e in client.status().engines)


# ---- the service as a process: logs and shutdown ---------------------------------------------
@pytest.fixture()
def served(tiny_model, tmp_path):
    """``python -m services.serve`` with one engine, its own local Ray, output in a file."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WEIGHTSYNC_", "RAY_"))}
    env.update(WEIGHTSYNC_MODEL=str(tiny_model), WEIGHTSYNC_ENGINES="1",
               WEIGHTSYNC_DEVICE="cpu", WEIGHTSYNC_TOKEN=TOKEN, WEIGHTSYNC_PORT=str(port),
               WEIGHTSYNC_RAY_ADDRESS="local", WEIGHTSYNC_NAMESPACE="served-test",
               # eager, a short context: the engine starts in half the time of vLLM's CPU
               # defaults (compiled, the model's full context); nothing here needs those
               WEIGHTSYNC_ENGINE_ARGS=json.dumps({"enforce_eager": True, "max_model_len": 512}),
               PYTHONUNBUFFERED="1")
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "services.serve"], env=env,
                                cwd=Path(__file__).parents[2], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 300
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < end, "service not up after 300 s"
            try:
                if httpx.get(url + "/healthz", timeout=2).json()["engines"] == 1:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        yield proc, url, log
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


def test_token_never_logged_and_sigterm_leaves_no_engine_process(served):
    proc, url, log = served
    with httpx.Client(base_url=url, timeout=60) as h:
        for path in ("/?token=" + TOKEN, "/status?access_token=" + TOKEN):
            r = h.get(path)
            assert (r.status_code, r.json()["code"]) == (422, "credentials_in_url")
        r = h.post("/login", data={"token": TOKEN}, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "./"
        session = r.cookies["weightsync_session"]
        assert session and TOKEN not in session
        page = h.get("/")  # the cookie from the sign-in
        assert page.status_code == 200 and "engine-0" in page.text
        assert h.get("/status", headers=AUTH).json()["engines"][0]["state"] == "serving"
    _tokenless_driver_is_refused(log)
    family = psutil.Process(proc.pid).children(recursive=True)
    # the engine's processes: its actor, and vLLM's engine core and worker (when vLLM runs them
    # as processes of their own)
    engine = [p for p in family if any(k in " ".join(_cmdline(p)) + _name(p)
                                       for k in ("VLLM", "EngineHost"))]
    assert engine, [(p.pid, _name(p), " ".join(_cmdline(p))[:80]) for p in family]
    names = sorted(_name(p) for p in engine)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(180) == 0, log.read_text()[-3000:]
    stopped = time.monotonic() - t0
    gone, alive = psutil.wait_procs(family, timeout=60)
    print(f"\nSIGTERM: service exited in {stopped:.1f}s; {len(gone)} descendant processes "
          f"(engine: {names}) gone, {len(alive)} left")
    assert not alive, [(p.pid, _name(p)) for p in alive]
    text = log.read_text()
    assert TOKEN not in text
    assert "token=[redacted]" in text and "stopped 1 engine(s)" in text


def _tokenless_driver_is_refused(log) -> None:
    """The service's own Ray (weightsync.local_ray) refuses a driver without its token: a
    driver on this host that could reach the GCS would otherwise get the engine actor by name
    and pause it, HTTP token or not."""
    import re

    m = re.search(r"Ray at (\S+) \(started here, RAY_AUTH_MODE=token\)", log.read_text())
    assert m, log.read_text()[-3000:]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # one attempt at the GCS, not Ray's 20 a second apart: a refusal does not change on retry
    env["RAY_NUM_REDIS_GET_RETRIES"] = "1"
    driver = ("import ray, sys; ray.init(address=sys.argv[1], namespace='served-test'); "
              "ray.get_actor('engine-0', namespace='served-test'); print('REACHED')")
    r = subprocess.run([sys.executable, "-c", driver, m.group(1)], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0 and "REACHED" not in r.stdout, r.stdout
    assert "Authentication" in r.stderr or "InvalidAuthToken" in r.stderr, r.stderr[-2000:]


def _name(p: psutil.Process) -> str:
    try:
        return p.name()
    except psutil.Error:
        return ""


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []
