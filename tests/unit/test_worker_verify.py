"""The worker's receive logic (``engine.intake``), without vLLM: a bucket whose checksum differs
from the sender's is refused before anything is applied; ``atomic`` applies only verified
buckets. The applier is a peer that records what it was given (``engine.appliers.Applier``).
(Runs for real on the GPU: tests/gpu/test_fast_path_gpu.py.)"""

from __future__ import annotations

import json

import pytest
import torch

from weightsync.engine.appliers import AppliedReport, Applier, Load, choose
from weightsync.engine.intake import Intake
from weightsync.engine.layout_check import LayoutCheck
from weightsync.engine.sync_state import WorkerSyncState
from weightsync.errors import ReloadError, TransferError, VerificationError
from weightsync.transport.packing import checksums, pack_bucket, plan_buckets, spec_of


class _Recording(Applier):
    """An applier that records which buckets it was given instead of loading them."""

    name = layout = "recording"

    def __init__(self) -> None:
        super().__init__(worker=None, state=_state())
        self.loaded: list[int] = []

    def apply(self, load: Load) -> AppliedReport:
        self.loaded.extend(b.index for b, _ in (load.staged or load.stream or ()))
        return AppliedReport(reload_s=0.0)


def _state() -> WorkerSyncState:
    def derive():
        raise AssertionError("no layout here")

    return WorkerSyncState(layout=LayoutCheck(derive))


class _Worker:
    """The intake with a recording applier (no model here)."""

    def __init__(self) -> None:
        self.applier = _Recording()
        self.state = self.applier.state
        self.intake = Intake(self.state, lambda: f"loaded {self.loaded}")

    @property
    def loaded(self) -> list[int]:
        return self.applier.loaded

    def _consume(self, plan, stream, apply, expected):
        return self.intake.consume(plan, stream, apply, self.applier, expected=expected)


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
        assert w.loaded == [] and w.state.staged is None


def test_atomic_needs_the_senders_checksums_and_plan_keys_ignore_the_version():
    plan, bufs, _ = _plan_and_bufs()
    with pytest.raises(TransferError, match="checksums"):
        _Worker()._consume(plan, zip(plan.buckets, bufs), "atomic", None)
    again = plan.model_copy(update={"version": 4})
    assert again.body().key == plan.body().key and again.body() == plan.body()
    assert "version" not in json.loads(plan.body().json_text)
    # a plan's kept body is shared by its copies at other versions, and dropped for another
    # plan
    assert json.loads(again.body().json_text) == json.loads(again.model_dump_json(
        exclude={"version"}))
    other = plan.model_copy(update={"buckets": plan.buckets[:1], "partial": True})
    assert json.loads(other.body().json_text) == json.loads(other.model_dump_json(
        exclude={"version"}))
    partial = plan.model_copy(update={"partial": True})
    assert partial.body().key not in (plan.body().key, other.body().key)
    assert json.loads(partial.body().json_text)["partial"] is True


def test_one_applier_per_format_chosen_once_and_kept():
    state = _state()
    checkpoint, kernel = choose(None, state, "checkpoint"), choose(None, state, "kernel")
    direct = choose(None, state, "kernel", checked_by_copy=True)
    assert (checkpoint.name, kernel.name, direct.name) == \
        ("checkpoint", "kernel", "checked-by-copy")
    assert direct.layout == "kernel" and direct.checks_copies and not kernel.checks_copies
    assert choose(None, state, "kernel") is kernel  # kept across syncs
    with pytest.raises(TransferError, match="no applier"):
        choose(None, state, "fp8")


def test_staged_buckets_apply_once_by_the_applier_chosen_for_their_plan():
    plan, bufs, sums = _plan_and_bufs()
    w = _Worker()
    rep = w._consume(plan, zip(plan.buckets, bufs), "staged", sums)
    assert not rep.applied and w.loaded == [] and w.state.staged is not None
    report, layout = w.intake.apply_staged()
    assert layout == "recording" and w.loaded == [b.index for b in plan.buckets]
    with pytest.raises(ReloadError, match="nothing staged"):
        w.intake.apply_staged()
