"""One sync of one set of engines, from begin to commit or rollback.

It is all-or-nothing: with ``apply="staged"`` no engine reloads until every engine received
every bucket with matching checksums, so a dead peer leaves the whole set on its old version.
An engine that fails after its weights were touched is fenced (not routable) and only
unfenced by a resync that verifies; one whose weights are intact rolls back. Every wait has a
deadline (``weightsync.config.Deadlines``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from weightsync.config import Deadlines
from weightsync.coordination.reach import Reach
from weightsync.engine.workers import disagreeing, verify_receipt
from weightsync.errors import (
    ConfigError,
    EngineDeadError,
    EngineUnresponsive,
    IllegalStateError,
    ManifestError,
    SyncFailedError,
    VerificationError,
    WeightSyncError,
)
from weightsync.messages import BeginReply
from weightsync.remote import Engines
from weightsync.transport.legs.base import LegOutcome
from weightsync.types import (
    Canary,
    EngineState,
    EngineStatus,
    EngineSyncReport,
    FinishReply,
    PauseMode,
    SyncResult,
)

Failures = dict[str, WeightSyncError]


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


class SyncAttempt:
    """Engines ``names`` synced to ``version`` by ``mode`` (a leg's name, or "checkpoint").
    ``statuses`` asks every engine's status (for the versions of those that failed)."""

    def __init__(self, reach: Reach, names: Sequence[str], version: int, mode: str,
                 statuses: Callable[[], list[EngineStatus]]) -> None:
        self.reach, self.version, self.mode = reach, version, mode
        self.runs = {n: EngineRun() for n in names}
        self._statuses = statuses

    @property
    def engines(self) -> Engines:
        return self.reach.engines

    @property
    def dl(self) -> Deadlines:
        return self.reach.deadlines

    @property
    def begun(self) -> dict[str, BeginReply]:
        """Every engine's reply to its begin (all of them, once ``begin`` returned)."""
        return {n: r.begun for n, r in self.runs.items() if r.begun is not None}

    # ---- the steps -----------------------------------------------------------------------------
    def begin(self, pause_mode: PauseMode, sleep_level: int, takeover: bool) -> None:
        """Pause (+ sleep/wake weights) everywhere. If any engine fails to begin, none goes
        on: those that began roll back, one that refused (in no state to begin) is left as it
        was, one that failed otherwise is fenced; the first refusal (else a
        ``SyncFailedError``) is raised."""
        dl, e = self.dl, self.engines
        ok, bad = e.each(self.runs, lambda n: e.begin_sync(
            n, pause_mode=pause_mode, sleep_level=sleep_level,
            deadline_s=max(dl.pause, dl.sleep), lease_s=dl.lease, takeover=takeover,
            version=self.version), dl.pause + 2 * dl.sleep)
        for n, reply in ok.items():
            self.runs[n].begun = reply
            self.runs[n].seconds.update(reply.seconds)
        refused = {n: err for n, err in bad.items() if isinstance(err, IllegalStateError)}
        if refused:  # those engines were not touched: leave them as they are, undo the rest
            self.abort({n: err for n, err in bad.items() if n not in refused}, "begin",
                       rollback=set(ok))
            raise next(iter(refused.values()))
        if bad:
            self.abort(bad, "begin", rollback=set(ok))
            raise SyncFailedError(f"could not begin the sync on {sorted(bad)}: "
                                  + "; ".join(str(err) for err in bad.values()),
                                  engine=next(iter(bad)))

    def received(self, out: LegOutcome, transfer_s: float) -> tuple[Failures, set[str]]:
        """Take the leg's receipts: (engines failed, those at fault themselves: fence them).
        Every worker's checksums are checked against the sender's before anything is
        applied."""
        bad = dict(out.failed)
        fence: set[str] = set()  # engines at fault themselves (their workers disagree)
        for n, run in self.runs.items():
            run.seconds["transfer"] = transfer_s
            receipt = out.receipts.get(n)
            if receipt is None:
                continue
            run.checksums, run.applied, run.nbytes = receipt.checksums, receipt.applied, \
                receipt.nbytes
            sub = dict(receipt.seconds)
            run.finish = receipt.finish
            if receipt.commit is not None:  # committed in the same call: no commit follows
                run.committed = True
                run.seconds.update(receipt.commit)
            # the verify step's and the commit's, in the same call: neither is the transfer's
            after = sub.pop("fingerprint", 0.0) + sub.pop("commit", 0.0)
            if receipt.applied and "reload" in sub:  # loaded in the same call (atomic)
                run.seconds["reload"] = sub.pop("reload")
                run.seconds["transfer"] = transfer_s - run.seconds["reload"] - after
                run.seconds["transfer+reload"] = transfer_s - after
            elif receipt.applied:  # streamed into the loader
                run.seconds["transfer"] = transfer_s - after
            # where the transfer went: the trainer's and the engine's sub-phases, prefixed
            run.seconds.update({f"transfer.{k}": v for k, v in {**out.seconds, **sub}.items()})
            err, at_fault = verify_receipt(receipt, out.sums, n)
            run.checksum_ok = err is None
            if err is not None:
                bad[n] = err
                if at_fault or run.committed:
                    fence.add(n)
        # an engine that committed in its receive call checked the same sums itself: should
        # the check here still fail, it serves weights nobody verified: fence it (its sync is
        # over, so abort_sync would no longer touch it)
        self._fence_committed({n: e for n, e in bad.items() if self.runs[n].committed})
        return bad, fence

    def apply_staged(self, bad: Failures, t: float) -> None:
        """Engines that staged what they received load it (failures join ``bad``). ``t``: when
        the transfer started (``time.perf_counter``)."""
        staged = [n for n in self.runs if n not in bad and not self.runs[n].applied]
        if not staged:
            return
        self.reach.phase("reload", None)
        e = self.engines
        ok, bad2 = e.each(staged, lambda n: e.apply_staged(n, self.dl.reload),
                          self.dl.reload * 1.2)
        bad.update(bad2)
        loaded = time.perf_counter() - t  # trainer's wall time: transfer start -> loaded
        for n, reply in ok.items():
            run = self.runs[n]
            run.seconds["reload"] = reply.reload
            # (less the fingerprint the engine took in the same call: the verify step's)
            run.seconds["transfer+reload"] = loaded - reply.seconds.get("fingerprint", 0.0)
            run.finish = reply.finish

    def reload(self, path: str | None, partial: bool, roots: Sequence[str] | None,
               identity: str) -> Failures:
        """Every engine reloads from the checkpoint files it checked (``identity``). If every
        engine refused before loading a tensor (a non-finite file, files no longer held),
        each goes back as it was found, never fenced, and the refusal is raised."""
        dl, e = self.dl, self.engines
        ok, bad = e.each(self.runs, lambda n: e.reload_from_path(
            n, path, dl.reload, partial=partial, roots=roots,
            check_finite=self.reach.transfer.check_finite, identity=identity), dl.reload * 1.2)
        refused = (ManifestError, ConfigError, VerificationError)
        if bad and not ok and all(isinstance(err, refused) for err in bad.values()):
            self.abort({}, "reload refused", rollback=set(self.runs))
            raise next(iter(bad.values()))
        for n, r in ok.items():
            self.runs[n].seconds["reload"] = r.reload
            self.runs[n].nbytes = r.nbytes
        return bad

    def finish(self, bad: Failures, sums: tuple[int, ...], t0: float, partial: bool,
               canary: Canary | None = None) -> SyncResult:
        """Reset caches + fingerprint on engines that loaded, verify agreement, run the canary
        where one was asked for, commit; fence whoever failed."""
        dl, e, runs = self.dl, self.engines, self.runs
        self.reach.phase("verify", None)
        # engines that fingerprinted as they loaded, with no cache to reset, are done with it
        done = {n: r.finish for n, r in runs.items() if n not in bad and r.finish is not None}
        ok, bad2 = e.each([n for n in runs if n not in bad and n not in done],
                          lambda n: e.finish_load(n, dl.verify), dl.verify * 1.5)
        ok.update(done)
        bad.update(bad2)
        for n, fin in ok.items():
            runs[n].seconds.update(fin.seconds)
            runs[n].fingerprint = fin.fingerprint
            runs[n].skipped += fin.skipped
            runs[n].rebuilt += fin.rebuilt
        # engines disagree (worker by worker, within a shape): fence all but the majority
        bad.update(disagreeing(ok))
        if canary is not None:  # what the engines compute, against the trainer's logprobs
            self.reach.phase("canary", None)
            text = canary.model_dump_json()
            scored, bad4 = e.each([n for n in runs if n not in bad],
                                  lambda n: e.run_canary(n, text, dl.verify), dl.verify * 1.5)
            bad.update(bad4)
            for n, score in scored.items():
                runs[n].seconds["canary"] = score.seconds
                runs[n].skipped += (f"canary: largest gap {score.max_gap:.3g} at token "
                                    f"{score.position} (tolerance {canary.tolerance:g})",)
        self.reach.phase("resume", None)
        committed, bad3 = e.each([n for n in runs if n not in bad and not runs[n].committed],
                                 lambda n: e.commit(n, self.version, dl.resume),
                                 dl.resume + dl.wake)
        bad.update(bad3)
        for n, done_commit in committed.items():
            runs[n].seconds.update(done_commit.seconds)
        self.abort(bad, "finish")
        return self.result(bad, set(), sums, t0, partial)

    # ---- how it ends when some failed ----------------------------------------------------------
    def _fence_committed(self, bad: Failures) -> None:
        """Fence engines that committed in their receive call but failed the check here."""
        if bad:
            self.engines.each(bad, lambda n: self.engines.fence(
                n, f"verify after commit: {bad[n]}"), self.dl.verify)

    def fail_all(self, bad: Failures, sums: tuple[int, ...],
                 fence: set[str] | frozenset[str] = frozenset()) -> SyncResult:
        """Staged all-or-nothing: nobody applies. A broken group fails every receiver, so the
        engines cannot be blamed one by one here; each host rolls back if its weights are
        intact and fences itself otherwise. Engines that died or cannot answer stay failed,
        and so do those in ``fence`` (their own workers disagree: they are fenced)."""
        # engines that are gone or silent are at fault; the others answered with the error
        # they saw (a broken group, a timed-out bucket) and decide their own fate
        culprits = {n: err for n, err in bad.items()
                    if isinstance(err, (EngineDeadError, EngineUnresponsive)) or n in fence}
        e, resume = self.engines, self.dl.resume
        ok, unreachable = e.each(self.runs, lambda n: e.abort_sync(
            n, f"transfer: {bad.get(n) or 'another engine failed'}", resume, fence=n in fence),
            resume * 1.5)
        failed = {**culprits, **unreachable}
        failed.update({n: bad[n] for n, st in ok.items()
                       if st.state == EngineState.FENCED and n in bad})
        rolled_back = {n for n in self.runs if n not in failed}
        for n in rolled_back:
            if n in bad:
                self.runs[n].note = str(bad[n])
        return self.result(failed, rolled_back, sums, None, False)

    def abort(self, bad: Failures, stage: str,
              rollback: set[str] | frozenset[str] = frozenset()) -> None:
        """Fence engines in ``bad``; engines in ``rollback`` resume on their old weights."""
        e, resume = self.engines, self.dl.resume
        pending = {n: e.abort_sync(n, f"{stage}: {err}", resume, fence=True)
                   for n, err in bad.items()}
        pending.update({n: e.abort_sync(n, f"{stage}: another engine failed", resume,
                                        fence=False) for n in rollback})
        if pending:
            self.reach.phase("abort", None)
            e.wait(pending, resume * 1.5)

    def result(self, bad: Failures, rolled_back: set[str], sums: tuple[int, ...],
               t0: float | None, partial: bool) -> SyncResult:
        """Every engine's report: took it, rolled back (on its old version) or fenced."""
        versions = {s.name: s.version for s in self._statuses()} if bad or rolled_back else {}
        reports = []
        for n, run in self.runs.items():
            err = bad.get(n)
            took = n not in bad and n not in rolled_back
            reports.append(EngineSyncReport(
                engine=n, ok=took, version=self.version if took else versions.get(n, -1),
                seconds=run.seconds,
                skipped=(*(run.begun.skipped if run.begun else ()), *run.skipped),
                rebuilt=run.rebuilt,
                nbytes=run.nbytes, checksum_ok=run.checksum_ok, fingerprint=run.fingerprint,
                error=str(err) if err else (f"rolled back: {run.note or 'another engine failed'}"
                                            if n in rolled_back else None),
                fenced=err is not None,
            ))
        return SyncResult(version=self.version, ok=all(r.ok for r in reports), mode=self.mode,
                          nbytes=max((r.nbytes for r in reports), default=0), partial=partial,
                          sender_checksums=tuple(sums), engines=tuple(reports),
                          seconds={"total": time.perf_counter() - t0} if t0 else {})
