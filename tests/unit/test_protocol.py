"""The fleet protocol, on the real coordinator and real engine hosts and workers, with only
vLLM stood in for (``weightsync.testing.fleet``): all-or-nothing rollback, fingerprint-majority
fencing, a broken streaming apply, rolling waves, deadlines, version numbers. Each test runs in
well under a second; the same behaviours on real vLLM engines are in tests/integration."""

from __future__ import annotations

import time

import pytest
import torch

from weightsync.config import Deadlines, TransferConfig
from weightsync.coordinator import SyncCoordinator
from weightsync.errors import SyncFailedError
from weightsync.testing.fleet import Faults, TinyModel
from weightsync.types import EngineState


@pytest.fixture()
def fleet(local_fleet):
    return local_fleet



def _coord(engines, **cfg) -> SyncCoordinator:
    return SyncCoordinator(engines, TransferConfig(bucket_bytes=1 << 16, **cfg))


def _states(coord) -> dict[str, tuple[EngineState, int]]:
    return {s.name: (s.state, s.version) for s in coord.statuses()}


def _prints(engines) -> dict[str, str]:
    out = {}
    for name in engines.handles:
        ok, bad = engines.wait({name: engines.finish_load(name, 5.0)}, 5)
        out[name] = ok[name].fingerprint
    return out


def test_staged_transfer_failure_leaves_every_engine_on_its_old_weights(fleet):
    engines = fleet(a=Faults(), b=Faults(corrupt_bucket=0), c=Faults())
    coord = _coord(engines)
    before, prints = _states(coord), _prints(engines)
    with pytest.raises(SyncFailedError) as e:
        coord.sync(TinyModel.seeded(1), leg="loopback")
    res = e.value.result
    assert [(r.engine, r.ok, r.fenced) for r in res.engines] == \
        [("a", False, False), ("b", False, False), ("c", False, False)]
    assert "bucket(s) [0]" in next(r.error for r in res.engines if r.engine == "b")
    assert _states(coord) == before  # all serving, nobody published
    assert _prints(engines) == prints  # nobody applied a byte


def test_the_engine_whose_weights_differ_from_the_majority_is_fenced(fleet):
    engines = fleet(a=Faults(), b=Faults(), c=Faults(skew_load=True))
    coord = _coord(engines)
    with pytest.raises(SyncFailedError) as e:
        coord.sync(TinyModel.seeded(2), leg="loopback")
    res = e.value.result
    assert [(r.engine, r.ok, r.fenced) for r in res.engines] == \
        [("a", True, False), ("b", True, False), ("c", False, True)]
    states = _states(coord)
    assert states["a"] == states["b"] == (EngineState.SERVING, res.version)
    assert states["c"][0] == EngineState.FENCED
    assert "differ from the rest of the fleet" in coord.statuses()[2].fenced_reason


def test_a_broken_streaming_apply_fences_only_that_engine(fleet):
    engines = fleet(a=Faults(), b=Faults(fail_load_after=2), c=Faults())
    coord = _coord(engines, apply="streaming")
    with pytest.raises(SyncFailedError) as e:
        coord.sync(TinyModel.seeded(3), leg="loopback")
    res = e.value.result
    assert [(r.engine, r.ok, r.fenced) for r in res.engines] == \
        [("a", True, False), ("b", False, True), ("c", True, False)]
    states = _states(coord)
    assert states["a"] == states["c"] == (EngineState.SERVING, res.version)
    assert states["b"] == (EngineState.FENCED, 0)  # half-loaded: never routable
    assert "loader failed at tensor 2" in coord.statuses()[1].fenced_reason


def test_a_rolling_update_stops_at_the_first_failed_wave(fleet):
    engines = fleet(a=Faults(), b=Faults(corrupt_bucket=0), c=Faults())
    coord = _coord(engines)
    prints = _prints(engines)
    with pytest.raises(SyncFailedError) as e:
        coord.sync(TinyModel.seeded(4), leg="loopback", wave_size=1)
    res = e.value.result
    assert [(r.engine, r.ok) for r in res.engines] == [("a", True), ("b", False)]  # c untried
    states = _states(coord)
    assert states["a"] == (EngineState.SERVING, res.version)
    assert states["b"] == states["c"] == (EngineState.SERVING, 0)
    now = _prints(engines)
    assert now["a"] != prints["a"] and (now["b"], now["c"]) == (prints["b"], prints["c"])


