"""The colocated loop's state machine — sleep -> (the trainer trains) -> sync into the sleeping
engines -> serving — on the real coordinator, engine hosts and workers, with only vLLM stood in
for (``weightsync.testing.fleet``). ``sleep_mode=True`` engines keep vLLM's sleep semantics
(level 1 backs the weights up, level 2 discards them; woken memory without a backup is
garbage), so the GPU branches run here; ``sleep_mode=False`` engines are what a CPU engine
is. The same loop on real vLLM engines: tests/integration/test_colocated_cpu.py (CPU) and
tests/gpu/test_colocated_gpu.py (H200)."""

from __future__ import annotations

import time

import pytest
import torch

from weightsync.config import Deadlines, TransferConfig
from weightsync.coordinator import SyncCoordinator
from weightsync.errors import ConfigError, IllegalStateError, ManifestError, SyncFailedError
from weightsync.testing.fleet import Faults, TinyModel
from weightsync.types import EngineState

S = EngineState


@pytest.fixture()
def fleet(local_fleet):
    return lambda sleep_mode=True, **faults: local_fleet(sleep_mode=sleep_mode, **faults)



def _coord(engines, **cfg) -> SyncCoordinator:
    return SyncCoordinator(engines, TransferConfig(bucket_bytes=1 << 16, **cfg))


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[n], b[n]) for n in a)


def _status(coord, name):
    return next(s for s in coord.statuses() if s.name == name)


@pytest.mark.parametrize("sleep_mode", [True, False], ids=["gpu-semantics", "cpu"])
@pytest.mark.parametrize("level", [1, 2])
def test_sleep_train_sync_serves_the_new_weights(fleet, sleep_mode, level):
    engines = fleet(sleep_mode)
    coord = _coord(engines)
    slept = coord.sleep(level)
    assert [r.engine for r in slept.engines] == ["a", "b"]
    assert {s.state for s in coord.statuses()} == {S.ASLEEP}
    assert all(s.owner == coord.owner and s.sleep_level == level for s in coord.statuses())
    if sleep_mode:  # released: level 1 keeps a backup, level 2 does not
        assert torch.isnan(engines.weights("a")["proj.weight"]).all()
        assert all(not r.skipped for r in slept.engines)
    else:  # nothing to release on CPU: a no-op with the reason, same states
        assert all("CUDA-only" in r.skipped[0] and r.freed_bytes is None for r in slept.engines)
    new = TinyModel.seeded(1)
    res = coord.sync(new, leg="loopback", sleep_level=level)
    assert res.ok and {s.state for s in coord.statuses()} == {S.SERVING}
    assert all(s.owner is None and s.sleep_level == 0 for s in coord.statuses())
    want = {n: p.detach() for n, p in new.named_parameters()}
    assert _same(engines.weights("a"), want) and _same(engines.weights("b"), want)
    rep = res.engines[0]
    assert "pause" not in rep.seconds  # paused since it fell asleep
    assert f"sleep: already asleep at level {level}" in rep.skipped
    if sleep_mode:
        assert {"wake_weights", "wake_kv"} <= set(rep.seconds)  # weights first, KV at commit
        assert engines.handles["a"].engine.sleep_mode.calls == [
            ("sleep", level), ("wake_up", ("weights",)), ("wake_up", ("kv_cache",))]


@pytest.mark.parametrize("level", [1, 2])
def test_a_refused_sync_leaves_sleeping_engines_asleep(fleet, level):
    engines = fleet()
    coord = _coord(engines)
    coord.sleep(level)
    with pytest.raises(ManifestError):
        coord.sync({"proj.weight": torch.zeros(3, 3)}, leg="loopback", partial=True)
    with pytest.raises(ConfigError):
        coord.sync(TinyModel.seeded(2), leg="no-such-leg")
    assert {(s.state, s.sleep_level, s.owner) for s in coord.statuses()} == \
        {(S.ASLEEP, level, coord.owner)}
    assert engines.handles["a"].engine.sleep_mode.calls == [("sleep", level)]  # never woken


