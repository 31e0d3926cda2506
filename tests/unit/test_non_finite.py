"""Non-finite weights never go live: refused in the worker before anything is applied, with the
tensor named, on every apply mode and on the direct (checked-by-copy) path; with the check
turned off they go live, and the next commit zeroes the KV cache. Real coordinator, hosts and
workers over the stand-in vLLM (``weightsync.testing.fleet``); the real-engine tests are
``tests/integration/test_warm_cold.py``."""

from __future__ import annotations

import pytest
import torch

from weightsync.config import TransferConfig
from weightsync.coordinator import SyncCoordinator
from weightsync.errors import SyncFailedError
from weightsync.testing.fleet import TinyModel
from weightsync.types import EngineState


def _poisoned(seed: int, value: float) -> TinyModel:
    m = TinyModel.seeded(seed)
    with torch.no_grad():
        m.proj.weight[2, 3] = value
    return m


@pytest.mark.parametrize("apply,leg,direct", [
    ("staged", "broadcast", False), ("staged", "loopback", False),
    ("streaming", "broadcast", False), ("staged", "loopback", True)],
    ids=["staged-broadcast", "staged-loopback", "streaming", "direct-pieces"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_update_is_refused_and_names_the_tensor(local_fleet, apply, leg, direct,
                                                               value):
    engines = local_fleet(workers={"a": 1})
    cfg = TransferConfig(bucket_bytes=1 << 16, apply=apply, ipc_direct=direct)
    coord = SyncCoordinator(engines, cfg)
    assert coord.sync(TinyModel.seeded(1), leg=leg).ok
    if direct:  # the direct path takes the kernel layout, verified by a first load
        res = coord.sync(TinyModel.seeded(2), leg=leg)
        assert res.ok and res.layout == "kernel", res
        took = res.engines[0].seconds  # the check is timed, inside the load it precedes
        assert 0 < took["transfer.finite"] <= took["reload"], sorted(took)
    before = engines.weights("a")
    with pytest.raises(SyncFailedError) as e:
        coord.sync(_poisoned(3, value), leg=leg)
    (rep,) = e.value.result.engines
    assert "non-finite" in rep.error and "proj.weight" in rep.error, rep.error
    host = engines.handles["a"]
    if apply == "streaming":  # the poisoned bucket came after others were loaded: fenced
        assert host.state in (EngineState.FENCED, EngineState.SERVING)
    else:  # nothing applied: still serving the old weights, exactly
        assert host.state == EngineState.SERVING
        after = engines.weights("a")
        assert all(torch.equal(after[n], before[n]) for n in before)
    coord.close()


def test_with_the_check_off_the_update_goes_live_and_the_next_commit_scrubs_the_kv_cache(
        local_fleet):
    engines = local_fleet(workers={"a": 1})
    unchecked = SyncCoordinator(engines, TransferConfig(bucket_bytes=1 << 16,
                                                        check_finite=False))
    res = unchecked.sync(_poisoned(3, float("nan")), leg="loopback")
    assert res.ok and "scrub_kv" not in res.engines[0].seconds
    assert torch.isnan(engines.weights("a")["proj.weight"]).any()
    kv = engines.handles["a"].engine.worker.model_runner.kv_caches[0]
    kv.fill_(float("nan"))  # what the unchecked version's requests wrote
    unchecked.close()
    checked = SyncCoordinator(engines, TransferConfig(bucket_bytes=1 << 16))
    res = checked.sync(TinyModel.seeded(4), leg="loopback")
    assert res.ok and "scrub_kv" in res.engines[0].seconds
    assert torch.count_nonzero(kv) == 0  # no block of the NaN version survives
    res = checked.sync(TinyModel.seeded(5), leg="loopback")
    assert "scrub_kv" not in res.engines[0].seconds  # only after an unchecked version
    checked.close()
