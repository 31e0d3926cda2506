"""The fleet protocol with multi-worker (tensor-parallel) engines, on the real coordinator,
hosts and worker extension with only vLLM stood in for (``weightsync.testing.fleet``): every
worker's reply counts. The same on real vLLM TP=2 CPU engines is
tests/integration/test_tensor_parallel.py."""

from __future__ import annotations

import pytest

from weightsync.config import TransferConfig
from weightsync.coordinator import SyncCoordinator
from weightsync.errors import SyncFailedError
from weightsync.testing.fleet import Faults, TinyModel
from weightsync.types import EngineState


@pytest.fixture()
def fleet(local_fleet):
    return local_fleet



def _coord(engines) -> SyncCoordinator:
    return SyncCoordinator(engines, TransferConfig(bucket_bytes=1 << 16))


def _states(coord) -> dict[str, tuple[EngineState, int]]:
    return {s.name: (s.state, s.version) for s in coord.statuses()}


def test_a_mixed_fleet_syncs_and_every_worker_is_fingerprinted(fleet):
    engines = fleet({"tp2": 2, "tp1": 1})
    coord = _coord(engines)
    res = coord.sync(TinyModel.seeded(1), leg="loopback")
    assert res.ok and [r.engine for r in res.engines] == ["tp2", "tp1"]
    tp2, tp1 = res.engines
    # one digest per worker; the engines' shapes differ, so neither is the other's "minority"
    assert len(tp2.fingerprint.split("|")) == 2 and len(tp1.fingerprint.split("|")) == 1
    assert _states(coord) == {"tp2": (EngineState.SERVING, 1), "tp1": (EngineState.SERVING, 1)}
    ok, _ = engines.wait({"tp2": engines.engine_workers("tp2")}, 5)
    assert ok["tp2"].workers == 2 and ok["tp2"].shape == "tp2xpp1x2"


def test_one_workers_corrupted_bucket_fences_its_engine_and_the_rest_roll_back(fleet):
    engines = fleet({"a": 2, "b": 2, "c": 1}, b=Faults(corrupt_bucket=0, corrupt_rank=1))
    coord = _coord(engines)
    with pytest.raises(SyncFailedError) as e:
        coord.sync(TinyModel.seeded(2), leg="loopback")
    res = e.value.result
    assert [(r.engine, r.ok, r.fenced) for r in res.engines] == \
        [("a", False, False), ("b", False, True), ("c", False, False)]
    b = res.engines[1]
    assert "worker rank 1/2: bucket(s) [0]" in b.error and "rank 0/2" not in b.error
    states = _states(coord)
    assert states["a"] == states["c"] == (EngineState.SERVING, 0)  # rolled back, untouched
    assert states["b"] == (EngineState.FENCED, 0)
    engines.faults["b"] = Faults()
    assert coord.sync(TinyModel.seeded(3), leg="loopback").ok  # a resync verifies and unfences it
    assert {s for s, _ in _states(coord).values()} == {EngineState.SERVING}


def test_every_worker_getting_the_same_wrong_bytes_rolls_back_like_any_transfer(fleet):
    engines = fleet({"a": 2, "b": 2}, b=Faults(corrupt_bucket=0))  # both of b's workers
    coord = _coord(engines)
    with pytest.raises(SyncFailedError) as e:
        coord.sync(TinyModel.seeded(4), leg="loopback")
    assert [(r.engine, r.fenced) for r in e.value.result.engines] == [("a", False), ("b", False)]
    assert {s for s, _ in _states(coord).values()} == {EngineState.SERVING}


def test_weights_that_differ_on_one_engine_of_a_shape_fence_it(fleet):
    engines = fleet({"a": 2, "b": 2, "c": 2, "d": 1}, c=Faults(skew_load=True))
    coord = _coord(engines)
    with pytest.raises(SyncFailedError) as e:
        coord.sync(TinyModel.seeded(5), leg="loopback")
    res = e.value.result
    assert [(r.engine, r.ok) for r in res.engines] == \
        [("a", True), ("b", True), ("c", False), ("d", True)]
    assert "worker rank(s) [0, 1] of tp2xpp1x2" in res.engines[2].error


def test_a_tensor_parallel_engine_says_why_it_takes_checkpoint_format(fleet):
    engines = fleet({"a": 2})
    ok, _ = engines.wait({"a": engines.kernel_layout("a")}, 5)
    assert not ok["a"].candidate and "tensor-parallel engine (2 workers" in ok["a"].reason


def test_a_tensor_parallel_engines_memory_counts_every_gpu_once():
    """Sleep's report of a tensor-parallel engine (``merge_memory``): free and total once per
    GPU its workers use (device-wide readings), allocator counters per worker process."""
    from weightsync.engine.workers import merge_memory
    from weightsync.messages import EngineWorkers, GpuMemory

    gib = 1 << 30
    two_gpus = EngineWorkers(workers=2, tensor_parallel=2, pipeline_parallel=1,
                             device_uuids=("GPU-a", "GPU-b"))
    a = GpuMemory(free=10 * gib, total=80 * gib, allocated=gib, reserved=2 * gib)
    b = GpuMemory(free=12 * gib, total=80 * gib, allocated=gib, reserved=3 * gib)
    assert merge_memory([a, b], two_gpus) == GpuMemory(free=22 * gib, total=160 * gib,
                                                       allocated=2 * gib, reserved=5 * gib)
    peaks = [r.model_copy(update={"peak_allocated": p * gib}) for r, p in ((a, 3), (b, 4))]
    assert merge_memory(peaks, two_gpus).peak_allocated == 7 * gib  # each worker's, summed
    one_gpu = two_gpus.model_copy(update={"device_uuids": ("GPU-a", "GPU-a")})
    assert merge_memory([a, a], one_gpu).free == 10 * gib  # one GPU's free memory, once
    assert merge_memory([a], None) == a
    assert merge_memory([GpuMemory(), GpuMemory()], two_gpus) == GpuMemory()  # CPU
