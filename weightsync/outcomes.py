"""How a sync ends, for ``SyncCoordinator``: every engine's part of it (``EngineRun``), and
fencing, rolling back and reporting once the coordinator knows who failed.

Mixed into ``weightsync.coordinator.SyncCoordinator``, whose engines (``access``), deadlines
(``transfer``), metrics, heartbeat and published version it uses.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from weightsync.errors import EngineDeadError, EngineUnresponsive, WeightSyncError
from weightsync.messages import BeginReply
from weightsync.types import EngineState, EngineSyncReport, FinishReply, SyncResult


@dataclass(slots=True)
class EngineRun:
    """One engine's part of one sync, as the coordinator learns it (typed: a misspelt field is
    an AttributeError, never a silent default)."""

    begun: BeginReply | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    checksums: tuple[int, ...] | None = None
    applied: bool = False
    nbytes: int = 0
    checksum_ok: bool | None = None
    fingerprint: str | None = None
    finish: FinishReply | None = None  # the verify step, done by the engine as it loaded
    committed: bool = False  # the engine committed in its receive call (a wave of one)
    skipped: tuple[str, ...] = ()  # phases an engine skipped after it began, and why
    rebuilt: tuple[str, ...] = ()  # derived state it restored or rebuilt after loading
    note: str | None = None  # why it rolled back, when it did


class Outcomes:
    """Fence, roll back and report the engines of a sync."""

    def _fence_committed(self, bad: dict[str, WeightSyncError]) -> None:
        """Fence engines that committed in their receive call but failed the check here."""
        pending = {n: self.access.fence(n, f"verify after commit: {e}") for n, e in bad.items()}
        if pending:
            self.access.wait(pending, self.transfer.deadlines.verify)

    def _fail_all(self, runs, bad, version, mode, sums, fence=frozenset()) -> SyncResult:
        """Staged all-or-nothing: nobody applies. A broken group fails every receiver, so the
        engines cannot be blamed one by one here; each host rolls back if its weights are
        intact and fences itself otherwise. Engines that died or cannot answer stay failed,
        and so do those in ``fence`` (their own workers disagree: they are fenced)."""
        # engines that are gone or silent are at fault; the others answered with the error
        # they saw (a broken group, a timed-out bucket) and decide their own fate
        culprits = {n: e for n, e in bad.items()
                    if isinstance(e, (EngineDeadError, EngineUnresponsive)) or n in fence}
        pending = {n: self.access.abort_sync(
            n, f"transfer: {bad.get(n) or 'another engine failed'}",
            self.transfer.deadlines.resume, fence=n in fence) for n in runs}
        ok, unreachable = self.access.wait(pending, self.transfer.deadlines.resume * 1.5)
        failed = {**culprits, **unreachable}
        failed.update({n: bad[n] for n, st in ok.items()
                       if st.state == EngineState.FENCED and n in bad})
        rolled_back = {n for n in runs if n not in failed}
        for n in rolled_back:
            if n in bad:
                runs[n].note = str(bad[n])
        return self._result(runs, failed, rolled_back, version, mode, tuple(sums), None, False)

    def _abort(self, bad: dict, stage: str, rollback: set[str] = frozenset()) -> None:
        """Fence engines in ``bad``; engines in ``rollback`` resume on their old weights."""
        resume = self.transfer.deadlines.resume
        pending = {n: self.access.abort_sync(n, f"{stage}: {err}", resume, fence=True)
                   for n, err in bad.items()}
        pending.update({n: self.access.abort_sync(n, f"{stage}: another engine failed", resume,
                                                  fence=False) for n in rollback})
        if pending:
            self._phase("abort")
            self.access.wait(pending, resume * 1.5)

    def _result(self, runs, bad, rolled_back, version, mode, sums, t0, partial) -> SyncResult:
        versions = {s.name: s.version for s in self.statuses()} if bad or rolled_back else {}
        reports = []
        for n, run in runs.items():
            err = bad.get(n)
            took = n not in bad and n not in rolled_back
            reports.append(EngineSyncReport(
                engine=n, ok=took, version=version if took else versions.get(n, -1),
                seconds=run.seconds,
                skipped=(*(run.begun.skipped if run.begun else ()), *run.skipped),
                rebuilt=run.rebuilt,
                nbytes=run.nbytes, checksum_ok=run.checksum_ok, fingerprint=run.fingerprint,
                error=str(err) if err else (f"rolled back: {run.note or 'another engine failed'}"
                                            if n in rolled_back else None),
                fenced=err is not None,
            ))
        for rep in reports:
            self.metrics.observe(rep, mode)
        self._beat.sleeping([r.engine for r in reports if r.ok], False)  # awake and serving
        if any(r.ok for r in reports):  # every routable engine that took it verified it
            self.version = max(self.version, version)
        return SyncResult(version=version, ok=all(r.ok for r in reports), mode=mode,
                          nbytes=max((r.nbytes for r in reports), default=0), partial=partial,
                          sender_checksums=tuple(sums), engines=tuple(reports),
                          seconds={"total": time.perf_counter() - t0} if t0 else {})
