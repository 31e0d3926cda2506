"""Where the rollout router may send a request (weightsync.routing.choice), decided from
statuses alone; and what it reads off a request (routing.router.read_ask)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from weightsync.routing.choice import Conflict, Route, Wait, choose
from weightsync.routing.router import RoutingError, read_ask
from weightsync.types import EngineState, EngineStatus

S = EngineState


def st(name: str, state: S = S.SERVING, version: int = 3, *, url: bool = True,
       owner: str | None = None, seen: int | None = None) -> EngineStatus:
    return EngineStatus(name=name, state=state, version=version, device="cpu",
                        sleep_supported=False, model="m", owner=owner,
                        version_seen=version if seen is None else seen,
                        openai_url=f"http://10.0.0.1:9{name[-1]}00" if url else None)


def engines(n: int = 4, **kw) -> list[EngineStatus]:
    return [st(f"e{i}", **kw) for i in range(n)]


def test_only_serving_engines_with_an_app_are_routed_to():
    fleet = [st("e0", S.FENCED), st("e1", S.LOADING, owner="c"), st("e2", S.PAUSED),
             st("e3", S.ASLEEP, owner="c"), st("e4", S.STOPPED), st("e5", url=False),
             st("e6", S.STARTING), st("e7")]
    for i in range(20):
        assert choose(fleet, turn=i) == Route("e7", "http://10.0.0.1:9700", 3)


def test_no_sync_in_progress_means_the_committed_version_only():
    fleet = [st("e0", version=4), st("e1", version=3), st("e2", version=4)]
    picks = {choose(fleet, turn=i).engine for i in range(10)}
    assert picks == {"e0", "e2"}  # e1 was left behind: never routed to


def test_during_a_rolling_sync_engines_outside_the_wave_serve_what_they_serve():
    # e0 already synced to 4, e1 in the current wave, e2 not yet: both e0 and e2 serve
    fleet = [st("e0", version=4), st("e1", S.LOADING, 3, owner="c", seen=4), st("e2", version=3)]
    assert {choose(fleet, turn=i).engine for i in range(10)} == {"e0", "e2"}
    assert {choose(fleet, turn=i, min_version=4).engine for i in range(10)} == {"e0"}


def test_a_bound_nothing_brings_is_a_conflict_one_a_sync_brings_waits():
    fleet = engines(2)
    assert isinstance(choose(fleet, min_version=4), Conflict)
    assert "serves 3" in choose(fleet, min_version=9).reason
    syncing = [st("e0", S.LOADING, 3, owner="c", seen=4), st("e1", S.PAUSED, 3, owner="c",
                                                            seen=4)]
    assert isinstance(choose(syncing, min_version=4), Wait)
    assert isinstance(choose(syncing, min_version=5), Conflict)
    assert choose(fleet, min_version=3).engine in {"e0", "e1"}


def test_nothing_serving_waits_with_the_states_named():
    out = choose([st("e0", S.LOADING, owner="c"), st("e1", S.FENCED)])
    assert isinstance(out, Wait) and "e0: loading" in out.reason and "e1: fenced" in out.reason
    assert "all fenced" in choose([st("e0", S.FENCED)]).reason


def test_a_session_sticks_to_one_engine_and_only_its_engine_leaving_moves_it():
    fleet = engines(4)
    home = {f"s{i}": choose(fleet, session=f"s{i}").engine for i in range(400)}
    assert all(choose(fleet, session=s, turn=7, in_flight=Counter(e0=99)).engine == e
               for s, e in home.items())  # load and turn do not move a session
    spread = Counter(home.values())
    assert len(spread) == 4 and min(spread.values()) > 60  # ~100 each
    gone = "e2"
    fenced = [st(s.name, S.FENCED) if s.name == gone else s for s in fleet]
    moved = {s: choose(fenced, session=s).engine for s in home}
    assert all(moved[s] == e for s, e in home.items() if e != gone)  # others stay put
    assert all(moved[s] != gone for s in home)
    assert {choose(fleet, session=s).engine for s in home} == set(home.values())  # back


def test_without_a_session_the_least_loaded_then_in_turn():
    fleet = engines(3)
    assert choose(fleet, in_flight=Counter(e0=2, e1=0, e2=1)).engine == "e1"
    assert [choose(fleet, turn=t).engine for t in range(6)] == ["e0", "e1", "e2"] * 2
    assert choose(fleet, skip=frozenset({"e0", "e1"})).engine == "e2"


class H(dict):
    def get(self, key, default=None):
        return super().get(key.lower(), default)

    def __contains__(self, key):
        return super().__contains__(key.lower())


def test_read_ask_takes_headers_first_then_the_body_and_strips_router_fields():
    body = json.dumps({"model": "m", "prompt": "hi", "user": "u1", "min_weight_version": 2,
                       "max_weight_staleness": 1}).encode()
    ask = read_ask(H(), body, 30.0)
    assert (ask.session, ask.min_version, ask.max_staleness, ask.wait_s) == ("u1", 2, 1, 30.0)
    assert json.loads(ask.body) == {"model": "m", "prompt": "hi", "user": "u1"}
    ask = read_ask(H({"x-session-id": "s", "x-min-weight-version": "5", "x-wait-s": "0.5"}),
                   body, 30.0)
    assert (ask.session, ask.min_version, ask.wait_s) == ("s", 5, 0.5)
    plain = json.dumps({"prompt": "x"}).encode()
    assert read_ask(H(), plain, 1.0).body is plain  # untouched: not re-serialized


@pytest.mark.parametrize("headers,body,words", [
    ({}, b"{not json", "not JSON"),
    ({"x-min-weight-version": "two"}, b"{}", "integer"),
    ({"x-min-weight-version": "-1"}, b"{}", "non-negative"),
    ({}, b'{"min_weight_version": true}', "non-negative"),
    ({"x-wait-s": "soon"}, b"{}", "seconds"),
    ({"x-wait-s": "1e9"}, b"{}", "X-Wait-S"),
    ({}, b'{"user": 5}', "user must be a string"),
])
def test_read_ask_refuses_bad_values_with_a_422(headers, body, words):
    with pytest.raises(RoutingError) as e:
        read_ask(H(headers), body, 30.0)
    assert e.value.status == 422 and words in e.value.message
