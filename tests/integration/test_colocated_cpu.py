"""The colocated RL loop on real vLLM CPU engines: sleep after the rollout, train, sync into the
sleeping engines, serve the new weights. vLLM has no sleep mode on CPU, so a sleep here only
pauses and says why nothing was freed; the states, the ownership and every rule about what a
refused or failed sync leaves behind are the ones the GPU runs (tests/gpu/test_colocated_gpu.py
frees and reuses the memory for real)."""

from __future__ import annotations

import pytest
import ray

from tests.integration.api_server import assert_parity, outputs, save_checkpoint
from weightsync.config import TransferConfig
from weightsync.coordinator import SyncCoordinator
from weightsync.errors import DeadlineExceeded, ManifestError
from weightsync.testing.reference import perturb_
from weightsync.types import EngineState

pytestmark = pytest.mark.integration
S = EngineState


@pytest.fixture()
def coord(fleet):
    c = SyncCoordinator(fleet, TransferConfig(bucket_bytes=1 << 20))
    yield c
    asleep = [s.name for s in c.statuses() if s.state in (S.ASLEEP, S.WEIGHTS_AWAKE)]
    if asleep:
        c.wake(engines=asleep)
    c.close()


def test_sleep_train_sync_three_rounds_serves_each_new_version(fleet, coord, policy, tokenizer):
    for step in range(3):
        slept = coord.sleep(1 + step % 2)
        for rep in slept.engines:
            assert rep.freed_bytes is None and "CUDA-only" in rep.skipped[0]
        assert {(s.state, s.owner) for s in coord.statuses()} == {(S.ASLEEP, coord.owner)}
        with pytest.raises(DeadlineExceeded, match="did not serve within 0.5s"):  # they wait
            ray.get(fleet[0].generate.remote(["hello"], max_tokens=2, wait_s=0.5), timeout=60)
        perturb_(policy, scale=0.02, seed=900 + step)  # the training step
        res = coord.sync(policy)
        assert res.ok and all("pause" not in r.seconds for r in res.engines)
        assert {(s.state, s.owner, s.sleep_level) for s in coord.statuses()} == \
            {(S.SERVING, None, 0)}
        assert_parity(fleet, policy, tokenizer, res.version)


def test_a_refused_sync_leaves_the_sleeping_fleet_asleep_and_unfenced(fleet, coord, policy):
    before = [[o.token_ids for o in outputs(a)] for a in fleet]
    coord.sleep(1)
    with pytest.raises(ManifestError, match="incomplete update"):
        coord.sync({n: p for n, p in list(policy.named_parameters())[:1]})
    assert {(s.state, s.owner, s.fenced_reason) for s in coord.statuses()} == \
        {(S.ASLEEP, coord.owner, None)}
    coord.wake()
    assert [[o.token_ids for o in outputs(a)] for a in fleet] == before


def test_reload_and_wake_through_the_control_plane_follow_the_same_rules(
        service, client, fleet, ckpt_root, policy, tokenizer):
    slept = client.sleep(1)
    assert {e.engine for e in slept.engines} == {"engine-a", "engine-b"}
    model = save_checkpoint(policy, tokenizer, ckpt_root / "colocated", seed=951)
    res = client.reload(str(ckpt_root / "colocated"))  # straight into the sleeping engines
    assert res.ok and {e.state for e in client.status().engines} == {S.SERVING}
    assert_parity(fleet, model, tokenizer, res.version)