def test_a_phase_past_its_deadline_fails_that_engine_instead_of_hanging(fleet):
    # the load (and the fingerprint taken with it) of engine b hangs past the reload deadline
    engines = fleet(a=Faults(), b=Faults(stall={"ws_apply_staged": 8.0}))
    coord = _coord(engines, deadlines=Deadlines(reload=1.5))
    t0 = time.monotonic()
    with pytest.raises(SyncFailedError) as e:
        coord.sync(TinyModel.seeded(5), leg="loopback")
    took = time.monotonic() - t0
    res = e.value.result
    assert [(r.engine, r.ok, r.fenced) for r in res.engines] == \
        [("a", True, False), ("b", False, True)]
    assert "exceeded 1.5s" in res.engines[1].error
    assert took < 8.0  # the stall lasts 8 s: the sync did not wait for it


def test_version_numbers_are_never_reused(fleet):
    engines = fleet(a=Faults(), b=Faults())
    coord = _coord(engines)
    assert coord.sync(TinyModel.seeded(6), leg="loopback").version == 1
    engines.faults["b"] = Faults(corrupt_bucket=0)
    with pytest.raises(SyncFailedError) as e:
        coord.sync(TinyModel.seeded(7), leg="loopback")
    assert e.value.result.version == 2 and coord.version == 1  # tried, never published
    engines.faults["b"] = Faults()
    assert coord.sync(TinyModel.seeded(8), leg="loopback").version == 3  # not 2 again
    other = _coord(engines)  # another trainer over the same engines
    assert other.sync(TinyModel.seeded(9), leg="loopback").version == 4
    assert coord.sync(TinyModel.seeded(10), leg="loopback").version == 5
    assert {v for _, v in _states(coord).values()} == {5}


# ---- a coordinator that dies mid-sync (its lease lapses) ---------------------------------------
class _Crash(Exception):
    """What a trainer dying at a phase looks like from inside: the sync stops mid-way, no
    cleanup, no more heartbeats."""


def _crash_at(phase: str):
    def hook(p: str, engine) -> None:
        if p == phase:
            raise _Crash(p)
    return hook


