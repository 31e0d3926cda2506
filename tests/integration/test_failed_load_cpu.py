"""A load that fails part-way on one engine (#32's "a forced failure mid-load fences only that
engine", here on the CPU in fp32; ``tests/gpu/test_fp8_gpu.py`` does it on FP8 engines).

The failing engine is a real vLLM engine whose checkpoint loader raises after a few tensors of
its first sync (``weightsync.testing.failing_load``): its weights are half-written when the
error reaches the host. Beside it, the session fleet's engine-a takes the same sync.
"""

from __future__ import annotations

import pytest
import ray

from tests.integration.oracle import served
from weightsync.config import EngineSpec, TransferConfig
from weightsync.coordinator import SyncCoordinator
from weightsync.engine.actor import start_engines, stop_engines
from weightsync.errors import SyncFailedError
from weightsync.testing.failing_load import failing_load_engine
from weightsync.testing.reference import perturb_
from weightsync.types import EngineState

pytestmark = pytest.mark.integration


def test_a_load_that_fails_part_way_fences_only_that_engine(fleet, tiny_model, policy):
    """The sync fails on the failing engine alone: it is fenced with the loader's error and
    refuses requests; engine-a takes the version and serves it. The next sync brings the
    fenced engine back, serving exactly what engine-a serves."""
    spec = EngineSpec(name="engine-failing-load", model=str(tiny_model), dtype="float32",
                      max_model_len=512, enforce_eager=True)
    [failing] = start_engines([spec], make_engine=failing_load_engine(load=1, after=5))
    healthy = fleet[0]
    coord = SyncCoordinator([healthy, failing], TransferConfig(bucket_bytes=1 << 20))
    try:
        perturb_(policy, scale=0.05, seed=3201)
        with pytest.raises(SyncFailedError) as failed:
            coord.sync(policy)
        result = failed.value.result
        by = {r.engine: r for r in result.engines}
        assert by["engine-a"].ok and not by["engine-a"].fenced, by["engine-a"]
        bad = by["engine-failing-load"]
        assert not bad.ok and bad.fenced and "injected: load 1 failed after 5 tensors" in \
            bad.error, bad
        st = ray.get(failing.status.remote(), timeout=30)
        assert st.state == EngineState.FENCED and "injected" in (st.fenced_reason or ""), st
        with pytest.raises(Exception, match="fenced"):
            served(failing)
        healthy_st = ray.get(healthy.status.remote(), timeout=30)
        assert (healthy_st.state, healthy_st.version) == (EngineState.SERVING,
                                                          result.version)
        took = served(healthy)

        perturb_(policy, scale=0.05, seed=3202)
        res = coord.sync(policy)
        assert res.ok and all(r.ok for r in res.engines), res
        assert served(failing) == served(healthy) != took
    finally:
        coord.close()
        stop_engines([failing], timeout_s=30)
