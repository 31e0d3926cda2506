"""A trainer that dies mid-sync costs one sync, not the fleet (real processes: the trainer is
SIGKILLed in its own process; real vLLM CPU engines; real gloo). After each kill, within twice
the deadline every engine answers and either serves its old version with unchanged output
(weights untouched) or is fenced with the reason (weights touched); then a new trainer syncs
the fleet and the engines match HF again."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

from tests.integration.api_server import assert_parity, outputs
from weightsync.coordinator import SyncCoordinator
from weightsync.testing.dying_trainer import DEADLINE_S
from weightsync.types import EngineState

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("apply, phase, delay, touched", [
    ("staged", "bucket:1", 0, False),      # mid-broadcast: nothing applied anywhere
    # mid-broadcast, streaming: an engine whose receive began has buckets in its loader
    # (fenced); one whose receive the dying trainer never delivered is untouched (serving)
    ("streaming", "bucket:1", 0, None),
    ("staged", "reload", 0.005, None),     # while the engines apply: either outcome, per engine
    ("staged", "verify", 0, True),         # the engines applied, nobody verified or committed
])
def test_a_trainer_killed_mid_sync_costs_one_sync(fleet, ray_session, tiny_model, policy,
                                                  tokenizer, apply, phase, delay, touched):
    before = [[o.token_ids for o in outputs(a)] for a in fleet]
    v0 = {s.name: s.version for s in ray.get([a.status.remote() for a in fleet])}
    proc = subprocess.run(
        [sys.executable, "-m", "weightsync.testing.dying_trainer",
         ray.get_runtime_context().gcs_address, "weightsync-tests", str(tiny_model), apply,
         phase, str(delay)],
        cwd=Path(__file__).parents[2], capture_output=True, text=True, timeout=300)
    killed = time.monotonic()
    assert proc.returncode == -9 and f"dying at {phase}" in proc.stdout, proc.stdout + proc.stderr
    want = {True: {EngineState.FENCED}, False: {EngineState.SERVING},
            None: {EngineState.FENCED, EngineState.SERVING}}[touched]
    while True:  # every engine answers status throughout; wait for the outcome
        statuses = ray.get([a.status.remote() for a in fleet], timeout=5)
        if all(s.state in want and s.owner is None for s in statuses):
            break
        assert time.monotonic() - killed < 2 * DEADLINE_S, [
            (s.name, s.state.value, s.owner, s.lease_left_s, s.fenced_reason) for s in statuses]
        time.sleep(0.2)
    recovered = time.monotonic() - killed
    print(f"\n{apply} killed at {phase}+{delay}s: engines "
          f"{[s.state.value for s in statuses]} after {recovered:.1f}s")
    for s, b, actor in zip(statuses, before, fleet, strict=True):
        assert s.version == v0[s.name]  # nothing was published
        if s.state == EngineState.FENCED:  # touched: fenced, and why
            assert "expired" in s.fenced_reason and "went silent" in s.fenced_reason
        else:  # untouched: its old version, the same output
            assert [o.token_ids for o in outputs(actor)] == b
    # a new trainer takes the fleet back
    res = SyncCoordinator(fleet).sync(policy)
    assert res.ok and res.version > max(v0.values())
    assert_parity(fleet, policy, tokenizer, res.version)


def test_a_bucket_held_past_its_deadline_costs_one_sync_and_the_trainer_cannot_come_back(
        fleet, ray_session, tiny_model, policy, tokenizer):
    """The trainer stops (SIGSTOP) holding bucket 1: the engines see no data and no heartbeat.
    Within twice the deadline they serve their old version again. When the trainer resumes
    (SIGCONT) its sync fails and it changes nothing: the engines no longer belong to it."""
    import os
    import signal

    before = [[o.token_ids for o in outputs(a)] for a in fleet]
    v0 = {s.name: s.version for s in ray.get([a.status.remote() for a in fleet])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "weightsync.testing.dying_trainer",
         ray.get_runtime_context().gcs_address, "weightsync-tests", str(tiny_model), "staged",
         "bucket:1", "stop"],
        cwd=Path(__file__).parents[2], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "stalling at bucket:1" in line, line + proc.stderr.read()
        stalled = time.monotonic()
        while True:
            statuses = ray.get([a.status.remote() for a in fleet], timeout=5)
            if all(s.state == EngineState.SERVING and s.owner is None for s in statuses):
                break
            assert time.monotonic() - stalled < 2 * DEADLINE_S, statuses
            time.sleep(0.2)
        print(f"\nbucket held: every engine serving again after "
              f"{time.monotonic() - stalled:.1f}s")
        os.kill(proc.pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3 and "the sync failed" in out, out + err
    statuses = ray.get([a.status.remote() for a in fleet], timeout=5)
    assert all(s.state == EngineState.SERVING and s.version == v0[s.name] for s in statuses)
    assert [[o.token_ids for o in outputs(a)] for a in fleet] == before
    res = SyncCoordinator(fleet).sync(policy)
    assert res.ok and res.version > max(v0.values())
    assert_parity(fleet, policy, tokenizer, res.version)
