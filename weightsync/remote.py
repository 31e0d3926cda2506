"""How the coordinator reaches its engines: one seam of named calls, and its Ray transport.

``Engines`` is all the coordinator and the trainer-side transfer legs know of engines: one
named method per engine host call (``begin_sync``, ``receive``, ``commit``...), each starting
the call on one engine and returning a ``Pending`` reply of the call's own type; ``wait``
resolves several under one deadline into (typed replies, typed errors) and never hangs.
``each`` starts a call on every engine of a set and waits for all of them.

Below the named calls, a ``Transport`` carries a ``HostCall`` to an engine host and collects
its result: ``RayTransport`` over engine actors (and a host's local channel for the calls it
serves, ``weightsync.engine.channel``), ``weightsync.testing.fleet`` over in-process hosts, so
the real coordinator runs in protocol tests without Ray or vLLM. This module is the one place
that names host methods; a transport only carries what it is given.

An ``Engines`` made ``signed(owner)`` signs every step of a sync with the coordinator's id: an
engine refuses a step from a coordinator that no longer holds its sync (one that stalled past
its lease and came back after another took the engine over).

Ray wraps remote exceptions and has its own timeout type; this module turns both into the
library's error hierarchy.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import ray

from weightsync.adapters import AdapterState, AdapterSyncReply
from weightsync.engine.channel import SERVED, ChannelClient, OnChannel
from weightsync.errors import EngineDeadError, EngineError, EngineUnresponsive, WeightSyncError
from weightsync.messages import (
    ApplyReply,
    BeginReply,
    CommitReply,
    EngineWorkers,
    JoinReply,
    LayoutStatus,
    ReloadReply,
    SleepReply,
    TensorDigests,
)
from weightsync.types import CanaryReply, EngineStatus, FinishReply, PauseMode, ReceiveReport

logger = logging.getLogger(__name__)

T = TypeVar("T")
#: (replies, typed errors) by engine: what every wait on several engines answers
Replies = tuple[dict[str, T], dict[str, WeightSyncError]]


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


@dataclass(frozen=True)
class HostCall:
    """One call of an engine host's method (``weightsync.engine.host.EngineHost``), as a
    transport carries it. Made only by ``Engines``."""

    method: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Pending(Generic[T]):
    """A call started on one engine; ``Engines.wait`` resolves it into a ``T``. ``handle`` is
    the transport's (a Ray ref, a channel call, a future); ``parse`` turns what the host
    returned into the reply (``receive`` answers JSON: parsed here, once)."""

    handle: Any
    parse: Callable[[Any], T] | None = None


class Transport(Protocol):
    """Carries host calls to engines by name. ``start`` never blocks on the engine;
    ``resolve`` waits for several under one deadline and never raises, never hangs: an engine
    that does not answer in time gets ``EngineUnresponsive``, one whose host died
    ``EngineDeadError``, one that answered with an error keeps that error's type."""

    @property
    def handles(self) -> dict[str, Any]:
        """Engine name -> handle (a Ray actor handle, or an in-process host)."""

    def start(self, name: str, call: HostCall) -> Any: ...

    def resolve(self, started: Mapping[str, Any], timeout: float) -> Replies[Any]: ...

    def replace(self, name: str, handle: Any) -> None:
        """Swap in a restarted engine's handle."""


