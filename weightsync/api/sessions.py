"""Sync sessions for trainers outside the Ray cluster: open -> trainer broadcasts -> commit.

``POST /sessions`` claims the fleet and starts ``SyncCoordinator.sync_external`` in a thread
with an ``ExternalSession`` as its sender. Once the engines are validated, paused and dialling
the trainer's address, the request returns the plan (bucket layout), backend, address and
ranks. The trainer hosts the group as rank 0, broadcasts, and commits its checksums; the
commit answers with the ``SyncResult``. A trainer that never commits is timed out by the
coordinator's transfer deadline, and the fleet rolls back: a session can never hold it forever.
An abort before the trainer hosted the group ends the session at once (the external leg stops
waiting for the engines' joins, and the engines cancel theirs).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import threading
import time
from collections.abc import Sequence

from weightsync.api.errors import UnknownSessionError
from weightsync.api.fleet import SYNCABLE, Fleet
from weightsync.api.schemas import SessionInfo, SessionRequest
from weightsync.errors import (
    ConfigError,
    DeadlineExceeded,
    EngineError,
    IllegalStateError,
    SyncFailedError,
    TransferError,
    WeightSyncError,
)
from weightsync.transport.broadcast import free_port
from weightsync.types import SyncResult, TransferPlan

logger = logging.getLogger(__name__)

KEEP_FINISHED_S = 600.0  # a finished session still answers its trainer's commit/abort this long


class ExternalSession:
    """One externally driven sync: the coordinator's ``ExternalSender`` and its thread."""

    def __init__(self, sid: str, host: str, port: int, engines: list[str]) -> None:
        self.id = sid
        self.address = (host, port)
        self.engines = engines
        self.plan: TransferPlan | None = None
        self.world_size = 0
        self.result: SyncResult | None = None
        self.error: WeightSyncError | None = None
        self.finished_at: float | None = None
        self._opened = threading.Event()  # ready() was called, or the sync ended before it
        self._sent = threading.Event()  # the trainer committed or aborted
        self._aborted = threading.Event()  # the trainer aborted (ends the wait for joins)
        self._done = threading.Event()
        self._sums: list[int] = []
        self._abort: str | None = None

    # ---- ExternalSender (called by the coordinator's thread) ---------------------------------
    def ready(self, plan: TransferPlan, world_size: int) -> None:
        self.plan, self.world_size = plan, world_size
        self._opened.set()

    def wait_aborted(self, timeout: float) -> str | None:
        return self._abort if self._aborted.wait(timeout) else None

    def wait_checksums(self, timeout: float) -> list[int]:
        if not self._sent.wait(timeout):
            raise DeadlineExceeded(f"the trainer did not commit within {timeout:.0f}s")
        if self._abort is not None:
            raise TransferError(f"the trainer aborted: {self._abort}")
        return self._sums

    # ---- the trainer's side (HTTP) -----------------------------------------------------------
    def commit(self, checksums: Sequence[int]) -> None:
        if self._sent.is_set():
            raise IllegalStateError(f"session {self.id} was already committed or aborted")
        self._sums = list(checksums)
        self._sent.set()

    def abort(self, reason: str) -> None:
        if not self._sent.is_set():
            self._abort = reason
            self._sent.set()
            self._aborted.set()

    def wait_opened(self, timeout: float) -> bool:
        return self._opened.wait(timeout)

    def wait_done(self, timeout: float) -> bool:
        return self._done.wait(timeout)

    def run(self, fleet: Fleet, request: SessionRequest) -> None:
        """Thread body: run the sync, record it, free the fleet."""
        try:
            self.result = fleet.coordinator.sync_external(
                request.tensors, self, pause_mode=request.pause_mode,
                sleep_level=request.sleep_level, engines=self.engines,
                partial=request.partial)
            fleet.record(self.result)
        except SyncFailedError as e:
            self.error = e
            if e.result is not None:
                fleet.record(e.result)
        except WeightSyncError as e:
            self.error = e
        except Exception as e:
            logger.exception("session %s: unexpected failure", self.id)
            self.error = EngineError(f"{type(e).__name__}: {e}")
        finally:
            self.finished_at = time.monotonic()
            fleet.release()
            self._done.set()
            self._opened.set()
            logger.info("session %s finished: %s", self.id,
                        "ok" if self.error is None else self.error)

    def outcome(self) -> SyncResult:
        if self.error is not None:
            raise self.error
        assert self.result is not None  # _done implies one of the two
        return self.result


