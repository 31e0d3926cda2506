"""Where a rollout request may go, decided from the engines' statuses alone.

The rules, one place:

- An engine is a candidate only while it is ``serving`` with its OpenAI app up: never fenced,
  loading, paused, asleep, starting or stopped.
- With no sync in progress anywhere in the fleet, only engines at the *committed* version (the
  highest any serving engine serves) are candidates: an engine left behind at an older version
  is not routed to. While a sync holds some engines (a rolling sync's current wave, or a
  colocated trainer's sleep), the engines outside it keep serving what they serve.
- A request's bound (``min_version``) keeps only engines at that version or newer. A bound no
  engine serves and no sync in progress is bringing is a ``Conflict`` (409): the request is
  never served by older weights. Otherwise, with no candidate, the request waits (``Wait``).
- A session key picks the same engine for as long as that engine is a candidate: rendezvous
  (highest-random-weight) hashing over the candidates, so an engine leaving moves only its own
  sessions, and they come back when it does. Without a key: the candidate with the fewest
  requests in flight through this router, ties taken in turn.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from weightsync.types import IN_SYNC, EngineState, EngineStatus


@dataclass(frozen=True)
class Route:
    """Send the request to this engine."""

    engine: str
    url: str
    version: int


@dataclass(frozen=True)
class Wait:
    """No engine can take it now; one may soon (a sync in progress, an engine coming back)."""

    reason: str


@dataclass(frozen=True)
class Conflict:
    """The request's version bound cannot be met: 409."""

    reason: str


Choice = Route | Wait | Conflict


def session_rank(session: str, engine: str) -> int:
    """The rendezvous weight of ``engine`` for ``session``: the session goes to the highest."""
    digest = hashlib.blake2b(f"{session}\x00{engine}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def syncing(statuses: Sequence[EngineStatus]) -> bool:
    """Whether a sync (or a trainer's sleep) holds some engine now."""
    return any(s.state in IN_SYNC and s.owner for s in statuses)


def candidates(statuses: Sequence[EngineStatus], min_version: int | None = None,
               skip: frozenset[str] = frozenset()) -> list[EngineStatus]:
    """The engines a request (with its bound) may go to now."""
    serving = [s for s in statuses
               if s.state == EngineState.SERVING and s.openai_url and s.name not in skip]
    if serving and not syncing(statuses):
        committed = max(s.version for s in serving)
        serving = [s for s in serving if s.version == committed]
    if min_version is not None:
        serving = [s for s in serving if s.version >= min_version]
    return serving


def choose(statuses: Sequence[EngineStatus], *, session: str | None = None,
           min_version: int | None = None, in_flight: Mapping[str, int] | None = None,
           turn: int = 0, skip: frozenset[str] = frozenset()) -> Choice:
    """Where the request goes now (``Route``), or why it cannot (``Wait``, ``Conflict``).
    ``skip``: engines that just refused it (they are tried again on the next request)."""
    found = candidates(statuses, min_version, skip)
    if found:
        if session:
            pick = max(found, key=lambda s: session_rank(session, s.name))
        else:
            loads = in_flight or {}
            n = len(found)
            pick = min(enumerate(found),
                       key=lambda e: (loads.get(e[1].name, 0), (e[0] - turn) % n))[1]
        assert pick.openai_url is not None
        return Route(engine=pick.name, url=pick.openai_url, version=pick.version)
    live = [s for s in statuses if s.state not in (EngineState.FENCED, EngineState.STOPPED)]
    if min_version is not None:
        coming = max([s.version for s in live if s.state == EngineState.SERVING]
                     + [s.version_seen for s in live if s.state in IN_SYNC and s.owner],
                     default=0)
        if min_version > coming:
            served = max((s.version for s in live), default=0)
            return Conflict(f"no engine serves weight version {min_version} or newer, and no "
                            f"sync in progress brings it (the fleet serves {served})")
    if not live:
        return Wait("no engine is live (all fenced or stopped)")
    states = ", ".join(f"{s.name}: {s.state.value}" for s in statuses)
    return Wait(f"no engine serves now ({states})")
