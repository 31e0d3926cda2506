"""The GRPO loop as a Ray job: a real local Ray head on loopback, ``deploy/submit.sh`` (which
wraps ``ray job submit --working-dir . --runtime-env deploy/runtime_env.yaml``), and checks that
the job succeeded with every sync verified, versions 1..N, each step sampling the version the
previous step synced.

Then the same cluster gets a second node (``ray start --address ... --resources``) that alone
has the resource the engines ask for, and ``services.grpo --rollout openai`` runs as a driver of
the cluster: the engines live on another Ray node than the trainer and its rollout router, every
sync goes over the broadcast leg through Ray (no local channel, no IPC), and every sample comes
through the router (the real ``openai`` client) stamped with the version just synced.

Each node is started with ``ray start --block`` in a process session of its own and stopped in
teardown, even on failure, by signalling exactly the processes it started (by pid: ``ray stop
--force`` would kill every Ray process on the machine, other users' included).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent  # the interpreter running pytest: the project venv
STEPS = 3
ROLLOUT_NODE = "ws_rollout_node"  # the second node's resource: the engines need it


def _free_ports(n: int) -> list[int]:
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def _wait_ready(address: str, proc: subprocess.Popen, timeout_s: float) -> None:
    from ray.job_submission import JobSubmissionClient

    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"`ray start --head` exited with {proc.returncode}")
        try:
            JobSubmissionClient(address).list_jobs()
            return
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(1.0)
    raise TimeoutError(f"the Ray job API at {address} did not come up in {timeout_s:.0f}s")


def _stop_tree(proc: subprocess.Popen) -> None:
    """SIGTERM the `ray start --block` process (it stops the Ray processes it started), then
    make sure every process it had started is gone — by pid, nothing else."""
    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
    _, alive = psutil.wait_procs(tree, timeout=30)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=30)


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head on 127.0.0.1 with free ports and its own temp dir; yields the job API URL."""
    gcs, dash, agent, agent_grpc, metrics, client, rt_env = _free_ports(7)
    temp_dir = Path(tempfile.mkdtemp(prefix="ws-e2e-ray-", dir="/tmp"))  # short: socket paths
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_DEDUP_LOGS": "0"}
    env.pop("RAY_ADDRESS", None)
    # a loopback-only throwaway cluster: Ray >= 2.60 would otherwise require a token on the
    # job API, which neither the readiness probe nor `ray job submit` here carries
    env["RAY_AUTH_MODE"] = "disabled"
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
           f"--ray-client-server-port={client}", f"--runtime-env-agent-port={rt_env}",
           "--num-cpus=2", "--num-gpus=0", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    log = open(temp_dir / "ray-start.log", "w")  # noqa: SIM115 - closed in teardown
    proc = subprocess.Popen(cmd, env=env, cwd=temp_dir, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        try:
            _wait_ready(address, proc, timeout_s=180)
        except Exception as e:
            raise RuntimeError(f"{e}\n{(temp_dir / 'ray-start.log').read_text()[-3000:]}") from e
        yield address, f"127.0.0.1:{gcs}", env, temp_dir
    finally:
        _stop_tree(proc)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_job(client, job_id: str, timeout_s: float):
    """The job's terminal status; a job still running at the deadline is stopped."""
    end = time.monotonic() + timeout_s
    status = client.get_job_status(job_id)
    while not status.is_terminal() and time.monotonic() < end:
        time.sleep(2.0)
        status = client.get_job_status(job_id)
    if not status.is_terminal():
        client.stop_job(job_id)
    return status


@pytest.mark.timeout(1500)
def test_grpo_job_succeeds_with_every_sync_verified(ray_head, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    ray_head, _, _, _ = ray_head
    job_id = f"grpo-e2e-{uuid.uuid4().hex[:8]}"
    run_dir = tmp_path / "run"
    env = {**os.environ, "RAY_ADDRESS": ray_head, "RAY": str(VENV_BIN / "ray")}
    # the job API answers before the node's job agent has registered; Ray then refuses the
    # submission with "No available agent to submit job, please try again later" (seen in CI
    # on a busy 2-core box): ask again, as it says, for up to two minutes
    end = time.monotonic() + 120
    while True:
        submit = subprocess.run(
            ["deploy/submit.sh", "--no-wait", "--submission-id", job_id, "--",
             "--steps", str(STEPS), "--engines", "1", "--prompts-per-step", "2",
             "--group-size", "4", "--max-tokens", "8", "--device", "cpu",
             "--run-dir", str(run_dir), "--colocate", "--model-dir", str(tmp_path / "model")],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        if submit.returncode == 0 or "No available agent" not in submit.stderr + submit.stdout \
                or time.monotonic() > end:
            break
        time.sleep(3.0)
    assert submit.returncode == 0, submit.stdout + submit.stderr

    client = JobSubmissionClient(ray_head)
    status = _wait_job(client, job_id, timeout_s=1200)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, f"job {job_id} ended {status}:\n{logs[-6000:]}"

    synced = [int(v) for v in re.findall(r"\bsync v(\d+) verified\b", logs)]
    sampled = [int(v) for v in re.findall(r"\bsampled@v(\d+)\b", logs)]
    assert synced == list(range(1, STEPS + 1)), logs[-6000:]
    assert sampled == list(range(STEPS)), logs[-6000:]  # each step ran on the last sync
    assert f"all {STEPS} syncs verified (versions 1..{STEPS})" in logs
    assert "FAILED" not in logs

    log = json.loads((run_dir / "grpo.json").read_text())
    assert log["summary"]["versions"] == list(range(1, STEPS + 1))
    assert log["summary"]["all_syncs_verified"] is True
    assert all(s["sync_ok"] and s["engine_seconds"]["grpo-engine-0"]["transfer"] > 0
               for s in log["steps"])
    # colocated: the engine slept for every training step and each sync went into it (on CPU
    # the sleep only pauses: nothing to pause at sync time, and the log says why)
    assert log["summary"]["colocated"] is True
    phases = [s["engine_seconds"]["grpo-engine-0"] for s in log["steps"]]
    assert all(s["sleep_seconds"] is not None for s in log["steps"])
    assert not any("pause" in p for p in phases)
    assert logs.count("freed nothing (no sleep mode on this device)") == STEPS
    assert (run_dir / "grpo.png").stat().st_size > 0


def _wait_nodes(gcs: str, n: int, proc: subprocess.Popen, timeout_s: float) -> None:
    """Until the cluster has ``n`` live nodes (asked with ``ray status``)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"`ray start --address` exited with {proc.returncode}")
        out = subprocess.run([str(VENV_BIN / "ray"), "status", f"--address={gcs}"],
                             capture_output=True, text=True, timeout=60).stdout
        if len(re.findall(r"^\s*1 node_", out, re.M)) >= n:
            return
        time.sleep(1.0)
    raise TimeoutError(f"the cluster did not reach {n} nodes in {timeout_s:.0f}s")


@pytest.fixture(scope="module")
def second_node(ray_head):
    """A second node on the same cluster (after the job test), with the engines' resource."""
    _, gcs, env, temp_dir = ray_head
    ports = _free_ports(4)
    cmd = [str(VENV_BIN / "ray"), "start", "--block", f"--address={gcs}",
           "--node-ip-address=127.0.0.1", "--num-cpus=2", "--num-gpus=0",
           f"--resources={json.dumps({ROLLOUT_NODE: 2})}", f"--metrics-export-port={ports[0]}",
           f"--dashboard-agent-listen-port={ports[1]}", f"--dashboard-agent-grpc-port={ports[2]}",
           f"--runtime-env-agent-port={ports[3]}", "--disable-usage-stats"]
    log = open(temp_dir / "ray-node.log", "w")  # noqa: SIM115 - closed in teardown
    proc = subprocess.Popen(cmd, env=env, cwd=temp_dir, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        _wait_nodes(gcs, 2, proc, timeout_s=180)
        yield gcs
    finally:
        _stop_tree(proc)
        log.close()


@pytest.mark.timeout(900)
def test_engines_on_another_node_sync_by_broadcast_and_serve_rollouts_through_the_router(
        ray_head, second_node, tmp_path):
    _, _, env, _ = ray_head
    run_dir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "services.grpo", "--ray-address", second_node, "--steps",
         str(STEPS), "--engines", "1", "--prompts-per-step", "2", "--group-size", "4",
         "--max-tokens", "8", "--device", "cpu", "--run-dir", str(run_dir), "--model-dir",
         str(tmp_path / "model"), "--rollout", "openai", "--engine-resources",
         json.dumps({ROLLOUT_NODE: 1})],
        cwd=REPO, env=env,
        capture_output=True, text=True, timeout=800)
    logs = out.stdout + out.stderr
    assert out.returncode == 0, logs[-6000:]
    assert f"all {STEPS} syncs verified (versions 1..{STEPS})" in logs
    assert "rollouts through the fleet's router at http://127.0.0.1:" in logs
    summary = json.loads((run_dir / "grpo.json").read_text())["summary"]
    steps = json.loads((run_dir / "grpo.json").read_text())["steps"]
    assert summary["rollout"] == "openai" and summary["every_sample_on_its_version"] is True
    assert all(len(s["sample_versions"]) == 2 * 4 and set(s["sample_versions"]) ==
               {s["sampled_version"]} for s in steps)
    assert summary["sample_engines"] == {"grpo-engine-0": STEPS * 2 * 4}
    # the engine is on the other node: its host refused the local channel, Ray carried all
    assert summary["channel_calls"] == {"grpo-engine-0": None}