class Engines:
    """The engine hosts' calls by name, over a ``Transport``; signed with ``owner`` when set
    (``signed``). Each method starts its call on engine ``name`` and returns at once."""

    def __init__(self, inner: Transport, owner: str | None = None) -> None:
        self.inner, self.owner = inner, owner

    def signed(self, owner: str) -> Engines:
        """The same engines, every step of a sync signed with ``owner``."""
        return Engines(self.inner, owner)

    @property
    def handles(self) -> dict[str, Any]:
        return self.inner.handles

    def replace(self, name: str, handle: Any) -> None:
        self.inner.replace(name, handle)

    # ---- waiting ---------------------------------------------------------------------------
    def wait(self, pending: Mapping[str, Pending[T]], timeout: float) -> Replies[T]:
        """(replies, typed errors) by engine, within ``timeout``; never raises, never hangs."""
        raw, bad = self.inner.resolve({n: p.handle for n, p in pending.items()}, timeout)
        ok: dict[str, T] = {}
        for n, value in raw.items():
            parse = pending[n].parse
            try:
                ok[n] = parse(value) if parse is not None else value
            except ValueError as e:
                bad[n] = EngineError(f"a malformed reply: {e}", engine=n)
        return ok, bad

    def each(self, names: Iterable[str], call: Callable[[str], Pending[T]],
             timeout: float) -> Replies[T]:
        """``call(name)`` started on every engine of ``names`` at once, then waited for
        under one deadline."""
        return self.wait({n: call(n) for n in names}, timeout)

    # ---- the calls ---------------------------------------------------------------------------
    def _start(self, name: str, method: str, *args: Any, signed: bool = False,
               parse: Callable[[Any], T] | None = None, **kwargs: Any) -> Pending[T]:
        if signed and self.owner is not None:
            kwargs["owner"] = self.owner
        return Pending(self.inner.start(name, HostCall(method, args, kwargs)), parse)

    def status(self, name: str) -> Pending[EngineStatus]:
        return self._start(name, "status")

    def engine_workers(self, name: str) -> Pending[EngineWorkers]:
        return self._start(name, "engine_workers")

    def kernel_layout(self, name: str) -> Pending[LayoutStatus]:
        return self._start(name, "kernel_layout")

    def tensor_digests(self, name: str) -> Pending[TensorDigests]:
        """Every tensor the engine's kernels read, with its checksum (``engine.kernel_reads``)."""
        return self._start(name, "tensor_digests")

    def validate(self, name: str, plan: str) -> Pending[None]:
        """Check ``plan`` (a ``plan_wire.PlanMessage``) against the engine's model."""
        return self._start(name, "validate", plan)

    def validate_checkpoint(self, name: str, path: str | None, *, partial: bool,
                            roots: Sequence[str] | None, deadline_s: float) -> Pending[str]:
        """The identity of the files the engine checked (``CheckedFiles``)."""
        return self._start(name, "validate_checkpoint", path, partial=partial, roots=roots,
                           deadline_s=deadline_s)

    def begin_sync(self, name: str, *, pause_mode: PauseMode, sleep_level: int,
                   deadline_s: float, lease_s: float, takeover: bool,
                   version: int) -> Pending[BeginReply]:
        return self._start(name, "begin_sync", signed=True, pause_mode=pause_mode,
                           sleep_level=sleep_level, deadline_s=deadline_s, lease_s=lease_s,
                           takeover=takeover, version=version)

    def join_group(self, name: str, backend: str, host: str, port: int, rank_offset: int,
                   world_size: int, timeout_s: float, group_id: str = "") -> Pending[JoinReply]:
        return self._start(name, "join_group", backend, host, port, rank_offset, world_size,
                           timeout_s, group_id, signed=True)

    def receive(self, name: str, plan: str, request_json: str) -> Pending[ReceiveReport]:
        """The one call inside every sync's transfer: strings in (a ``plan_wire.PlanMessage``:
        the plan's version, its body whole or by key; a ``ReceiveRequest``), the host's
        ``ReceiveReport`` JSON out, parsed on ``wait``."""
        return self._start(name, "receive", plan, request_json, signed=True,
                           parse=ReceiveReport.model_validate_json)

    def apply_staged(self, name: str, deadline_s: float) -> Pending[ApplyReply]:
        return self._start(name, "apply_staged", deadline_s, signed=True)

    def reload_from_path(self, name: str, path: str | None, deadline_s: float, *,
                         partial: bool, roots: Sequence[str] | None, check_finite: bool,
                         identity: str) -> Pending[ReloadReply]:
        return self._start(name, "reload_from_path", path, deadline_s, signed=True,
                           partial=partial, roots=roots, check_finite=check_finite,
                           identity=identity)

    def finish_load(self, name: str, deadline_s: float) -> Pending[FinishReply]:
        return self._start(name, "finish_load", deadline_s, signed=True)

    def run_canary(self, name: str, canary_json: str, deadline_s: float
                   ) -> Pending[CanaryReply]:
        return self._start(name, "run_canary", canary_json, deadline_s, signed=True)

    def commit(self, name: str, version: int, deadline_s: float) -> Pending[CommitReply]:
        return self._start(name, "commit", version, deadline_s, signed=True)

    def abort_sync(self, name: str, reason: str, deadline_s: float, *,
                   fence: bool = False) -> Pending[EngineStatus]:
        return self._start(name, "abort_sync", reason, deadline_s, signed=True, fence=fence)

    def fence(self, name: str, reason: str) -> Pending[None]:
        return self._start(name, "fence", reason, signed=True)  # refused from a non-holder

    def sleep(self, name: str, level: int, mode: PauseMode, *, lease_s: float,
              deadline_s: float) -> Pending[SleepReply]:
        return self._start(name, "sleep", level, mode, signed=True, lease_s=lease_s,
                           deadline_s=deadline_s)

    def wake_up(self, name: str, tags: list[str] | None, *,
                deadline_s: float) -> Pending[EngineStatus]:
        return self._start(name, "wake_up", tags, signed=True, deadline_s=deadline_s)

    def serve_openai(self, name: str, token: str, *, host: str | None = None
                     ) -> Pending[str]:
        """Serve vLLM's OpenAI API on the engine (bearer ``token``; ``host``: the address to
        bind, default its node's IP); the reply is its base URL. Refused by an in-process
        stand-in engine (``UnsupportedError``): the app needs a real ``AsyncLLM``."""
        return self._start(name, "serve_openai", token, signed=True, host=host)

    def adapter_state(self, name: str, deadline_s: float) -> Pending[AdapterState]:
        return self._start(name, "adapter_state", signed=True, deadline_s=deadline_s)

    def stage_adapter(self, name: str, manifest_json: str, buf: Any, version: int,
                      deadline_s: float, chain_chunk: int = 0,
                      ipc: str | None = None) -> Pending[AdapterSyncReply]:
        """``buf`` None: the bytes come over the transfer group or, ``ipc``, over CUDA IPC
        (``EngineHost.stage_adapter``)."""
        return self._start(name, "stage_adapter", manifest_json, buf, version, signed=True,
                           deadline_s=deadline_s, chain_chunk=chain_chunk, ipc=ipc)

    def commit_adapter(self, name: str, adapter: str, version: int, deadline_s: float,
                       settle_s: float | None = None,
                       peers: Sequence[str] = ()) -> Pending[AdapterSyncReply]:
        return self._start(name, "commit_adapter", adapter, version, signed=True,
                           deadline_s=deadline_s, settle_s=settle_s, peers=tuple(peers))

    def settle_adapter(self, name: str, adapter: str, version: int) -> Pending[bool]:
        return self._start(name, "settle_adapter", adapter, version)

    def abort_adapter(self, name: str, adapter: str, version: int,
                      deadline_s: float) -> Pending[bool]:
        return self._start(name, "abort_adapter", adapter, version, deadline_s=deadline_s)

    def renew_lease(self, name: str, lease_s: float) -> Pending[bool]:
        """The owner's heartbeat: False when the engine's sync is no longer its own."""
        return self._start(name, "renew_lease", self.owner or "", lease_s)


