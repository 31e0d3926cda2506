"""``RolloutRouter``: one OpenAI-compatible base URL for the whole fleet.

A request comes in (the control plane's ``/v1`` routes, behind its token and body limit), the
router reads what it needs from it (the session key, a version bound, how long it may wait),
picks an engine (``routing.choice``), forwards it to that engine's own vLLM OpenAI app with
the engines' token, and streams the answer back unchanged (``routing.proxy``). The engine
stamps the weight version (``X-Weight-Version``, body fields); the router adds ``X-Engine``.

What the router owns, and nobody else:

- the engines' token: random, made here, given to each engine (``serve_openai``), never the
  control plane's own token; an engine restarted since (or given a token by another router)
  answers 401 and is given it again;
- the requests in flight per engine (least-loaded choice);
- the waiting: with no engine to take a request, it waits for the fleet (a sync in progress,
  an engine coming back) up to its bound (``X-Wait-S``, default ``wait_s``), then answers 503
  with ``Retry-After``. An engine that refuses a request (503: it began a sync or was fenced
  since the router last saw it, or its own wait ran out) is skipped and another is tried.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from weightsync.routing.choice import Conflict, Route, Wait, choose
from weightsync.types import EngineState, EngineStatus

logger = logging.getLogger(__name__)

WAIT_S = 30.0  # how long a request waits for an engine by default (X-Wait-S overrides)
MAX_WAIT_S = 600.0
POLL_S = 0.05  # how often a waiting request looks at the fleet again
# vLLM's own keep-alive is 5 s (VLLM_HTTP_TIMEOUT_KEEP_ALIVE): idle connections are dropped
# here first, so the router never sends on a connection the engine is closing
KEEPALIVE_S = 3.0


class RoutingError(Exception):
    """A request the router answers itself: ``status`` and a JSON error body."""

    def __init__(self, status: int, code: str, message: str, *, engine: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.engine, self.retry_after = engine, retry_after


@dataclass(frozen=True)
class Ask:
    """What the router reads from one request (``read_ask``)."""

    session: str | None
    min_version: int | None
    max_staleness: int | None
    wait_s: float
    body: bytes  # what is forwarded: the request's, less the router's own fields


ROUTER_FIELDS = ("min_weight_version", "max_weight_staleness")


def _int_or_none(value: Any, what: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise RoutingError(422, "bad_request",
                           f"{what} must be an integer, not {value!r}") from None
    if out < 0 or isinstance(value, bool):
        raise RoutingError(422, "bad_request", f"{what} must be a non-negative integer")
    return out


def read_ask(headers: Any, body: bytes, default_wait_s: float) -> Ask:
    """The session key (``X-Session-ID``, else the body's ``user``), the version bound
    (``X-Min-Weight-Version`` / ``min_weight_version``, or a staleness bound
    ``X-Max-Weight-Staleness`` / ``max_weight_staleness`` against the committed version) and
    the wait (``X-Wait-S``). The router's own body fields are removed before forwarding (vLLM
    would log every unknown field)."""
    doc: Any = None
    if body:
        try:
            doc = json.loads(body)
        except ValueError:
            raise RoutingError(422, "bad_request", "the request body is not JSON") from None
    fields = doc if isinstance(doc, dict) else {}
    session = headers.get("x-session-id") or fields.get("user") or None
    if session is not None and not isinstance(session, str):
        raise RoutingError(422, "bad_request", "user must be a string")
    min_version = _int_or_none(headers.get("x-min-weight-version",
                                           fields.get("min_weight_version")),
                               "min_weight_version")
    staleness = _int_or_none(headers.get("x-max-weight-staleness",
                                          fields.get("max_weight_staleness")),
                             "max_weight_staleness")
    raw_wait = headers.get("x-wait-s")
    try:
        wait_s = default_wait_s if raw_wait is None else float(raw_wait)
    except ValueError:
        raise RoutingError(422, "bad_request",
                           f"X-Wait-S must be seconds, not {raw_wait!r}") from None
    if not 0 <= wait_s <= MAX_WAIT_S:
        raise RoutingError(422, "bad_request", f"X-Wait-S must be 0..{MAX_WAIT_S:g}")
    if any(k in fields for k in ROUTER_FIELDS):
        body = json.dumps({k: v for k, v in fields.items() if k not in ROUTER_FIELDS}).encode()
    return Ask(session=session, min_version=min_version, max_staleness=staleness,
               wait_s=wait_s, body=body)


class RolloutRouter:
    """Routes rollout requests over the engines whose statuses ``statuses`` gives (the
    control plane's fleet view), serving each engine's app through ``serve_openai``."""

    def __init__(self, statuses: Callable[[], Awaitable[Sequence[EngineStatus]]],
                 refresh: Callable[[], Awaitable[Sequence[EngineStatus]]],
                 serve_openai: Callable[[str, str], Awaitable[str]], *,
                 wait_s: float = WAIT_S, read_timeout_s: float = 600.0) -> None:
        self._statuses, self._refresh_all, self._serve = statuses, refresh, serve_openai
        self.wait_s = wait_s
        self.token = secrets.token_urlsafe(32)  # the engines' token: this router's alone
        self.in_flight: Counter[str] = Counter()
        self._turn = 0
        self._refreshing: asyncio.Task[Sequence[EngineStatus]] | None = None
        self._serving: dict[str, asyncio.Task[str]] = {}
        self._failed: dict[str, str] = {}  # engine -> why its app could not be started
        # aiohttp, not httpx: one proxied request cost 0.5 ms less of the router's CPU
        # (a loopback round trip to a trivial server on the 2-core box: 0.15 vs 0.65 ms).
        # Bytes pass through as the engine sent them (no decompression, no added headers).
        self.client = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, connect=10.0, sock_read=read_timeout_s),
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_S),
            auto_decompress=False, skip_auto_headers=("User-Agent", "Accept-Encoding"))

    async def close(self) -> None:
        for t in self._serving.values():
            t.cancel()
        await self.client.close()

    # ---- the engines' apps -------------------------------------------------------------
    async def adopt(self, statuses: Sequence[EngineStatus], *, again: frozenset[str] = frozenset()
                    ) -> None:
        """Give this router's token to every live engine whose app is not up (a new or
        restarted engine), and to those in ``again`` (they answered 401)."""
        want = [s.name for s in statuses
                if s.state not in (EngineState.STARTING, EngineState.STOPPED)
                and (s.openai_url is None or s.name in again)]
        for name in want:
            task = self._serving.get(name)
            if task is None or task.done():
                self._serving[name] = asyncio.ensure_future(self._serve(name, self.token))
        tasks = [self._serving[n] for n in want]
        for name, out in zip(want, await asyncio.gather(*tasks, return_exceptions=True),
                             strict=True):
            if isinstance(out, BaseException):
                said = str(out)
                if self._failed.get(name) != said:  # once per engine and reason, not per round
                    logger.warning("engine %s: its OpenAI app could not be started: %s",
                                   name, said)
                self._failed[name] = said
            else:
                self._failed.pop(name, None)

    async def keep_adopting(self, statuses: Callable[[], Awaitable[Sequence[EngineStatus]]],
                            period_s: float = 1.0) -> None:
        """``adopt`` what ``statuses`` shows, every ``period_s``, forever (a restarted engine
        comes back without its app; the app's lifespan runs this as a task)."""
        while True:
            try:
                await self.adopt(await statuses())
            except Exception:  # logged; the next round tries again
                logger.exception("giving engines their OpenAI apps failed")
            await asyncio.sleep(period_s)

    async def fresh(self) -> Sequence[EngineStatus]:
        """The fleet asked now: one question at a time however many requests wait."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._refresh_all())
        return await asyncio.shield(self._refreshing)

    # ---- one request -------------------------------------------------------------------
    async def pick(self, ask: Ask, deadline: float, skip: frozenset[str]) -> Route:
        """An engine for ``ask``, waiting for one until ``deadline``; ``RoutingError`` 409
        for a bound that cannot be met, 503 when the wait runs out."""
        statuses = await self._statuses()
        asked = False  # whether the fleet was asked during this request (the view may lag)
        while True:
            min_version = ask.min_version
            if ask.max_staleness is not None:
                committed = max((s.version for s in statuses
                                 if s.state == EngineState.SERVING), default=0)
                min_version = max(min_version or 0, committed - ask.max_staleness)
            choice = choose(statuses, session=ask.session, min_version=min_version,
                            in_flight=self.in_flight, turn=self._turn, skip=skip)
            if isinstance(choice, Route):
                self._turn += 1
                return choice
            if isinstance(choice, Conflict):
                if not asked:  # a sync may have committed since the view was filled
                    statuses, asked = await self.fresh(), True
                    continue
                raise RoutingError(409, "version_unavailable", choice.reason)
            assert isinstance(choice, Wait)
            if any(s.openai_url is None and s.state == EngineState.SERVING for s in statuses):
                await self.adopt(statuses)
            left = deadline - time.monotonic()
            if left <= 0:
                raise RoutingError(503, "no_engine", f"no engine could take the request "
                                   f"within {ask.wait_s:g}s: {choice.reason}",
                                   retry_after=max(1.0, min(ask.wait_s, 5.0)))
            await asyncio.sleep(min(POLL_S, left))
            skip = frozenset()  # a refusal was about then; the fleet is asked again now
            statuses, asked = await self.fresh(), True

    def upstream_headers(self, headers: Any, left_s: float, min_version: int | None
                         ) -> dict[str, str]:
        out = {"authorization": f"Bearer {self.token}",
               "x-wait-s": f"{max(0.0, left_s):.3f}"}
        for k in ("content-type", "accept", "x-request-id"):
            if k in headers:
                out[k] = headers[k]
        if min_version is not None:
            out["x-min-weight-version"] = str(min_version)
        return out