@pytest.mark.parametrize("level", [1, 2])
def test_a_failed_transfer_puts_sleeping_engines_back_to_sleep_unfenced(fleet, level):
    engines = fleet(a=Faults(), b=Faults(corrupt_bucket=0))
    coord = _coord(engines)
    original = engines.weights("a")
    coord.sleep(level)
    with pytest.raises(SyncFailedError) as e:
        coord.sync(TinyModel.seeded(3), leg="loopback")
    assert all(not r.fenced and r.error for r in e.value.result.engines)
    assert {(s.state, s.sleep_level, s.owner, s.version) for s in coord.statuses()} == \
        {(S.ASLEEP, level, coord.owner, 0)}
    assert torch.isnan(engines.weights("a")["proj.weight"]).all()  # released again
    if level == 1:  # its old weights were backed up again: waking serves them
        coord.wake()
        assert {s.state for s in coord.statuses()} == {S.SERVING}
        assert _same(engines.weights("a"), original)
    else:  # weights gone since the sleep: still no weights, still asleep, not fenced
        engines.faults["b"] = Faults()
        assert coord.sync(TinyModel.seeded(4), leg="loopback").ok
        assert {s.state for s in coord.statuses()} == {S.SERVING}


def test_a_broken_streaming_apply_into_a_sleeping_engine_fences_only_it(fleet):
    engines = fleet(a=Faults(), b=Faults(fail_load_after=1))
    coord = _coord(engines, apply="streaming")
    coord.sleep(1)
    with pytest.raises(SyncFailedError):
        coord.sync(TinyModel.seeded(5), leg="loopback")
    a, b = _status(coord, "a"), _status(coord, "b")
    assert a.state == S.SERVING and a.version == 1
    assert b.state == S.FENCED and "loader failed" in b.fenced_reason  # touched: never routable
    engines.faults["b"] = Faults()
    assert coord.sync(TinyModel.seeded(6), leg="loopback").ok  # a resync (KV still asleep) unfences it
    assert {s.state for s in coord.statuses()} == {S.SERVING}


def test_wake_without_a_sync_serves_level_1_and_fences_level_2(fleet):
    engines = fleet()
    coord = _coord(engines)
    before = engines.weights("a")
    coord.sleep(1, engines=["a"])
    coord.sleep(2, engines=["b"])
    assert _status(coord, "a").state == S.ASLEEP and _status(coord, "b").state == S.ASLEEP
    (a,) = coord.wake(engines=["a"], tags=["kv_cache"])
    assert a.state == S.ASLEEP  # weights still asleep: not serving
    (b,) = coord.wake(engines=["b"], tags=["weights"])
    assert b.state == S.WEIGHTS_AWAKE  # allowed: a sync can follow
    (a,) = coord.wake(engines=["a"])
    assert a.state == S.SERVING and _same(engines.weights("a"), before)
    (b,) = coord.wake(engines=["b"])
    assert b.state == S.FENCED and "level 2" in b.fenced_reason
    with pytest.raises(IllegalStateError, match="no engine was touched"):
        coord.wake()  # nothing asleep


def test_sleep_refuses_what_it_cannot_do_before_touching_anything(fleet):
    engines = fleet()
    coord = _coord(engines)
    with pytest.raises(ConfigError, match="level"):
        coord.sleep(3)
    coord.sleep(1, engines=["a"])
    with pytest.raises(IllegalStateError, match="no engine was touched"):
        coord.sleep(1)  # a is asleep already
    assert _status(coord, "b").state == S.SERVING
    with pytest.raises(ConfigError, match="keep"):
        coord.sleep(1, engines=["b"], pause_mode="keep")
    assert _status(coord, "b").state == S.SERVING
    other = _coord(engines)  # another trainer: a is held by the first while it lives
    with pytest.raises(IllegalStateError, match=f"held by {coord.owner}"):
        other.sync(TinyModel.seeded(7), leg="loopback")
    assert _status(coord, "a").state == S.ASLEEP and _status(coord, "b").state == S.SERVING


@pytest.mark.parametrize("level, want", [(1, S.SERVING), (2, S.FENCED)])
def test_engines_asleep_for_a_trainer_that_died_do_not_stay_asleep(fleet, level, want):
    engines = fleet()
    dying = _coord(engines, deadlines=Deadlines(lease=0.3))
    dying.sleep(level)
    dying.close()  # its process is gone: no more heartbeats
    end = time.monotonic() + 5
    while {s.state for s in dying.statuses()} != {want}:
        assert time.monotonic() < end, dying.statuses()
        time.sleep(0.02)
    for s in dying.statuses():
        assert s.owner is None and s.version == 0
        if want == S.FENCED:
            assert "expired" in s.fenced_reason and "no weights" in s.fenced_reason
    assert _coord(engines).sync(TinyModel.seeded(8), leg="loopback").ok  # a new trainer takes over
    assert {s.state for s in dying.statuses()} == {S.SERVING}