def _wait_for(coord, want, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        states = _states(coord)
        if all(want(s) for s in states.values()):
            return states
        time.sleep(0.02)
    raise AssertionError(f"engines did not get there: {_states(coord)}")


def test_a_trainer_dying_before_any_weights_moved_costs_one_sync(fleet):
    engines = fleet(a=Faults(), b=Faults())
    dying = _coord(engines, deadlines=Deadlines(lease=0.3))
    dying.on_phase = _crash_at("bucket:0")  # paused everywhere, nothing sent
    prints = _prints(engines)
    with pytest.raises(_Crash):
        dying.sync(TinyModel.seeded(11), leg="loopback")
    assert {s for s, _ in _states(dying).values()} == {EngineState.PAUSED}
    states = _wait_for(dying, lambda s: s[0] == EngineState.SERVING)  # lease lapsed: resumed
    assert {v for _, v in states.values()} == {0} and _prints(engines) == prints
    assert all(s.owner is None for s in dying.statuses())
    assert _coord(engines).sync(TinyModel.seeded(12), leg="loopback").ok  # a new trainer syncs


def test_a_trainer_dying_after_the_weights_were_applied_fences_with_the_reason(fleet):
    engines = fleet(a=Faults(), b=Faults())
    dying = _coord(engines, deadlines=Deadlines(lease=0.3))
    dying.on_phase = _crash_at("verify")  # applied everywhere, never verified or committed
    with pytest.raises(_Crash):
        dying.sync(TinyModel.seeded(13), leg="loopback")
    _wait_for(dying, lambda s: s[0] == EngineState.FENCED)
    assert all("expired" in s.fenced_reason for s in dying.statuses())
    res = _coord(engines).sync(TinyModel.seeded(14), leg="loopback")  # a resync unfences them
    assert res.ok and {s for s, _ in _states(dying).values()} == {EngineState.SERVING}


def test_a_new_coordinator_takes_over_at_once_only_when_it_says_the_old_one_is_gone(fleet):
    from weightsync.errors import IllegalStateError

    engines = fleet(a=Faults(), b=Faults())
    dying = _coord(engines, deadlines=Deadlines(lease=30))
    dying.on_phase = _crash_at("bucket:0")
    with pytest.raises(_Crash):
        dying.sync(TinyModel.seeded(15), leg="loopback")
    successor = _coord(engines)
    with pytest.raises(IllegalStateError, match="no engine was touched"):
        successor.sync(TinyModel.seeded(16), leg="loopback")  # the lease has 30 s to run
    t0 = time.monotonic()
    res = successor.sync(TinyModel.seeded(16), leg="loopback", takeover=True)
    assert res.ok and time.monotonic() - t0 < 5 and res.version == 2  # 1 went to the dead one
    assert {s for s, _ in _states(successor).values()} == {EngineState.SERVING}


def test_a_fingerprint_past_the_verify_deadline_fails_that_engine(fleet):
    """A sync fingerprints as it loads; a checkpoint reload still verifies in a call of its
    own (``finish_load``), under the verify deadline."""
    engines = fleet(a=Faults(), b=Faults(stall={"ws_fingerprint": 8.0}))
    coord = _coord(engines, deadlines=Deadlines(verify=1.5))
    t0 = time.monotonic()
    with pytest.raises(SyncFailedError) as e:
        coord.reload_checkpoint(None)
    res = e.value.result
    assert [(r.engine, r.ok, r.fenced) for r in res.engines] == \
        [("a", True, False), ("b", False, True)]
    assert "exceeded 1.5s" in res.engines[1].error
    assert time.monotonic() - t0 < 8.0  # the stall lasts 8 s: the sync did not wait for it


@pytest.mark.parametrize("apply", ["staged", "streaming"])
def test_a_sync_fingerprints_as_it_loads_without_a_verify_call(fleet, apply):
    """The workers fingerprint what they loaded in the load's own call: the separate
    fingerprint RPC (stalled here past the verify deadline) is never needed, and the digest
    equals the one that RPC computes afterwards."""
    engines = fleet(a=Faults(), b=Faults(stall={"ws_fingerprint": 8.0}))
    coord = _coord(engines, apply=apply, deadlines=Deadlines(verify=1.5))
    res = coord.sync(TinyModel.seeded(11), leg="loopback")
    assert res.ok and all("fingerprint" in r.seconds for r in res.engines)
    engines.faults["b"] = Faults()
    assert _prints(engines) == {r.engine: r.fingerprint for r in res.engines}
    assert len({r.fingerprint for r in res.engines}) == 1


def test_a_plan_is_validated_once_per_engine(fleet):
    """Whether a plan fits depends on the plan and the model only: the second sync of the same
    plan does not ask again (the check is stalled past its deadline here), and a plan that
    does not fit is still refused before anything is touched."""
    from weightsync.errors import ManifestError

    engines = fleet(a=Faults(), b=Faults())
    coord = _coord(engines, deadlines=Deadlines(verify=1.5))
    for seed in (12, 16):  # the first sync verifies the kernel layout the second one uses
        coord.sync(TinyModel.seeded(seed), leg="loopback")
    engines.faults["b"] = Faults(stall={"ws_validate": 8.0})
    assert coord.sync(TinyModel.seeded(13), leg="loopback").ok  # same plan: not asked again
    before = _states(coord)
    bad = {"proj.weight": torch.zeros(3, 3)}  # a new plan (checkpoint format, partial)
    with pytest.raises(ManifestError):  # a new plan is asked (b stalls: a refuses it)
        coord.sync(bad, leg="loopback", partial=True)
    assert _states(coord) == before
    engines.faults["b"] = Faults()
    assert coord.sync(TinyModel.seeded(15), leg="loopback").ok