class SessionRegistry:
    """Live sessions by id (at most one at a time: each one claims the fleet)."""

    def __init__(self) -> None:
        self._sessions: dict[str, ExternalSession] = {}

    def get(self, sid: str) -> ExternalSession:
        self._purge()
        try:
            return self._sessions[sid]
        except KeyError:
            raise UnknownSessionError(
                f"no session {sid!r} (unknown, or finished and closed)") from None

    def _purge(self) -> None:
        now = time.monotonic()
        for sid, s in list(self._sessions.items()):
            if s.finished_at is not None and now - s.finished_at > KEEP_FINISHED_S:
                del self._sessions[sid]

    async def open(self, fleet: Fleet, request: SessionRequest) -> SessionInfo:
        self._purge()
        targets = fleet.resolve(request.engines)
        port = request.port or _service_port(request.host)
        fleet.claim()
        try:
            await fleet.require_states(targets, SYNCABLE, "open a sync session")
        except BaseException:
            fleet.release()
            raise
        session = ExternalSession(secrets.token_hex(8), request.host, port, targets)
        self._sessions[session.id] = session
        threading.Thread(target=session.run, args=(fleet, request), daemon=True,
                         name=f"ws-session-{session.id}").start()
        dl = fleet.coordinator.transfer.deadlines
        await asyncio.to_thread(session.wait_opened, dl.verify + dl.pause + 2 * dl.sleep + 10)
        if session.plan is None:  # failed before the engines were ready: nothing to send
            self._sessions.pop(session.id, None)
            if session.error is not None:
                raise session.error
            raise DeadlineExceeded(f"session {session.id} did not open in time")
        logger.info("session %s open: version %d, %d bucket(s), trainer at %s:%d",
                    session.id, session.plan.version, len(session.plan.buckets), *session.address)
        return SessionInfo(session=session.id, backend=fleet.coordinator.transfer.broadcast.backend,
                           host=request.host, port=port, world_size=session.world_size, rank=0,
                           version=session.plan.version, plan=session.plan,
                           transfer=fleet.coordinator.transfer, engines=targets)

    async def close(self, sid: str, fleet: Fleet, *, checksums: Sequence[int] | None = None,
                    reason: str | None = None) -> SyncResult | WeightSyncError:
        """Commit (``checksums``) or abort (``reason``) a session; wait for its outcome.

        Returns the result, or the error the sync ended with (commit re-raises it)."""
        session = self.get(sid)
        if checksums is not None:
            if session.plan is not None and len(checksums) != len(session.plan.buckets):
                raise ConfigError(f"session {sid} has {len(session.plan.buckets)} bucket(s); "
                                  f"the commit carries {len(checksums)} checksum(s)")
            session.commit(checksums)
        else:
            session.abort(reason or "aborted by the trainer")
        dl = fleet.coordinator.transfer.deadlines
        bound = 2 * (dl.rendezvous + dl.transfer) + dl.reload + dl.verify + dl.resume + dl.wake
        if not await asyncio.to_thread(session.wait_done, bound):
            raise DeadlineExceeded(f"session {sid} did not finish within {bound:.0f}s")
        # kept (KEEP_FINISHED_S): a second commit is a 409 "already committed", not a 404
        if checksums is not None:
            return session.outcome()
        return session.error if session.error is not None else session.outcome()


def _service_port(host: str) -> int:
    """A free port on ``host``, which must be an IP literal this machine owns."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"host {host!r} is a name: pass the trainer's port, or an IP literal "
                          "of this machine to let the service pick one") from None
    try:
        return free_port(host)
    except OSError as e:
        raise ConfigError(f"cannot pick a port on {host!r} here ({e}); "
                          "pass the trainer's port") from None