def test_a_heartbeat_keeps_sleeping_engines_for_their_trainer(fleet):
    engines = fleet()
    coord = _coord(engines, deadlines=Deadlines(lease=0.3))
    coord.sleep(1)
    time.sleep(1.0)  # three leases: the trainer trains, its heartbeat renews
    assert {(s.state, s.owner) for s in coord.statuses()} == {(S.ASLEEP, coord.owner)}
    assert coord.sync(TinyModel.seeded(9), leg="loopback").ok


def test_a_coordinator_that_lost_its_sync_cannot_touch_the_next_one(fleet):
    """A trainer that stalled past its lease (a long GC pause, SIGSTOP) and comes back must not
    commit, abort or fence a sync another coordinator now drives."""
    engines = fleet()
    stale, successor = _coord(engines), _coord(engines)
    host = engines.handles["a"]
    theirs, ours = engines.signed(successor.owner), engines.signed(stale.owner)
    run = theirs.begin_sync("a", pause_mode="abort", sleep_level=0, deadline_s=5, lease_s=30,
                            takeover=False, version=0)
    assert engines.wait({"a": run}, 5)[0]
    for step in (lambda: ours.commit("a", 7, 5.0), lambda: ours.apply_staged("a", 5.0),
                 lambda: ours.finish_load("a", 5.0)):
        _, bad = engines.wait({"a": step()}, 5)
        assert isinstance(bad["a"], IllegalStateError) and "no longer held" in str(bad["a"])
    ok, _ = engines.wait({"a": ours.abort_sync("a", "stale", 5.0, fence=True)}, 5)
    assert ok["a"].state == S.PAUSED and ok["a"].owner == successor.owner  # untouched
    ok, _ = engines.wait({"a": theirs.abort_sync("a", "done", 5.0)}, 5)
    assert ok["a"].state == S.SERVING and host.version == 0


def test_engines_asleep_for_this_coordinator_are_synced_without_asking_their_status(fleet):
    engines = fleet()
    coord = _coord(engines)
    assert coord.sync(TinyModel.seeded(20), leg="loopback").ok  # validated once; statuses asked
    coord.sleep(2)
    calls: list[str] = []
    start = engines.inner.start  # (every call's host method, as the transport carries it)
    engines.inner.start = lambda n, call: (calls.append(call.method), start(n, call))[1]
    res = coord.sync(TinyModel.seeded(21), leg="loopback")
    assert res.ok and res.version == 2
    begun = calls.index("begin_sync")
    assert "status" not in calls[:begun]  # held since its sleep: nothing to ask
    assert {(s.state, s.version) for s in coord.statuses()} == {(S.SERVING, 2)}
    assert not any(h.engine.paused for h in engines.handles.values())


def test_a_held_engine_that_moved_on_refuses_a_reused_version_untouched(fleet):
    """The trainer stalled past its lease while its engines slept; another coordinator took
    them over and synced them. The stalled one, back, must not reuse that version number."""
    engines = fleet()
    stalled, other = _coord(engines), _coord(engines)
    stalled.sleep(2)
    assert other.sync(TinyModel.seeded(22), leg="loopback", takeover=True).version == 1
    served = engines.weights("a")
    with pytest.raises(IllegalStateError, match="already used"):
        stalled.sync(TinyModel.seeded(23), leg="loopback")
    assert {(s.state, s.version) for s in stalled.statuses()} == {(S.SERVING, 1)}
    assert _same(engines.weights("a"), served)  # nothing was touched
    res = stalled.sync(TinyModel.seeded(24), leg="loopback")  # it asks first now
    assert res.ok and res.version == 2


def test_a_new_coordinator_syncs_engines_it_slept_after_another_ones_failed_sync(fleet):
    """A failed sync elsewhere left the engines having seen a version never published; a new
    coordinator that slept them (and so does not ask again before syncing) skips it."""
    engines = fleet(a=Faults(), b=Faults(corrupt_bucket=0))
    coord = _coord(engines)  # made before, and after, the failed sync
    with pytest.raises(SyncFailedError):
        _coord(engines).sync(TinyModel.seeded(30), leg="loopback")  # version 1 seen, not published
    engines.faults["b"] = Faults()
    for c in (coord, _coord(engines)):
        c.sleep(2)
        res = c.sync(TinyModel.seeded(31), leg="loopback")
        assert res.ok and res.version == max(s.version_seen for s in c.statuses())
