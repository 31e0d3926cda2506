"""Who may change an engine: while a sync or a trainer's sleep holds it (its lease), every
state-changing actor method refuses any caller but the holder — a caller that names no owner
(a Ray driver holding the actor handle, the control plane) included — with
``SyncInProgressError``, and changes nothing; the holder passes; with no lease held anyone
passes, as before. Real engine hosts, vLLM stood in for (``weightsync.testing.fleet``)."""

from __future__ import annotations

import pytest

from weightsync.errors import IllegalStateError, SyncInProgressError
from weightsync.remote import HostCall
from weightsync.types import EngineState

S = EngineState

# state-changing actor methods outside a sync, with the arguments they need
CONTROL = {"pause": (), "resume": (), "sleep": (1,), "wake_up": (), "reset_caches": (),
           "fence": ("by hand",), "leave_group": ()}


def _call(engines, method, *args, **kwargs):
    """Actor method ``method`` of engine ``a``, called as any holder of its handle may call it
    (through the in-process transport, as Ray would carry it)."""
    started = {"a": engines.inner.start("a", HostCall(method, args, kwargs))}
    ok, bad = engines.inner.resolve(started, 10)
    if bad:
        raise bad["a"]
    return ok["a"]


def _seen(engines) -> tuple:
    """Everything a refused call must leave as it was: the host's state and the engine's."""
    host = engines.handles["a"]
    st = host.status()
    return (st.state, st.owner, st.version, st.sleep_level, st.fenced_reason,
            host.dormancy.weights_intact, host.dormancy.asleep, host.gate.is_open,
            host.engine.paused, tuple(host.engine.sleep_mode.calls))


def _hold(engines, holder: str) -> None:
    """Engine ``a`` held by ``owner-1``: asleep for its trainer, or paused in its sync."""
    if holder == "sleep":
        _call(engines, "sleep", 1, owner="owner-1", lease_s=0.0)
        assert engines.handles["a"].status().state == S.ASLEEP
    else:
        _call(engines, "begin_sync", pause_mode="abort", sleep_level=0, deadline_s=5,
              owner="owner-1")
        assert engines.handles["a"].status().state == S.PAUSED
    assert engines.handles["a"].status().owner == "owner-1"


@pytest.mark.parametrize("caller", [None, "owner-2"], ids=["no-owner", "another-owner"])
@pytest.mark.parametrize("holder", ["sleep", "sync"])
@pytest.mark.parametrize("method", list(CONTROL))
def test_a_change_from_anyone_but_the_holder_is_refused_and_changes_nothing(local_fleet, method,
                                                                           holder, caller):
    engines = local_fleet(sleep_mode=True)
    _hold(engines, holder)
    before = _seen(engines)
    with pytest.raises(SyncInProgressError, match="owner-1"):
        _call(engines, method, *CONTROL[method], owner=caller)
    assert _seen(engines) == before


@pytest.mark.parametrize("holder", ["sleep", "sync"])
@pytest.mark.parametrize("method", list(CONTROL))
def test_the_holder_passes_the_owner_check(local_fleet, method, holder):
    """The holder's call goes on to the state rules: done where its state allows it, else the
    state error any caller gets (``IllegalStateError``, not ``SyncInProgressError``)."""
    engines = local_fleet(sleep_mode=True)
    _hold(engines, holder)
    state = engines.handles["a"].status().state
    allowed = {"pause": {S.SERVING}, "resume": {S.PAUSED}, "sleep": {S.SERVING, S.PAUSED},
               "wake_up": {S.ASLEEP, S.WEIGHTS_AWAKE}}.get(method)
    if allowed is not None and state not in allowed:
        with pytest.raises(IllegalStateError) as e:
            _call(engines, method, *CONTROL[method], owner="owner-1")
        assert not isinstance(e.value, SyncInProgressError)
        return
    _call(engines, method, *CONTROL[method], owner="owner-1")
    after = engines.handles["a"].status()
    want = {"resume": S.SERVING, "wake_up": S.SERVING, "fence": S.FENCED,
            "sleep": S.ASLEEP}.get(method, state)
    assert after.state == want


def test_the_holder_wakes_and_the_engine_serves_again(local_fleet):
    engines = local_fleet(sleep_mode=True)
    _hold(engines, "sleep")
    with pytest.raises(SyncInProgressError):
        _call(engines, "wake_up")
    st = _call(engines, "wake_up", owner="owner-1")
    assert st.state == S.SERVING and st.owner is None
    assert _call(engines, "pause").state == S.PAUSED  # nobody holds it now: anyone may


def test_with_no_lease_held_anyone_may_change_the_engine(local_fleet):
    """No sync and no trainer's sleep: the control plane's calls (no owner) work as before."""
    engines = local_fleet(sleep_mode=True)
    assert _call(engines, "pause", "wait").state == S.PAUSED
    assert _call(engines, "resume").state == S.SERVING
    _call(engines, "reset_caches")
    _call(engines, "leave_group")
    assert _call(engines, "sleep", 2).level == 2
    assert engines.handles["a"].status().owner is None
    st = _call(engines, "wake_up")
    assert st.state == S.FENCED  # (level 2 discarded the weights: fenced, as before)
    _call(engines, "fence", "by hand")
    assert engines.handles["a"].status().fenced_reason == "by hand"


def test_a_sync_step_from_no_owner_while_a_sync_is_held_is_refused(local_fleet):
    """The steps of a sync check the same: a caller naming no owner cannot commit another's
    sync, and its abort changes nothing."""
    engines = local_fleet(sleep_mode=True)
    _hold(engines, "sync")
    before = _seen(engines)
    with pytest.raises(SyncInProgressError):
        _call(engines, "commit", 1, 5.0)
    with pytest.raises(SyncInProgressError):
        _call(engines, "finish_load", 5.0)
    st = _call(engines, "abort_sync", "not mine")
    assert st.state == S.PAUSED and st.owner == "owner-1"
    assert _seen(engines) == before
    st = _call(engines, "abort_sync", "mine", owner="owner-1")
    assert st.state == S.SERVING and st.owner is None