# ---- over Ray --------------------------------------------------------------------------------
def gather(refs: Mapping[str, Any], timeout: float) -> Replies[Any]:
    """Wait for one Ray ref (or channel call) per engine: ``Transport.resolve`` over Ray."""
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


class RayTransport:
    """A ``Transport`` over Ray engine actors (``weightsync.engine.actor``). The calls a host
    also serves on its local channel (``receive``: one per sync) go that way when this
    process runs on the host's machine (``weightsync.engine.channel``), else through Ray."""

    def __init__(self, actors: Mapping[str, Any]) -> None:
        self._actors = dict(actors)
        self._channels: dict[str, ChannelClient | None] = {}  # None: through Ray

    @property
    def handles(self) -> dict[str, Any]:
        return dict(self._actors)

    def start(self, name: str, call: HostCall) -> Any:
        channel = self._channel(name) if call.method in SERVED else None
        if channel is not None and set(call.kwargs) <= {"owner"}:
            try:
                channel.send(call.method, call.args, call.kwargs.get("owner"))
                return OnChannel(channel)
            except OSError as e:  # nothing was sent: Ray carries this call and the next
                logger.info("engine %s: its channel failed (%s); calls go through Ray", name, e)
                self._channels[name] = None
        return getattr(self._actors[name], call.method).remote(*call.args, **call.kwargs)

    def _channel(self, name: str) -> ChannelClient | None:
        """The host's channel when its socket is on this machine (asked once per host)."""
        if name not in self._channels:
            try:
                here = ray.get_runtime_context().get_node_id()
                path = ray.get(self._actors[name].local_channel.remote(here), timeout=5)
            except Exception:  # noqa: BLE001 - an older host, or a dead one: Ray says which
                path = None
            self._channels[name] = ChannelClient(path, name) \
                if path is not None and os.path.exists(path) else None
        return self._channels[name]

    def resolve(self, started: Mapping[str, Any], timeout: float) -> Replies[Any]:
        return gather(started, timeout)

    def channel_calls(self) -> dict[str, int | None]:
        """Calls each host answered over its channel so far (None: its calls go by Ray)."""
        return {n: c.calls if c is not None else None for n, c in self._channels.items()}

    def replace(self, name: str, handle: Any) -> None:
        self._actors[name] = handle
        old = self._channels.pop(name, None)
        if old is not None:
            old.close()


class RayEngines(Engines):
    """``Engines`` over Ray engine actors."""

    inner: RayTransport

    def __init__(self, actors: Mapping[str, Any]) -> None:
        super().__init__(RayTransport(actors))

    @classmethod
    def connect(cls, actors: Sequence[Any], timeout: float
                ) -> tuple[RayEngines, list[EngineStatus]]:
        """Name the actors by asking each for its status; returns them and the statuses."""
        statuses = ray.get([a.status.remote() for a in actors], timeout=timeout)
        return cls({s.name: a for s, a in zip(statuses, actors, strict=True)}), statuses
