"""How the coordinator reaches its engines: one small protocol, and its Ray implementation.

``Engines`` is all the coordinator and the trainer-side transfer legs know of engines: submit a
call to a named engine, wait for several under one deadline. ``RayEngines`` does it over engine
actors; ``weightsync.testing.fleet.LocalEngines`` over in-process hosts, so the real coordinator
runs in protocol tests without Ray or vLLM.

Ray wraps remote exceptions and has its own timeout type; this module turns both into the
library's error hierarchy, and waits for many calls at once without ever hanging.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import ray

from weightsync.engine.channel import SERVED, ChannelClient, OnChannel
from weightsync.errors import EngineDeadError, EngineError, EngineUnresponsive, WeightSyncError

logger = logging.getLogger(__name__)


def unwrap(e: BaseException) -> WeightSyncError:
    """Surface our typed error from a Ray-wrapped one (or a typed stand-in)."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, WeightSyncError):
        return cause
    if isinstance(e, WeightSyncError):
        return e
    if isinstance(e, ray.exceptions.RayActorError):
        return EngineDeadError(f"engine actor died or unreachable: {type(e).__name__}")
    text = str(cause or e)
    return EngineError(f"{type(e).__name__}: {text.splitlines()[-1] if text else ''}")


def gather(refs: dict[str, Any], timeout: float) -> tuple[dict[str, Any], dict[str, WeightSyncError]]:
    """Wait for one ref per engine; returns (results, errors) — never raises, never hangs.

    An engine that does not answer in time gets ``EngineUnresponsive``; one whose actor died,
    ``EngineDeadError``; one that answered with an error keeps that error's type.
    """
    ok: dict[str, Any] = {}
    bad: dict[str, WeightSyncError] = {}
    end = time.monotonic() + timeout
    for name, ref in refs.items():
        try:
            if isinstance(ref, OnChannel):  # sent over the host's local channel
                ok[name] = ref.result(max(0.0, end - time.monotonic()))
                continue
            ok[name] = ray.get(ref, timeout=max(0.0, end - time.monotonic()))
        except ray.exceptions.GetTimeoutError:
            bad[name] = EngineUnresponsive(f"no answer within {timeout:.1f}s", engine=name)
        except Exception as e:  # noqa: BLE001 - classified by unwrap
            err = unwrap(e)
            err.engine = err.engine or name
            bad[name] = err
    return ok, bad


class Engines(Protocol):
    """The coordinator's only way to reach engines."""

    @property
    def handles(self) -> dict[str, Any]:
        """Engine name -> handle (a Ray actor handle, or an in-process host)."""

    def submit(self, name: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """Start ``method(*args, **kwargs)`` on engine ``name``; returns something ``wait``
        takes."""

    def wait(self, pending: Mapping[str, Any], timeout: float
             ) -> tuple[dict[str, Any], dict[str, WeightSyncError]]:
        """(results, typed errors) by engine, within ``timeout``; never raises, never hangs."""

    def replace(self, name: str, handle: Any) -> None:
        """Swap in a restarted engine's handle."""


class RayEngines:
    """``Engines`` over Ray engine actors (``weightsync.engine.actor``). The calls a host
    also serves on its local channel (``receive``: one per sync) go that way when this
    process runs on the host's machine (``weightsync.engine.channel``), else through Ray."""

    def __init__(self, actors: Mapping[str, Any]) -> None:
        self._actors = dict(actors)
        self._channels: dict[str, ChannelClient | None] = {}  # None: through Ray

    @classmethod
    def connect(cls, actors: Sequence[Any], timeout: float) -> tuple[RayEngines, list]:
        """Name the actors by asking each for its status; returns them and the statuses."""
        statuses = ray.get([a.status.remote() for a in actors], timeout=timeout)
        return cls({s.name: a for s, a in zip(statuses, actors, strict=True)}), statuses

    @property
    def handles(self) -> dict[str, Any]:
        return dict(self._actors)

    def submit(self, name: str, method: str, *args: Any, **kwargs: Any) -> Any:
        channel = self._channel(name) if method in SERVED else None
        if channel is not None and set(kwargs) <= {"owner"}:
            try:
                channel.send(method, args, kwargs.get("owner"))
                return OnChannel(channel)
            except OSError as e:  # nothing was sent: Ray carries this call and the next
                logger.info("engine %s: its channel failed (%s); calls go through Ray", name, e)
                self._channels[name] = None
        return getattr(self._actors[name], method).remote(*args, **kwargs)

    def _channel(self, name: str) -> ChannelClient | None:
        """The host's channel when its socket is on this machine (asked once per host)."""
        if name not in self._channels:
            try:
                path = ray.get(self._actors[name].local_channel.remote(), timeout=5)
            except Exception:  # noqa: BLE001 - an older host, or a dead one: Ray says which
                path = None
            self._channels[name] = ChannelClient(path, name) \
                if path is not None and os.path.exists(path) else None
        return self._channels[name]

    def wait(self, pending: Mapping[str, Any], timeout: float
             ) -> tuple[dict[str, Any], dict[str, WeightSyncError]]:
        return gather(dict(pending), timeout)

    def channel_calls(self) -> dict[str, int | None]:
        """Calls each host answered over its channel so far (None: its calls go by Ray)."""
        return {n: c.calls if c is not None else None for n, c in self._channels.items()}

    def replace(self, name: str, handle: Any) -> None:
        self._actors[name] = handle
        old = self._channels.pop(name, None)
        if old is not None:
            old.close()


class OwnedEngines:
    """``Engines`` that sign every step of a sync with the coordinator's ``owner`` id: an engine
    refuses a step from a coordinator that no longer holds its sync (one that stalled past its
    lease and came back after another took the engine over)."""

    SIGNED = frozenset({"join_group", "receive", "apply_staged", "reload_from_path",
                        "finish_load", "run_canary", "commit", "abort_sync", "wake_up"})

    def __init__(self, inner: Engines, owner: str) -> None:
        self.inner, self.owner = inner, owner

    @property
    def handles(self) -> dict[str, Any]:
        return self.inner.handles

    def submit(self, name: str, method: str, *args: Any, **kwargs: Any) -> Any:
        if method in self.SIGNED:
            kwargs.setdefault("owner", self.owner)
        return self.inner.submit(name, method, *args, **kwargs)

    def wait(self, pending: Mapping[str, Any], timeout: float
             ) -> tuple[dict[str, Any], dict[str, WeightSyncError]]:
        return self.inner.wait(pending, timeout)

    def replace(self, name: str, handle: Any) -> None:
        self.inner.replace(name, handle)
