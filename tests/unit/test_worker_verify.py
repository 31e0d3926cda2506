"""The worker's receive logic, without vLLM: a bucket whose checksum differs from the
sender's is refused before anything is applied; ``atomic`` applies only verified buckets.
(Runs for real on the GPU: tests/gpu/test_fast_path_gpu.py.)"""

from __future__ import annotations

import pytest
import torch

from weightsync.engine.worker_ext import WeightSyncWorkerExtension
from weightsync.errors import TransferError, VerificationError
from weightsync.transport.packing import checksums, pack_bucket, plan_buckets, spec_of
from weightsync.types import plan_json, versionless


class _Worker(WeightSyncWorkerExtension):
    """The extension with its load step recorded instead of run (no model here)."""

    def __init__(self) -> None:
        self.loaded: list[int] = []

    def _fingerprint(self) -> str:
        return f"loaded {self.loaded}"

    def _apply_staged(self) -> float:
        staged, self._ws["staged"] = self._ws["staged"], []
        self.loaded.extend(b.index for b, _ in staged)
        return 0.0


def _plan_and_bufs():
    ts = {f"w{i}": torch.randn(64, 64) for i in range(4)}
    plan = plan_buckets([spec_of(n, t) for n, t in ts.items()], bucket_bytes=40_000, version=3)
    bufs = [pack_bucket(b, ts, "cpu") for b in plan.buckets]
    return plan, bufs, checksums(bufs)


def test_atomic_apply_loads_only_after_every_bucket_matched():
    plan, bufs, sums = _plan_and_bufs()
    assert len(plan.buckets) > 1
    w = _Worker()
    rep = w._consume(plan, zip(plan.buckets, bufs), "atomic", sums)
    assert rep.applied and w.loaded == [b.index for b in plan.buckets]
    assert list(rep.checksums) == sums


def test_a_differing_bucket_is_refused_and_nothing_is_loaded():
    plan, bufs, sums = _plan_and_bufs()
    for mode in ("atomic", "staged"):
        w = _Worker()
        bad = list(sums)
        bad[-1] ^= 1
        with pytest.raises(VerificationError, match=f"bucket {len(sums) - 1}"):
            w._consume(plan, zip(plan.buckets, bufs), mode, bad)
        assert w.loaded == [] and w._ws["staged"] == []


def test_atomic_needs_the_senders_checksums_and_plan_keys_ignore_the_version():
    plan, bufs, _ = _plan_and_bufs()
    with pytest.raises(TransferError, match="checksums"):
        _Worker()._consume(plan, zip(plan.buckets, bufs), "atomic", None)
    again = plan.model_copy(update={"version": 4})
    assert versionless(plan.model_dump_json()) == versionless(again.model_dump_json())
    assert versionless(plan.model_dump_json()) != plan.model_dump_json()
    # the kept text of a plan is spliced with each copy's own version, and dropped for
    # another plan
    assert plan_json(plan) == plan.model_dump_json()
    assert plan_json(again) == again.model_dump_json() and '"version":4,' in plan_json(again)
    other = plan.model_copy(update={"buckets": plan.buckets[:1], "partial": True})
    assert plan_json(other) == other.model_dump_json()
    assert plan_json(plan.model_copy(update={"partial": True})) == \
        plan.model_copy(update={"partial": True}).model_dump_json()
