"""Trainer-side sync coordinator: the fleet protocol, deadlines, verification and fencing.

One ``sync()`` call moves a model's weights into every engine:

    pause -> sleep (GPU) -> wake weights -> transfer -> reload_weights -> reset caches
          -> verify -> wake kv_cache -> resume

It is all-or-nothing: with ``apply="staged"`` no engine reloads until every engine received
every bucket with matching checksums, so a dead peer leaves the whole fleet on its old
version. An engine that fails after its weights were touched is fenced (not routable) and
only unfenced by a resync that verifies. Every wait has a deadline.

The coordinator reaches engines only through ``weightsync.remote.Engines`` (Ray actors, or an
in-process fleet in protocol tests) and moves bytes only through a transfer leg named in
``weightsync.transport.legs``; it never branches on the kind of either.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from weightsync.config import TransferConfig
from weightsync.engine.workers import disagreeing, verify_receipt
from weightsync.errors import (ConfigError, IllegalStateError, ManifestError, SyncFailedError,
                               SyncInProgressError, TransferError, VerificationError,
                               WeightSyncError)
from weightsync.colocation import Colocation
from weightsync.heartbeat import Heartbeat
from weightsync.messages import LayoutStatus
from weightsync.metrics import SyncMetrics
from weightsync.outcomes import EngineRun, Outcomes
from weightsync.remote import Engines, RayEngines
from weightsync.sources import as_source
from weightsync.transport.legs import sender_leg
from weightsync.transport.legs.base import LegOutcome, SenderLeg
from weightsync.transport.legs.external import ExternalSender
from weightsync.transport.packing import plan_buckets
from weightsync.types import (Canary, EngineState, EngineStatus, PauseMode, SyncResult,
                              TensorSpec, TransferPlan, plan_json, versionless)

__all__ = ["ExternalSender", "SyncCoordinator"]

logger = logging.getLogger(__name__)

PhaseHook = Callable[[str, str | None], None]  # (phase, engine or None)
_CAN_BEGIN = {EngineState.SERVING, EngineState.FENCED, EngineState.STOPPED, EngineState.ASLEEP,
              EngineState.WEIGHTS_AWAKE}


def _check_sleep_level(level: int) -> None:
    if level not in (0, 1, 2):
        raise ConfigError(f"sleep_level must be 0, 1 or 2, not {level}")


def _raise_refusal(ok: dict, bad: dict) -> None:
    """Raise the most specific error of a check that ran everywhere before anything changed."""
    if bad:
        specific = [e for e in bad.values() if isinstance(e, (ManifestError, ConfigError))]
        raise specific[0] if specific else next(iter(bad.values()))


def _raise_unless_ok(result: SyncResult) -> SyncResult:
    if not result.ok:
        raise SyncFailedError(f"sync to version {result.version} failed on {result.failed}",
                              result=result)
    return result


class SyncCoordinator(Colocation, Outcomes):
    """Drives weight syncs over a fixed set of engines. Thread-safe; one sync at a time.

    ``engines``: engine actor handles, or any ``weightsync.remote.Engines``.
    """

    def __init__(self, engines: Sequence[Any] | Engines, transfer: TransferConfig | None = None,
                 *, metrics: SyncMetrics | None = None, on_phase: PhaseHook | None = None) -> None:
        self.transfer = transfer or TransferConfig()
        self.metrics = metrics or SyncMetrics()
        self.on_phase = on_phase
        # this coordinator's id on the engines' leases (weightsync.engine.lease)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        if isinstance(engines, Sequence):
            if not engines:
                raise ConfigError("a coordinator needs at least one engine")
            access, statuses = RayEngines.connect(engines, self.transfer.deadlines.verify)
            self.access = access.signed(self.owner)
        else:
            self.access = engines.signed(self.owner)  # every step of a sync signed as ours
            statuses = self.statuses()
        self._beat = Heartbeat(self.access, self.transfer.deadlines.lease)
        self.version = max(s.version for s in statuses)  # the latest published
        self._issued = self.version  # the latest a sync began with, published or not
        self._lock = threading.Lock()
        self._layout_cache: dict[tuple[str, ...], Any] = {}  # engine set -> verified layout
        self._kernel_plan_of: tuple[Any, TransferPlan] | None = None  # (layout, its plan)
        # engine -> (its model, the plan less version) it accepted; the models as last seen
        self._validated: dict[str, tuple[str | None, str]] = {}
        self._models: dict[str, str] = {}
        self._legs: dict[str, SenderLeg] = {}
        self._takeover = False  # the sync in progress may take engines from a silent owner
        # engines asleep for this coordinator are not asked their status before a sync
        # (``_held_version``) until one refuses a begin; the next status call trusts again
        self._trust_held = True

    @property
    def engines(self) -> dict[str, Any]:
        """Engine name -> handle."""
        return self.access.handles

    # ---- helpers ---------------------------------------------------------------------------
    def _phase(self, phase: str, engine: str | None = None) -> None:
        if self.on_phase is not None:
            self.on_phase(phase, engine)

    def _leg(self, name: str) -> SenderLeg:
        if name not in self._legs:
            self._legs[name] = sender_leg(name)(self.transfer, self.access,
                                                lambda i: self._phase(f"bucket:{i}"))
        return self._legs[name]

    def statuses(self, asked: Mapping[str, Any] | None = None) -> list[EngineStatus]:
        """Every engine's status (``asked``: the calls ``_ask_statuses`` already made)."""
        pending = asked if asked is not None else self._ask_statuses()
        ok, bad = self.access.wait(pending, self.transfer.deadlines.verify)
        out = list(ok.values())
        for n, e in bad.items():
            out.append(EngineStatus(name=n, state=EngineState.STOPPED, version=-1, device="?",
                                    sleep_supported=False, fenced_reason=str(e), model="?"))
        return out

    def _ask_statuses(self) -> dict[str, Any]:
        return {n: self.access.status(n) for n in self.engines}

    def replace_engine(self, name: str, actor: Any) -> None:
        """Swap in a restarted actor for ``name``. It is fenced (it serves the original
        checkpoint, not the fleet's version) until the next sync verifies it."""
        self.access.replace(name, actor)
        _, bad = self.access.wait({name: self.access.fence(
            name, f"restarted: awaiting a resync to version {self.version}")},
            self.transfer.deadlines.verify)
        if bad:
            raise bad[name]
        for leg in self._legs.values():  # groups and IPC handles were shared with the old one
            leg.close()
        self._layout_cache.clear()
        self._validated.pop(name, None)  # its model may differ
        self._beat.sleeping([name], False)  # the restarted one is not asleep for anyone

    # ---- public API ------------------------------------------------------------------------
    def sync(self, weights: Any, *, pause_mode: PauseMode = "abort", sleep_level: int = 0,
             engines: Sequence[str] | None = None, wave_size: int | None = None,
             ipc: bool = False, partial: bool = False, leg: str | None = None,
             takeover: bool = False, canary: Canary | None = None) -> SyncResult:
        """Sync ``weights`` to the fleet: a ``weightsync.sources.WeightSource`` (a stream, a
        sharded module through ``weightsync.sources.sharded.ShardedSync``), a module (a
        transformers model goes under its checkpoint names), a state dict or an iterable of
        ``(name, tensor)``.

        ``wave_size`` turns on rolling mode: engines update a wave at a time while the others
        keep serving. The transfer leg is ``leg`` by name (``weightsync.transport.legs``),
        ``"broadcast"`` by default; ``ipc=True`` is ``leg="ipc"`` (colocated engines map CUDA
        buckets). ``weights`` must hold every tensor of the engines' model unless ``partial``
        (then it may update a subset; the result says so). Raises ``SyncFailedError`` (with
        ``.result``) if any engine failed, ``ManifestError`` if the weights do not fit the
        model, ``IllegalStateError`` if an engine is in no state to begin (nothing changed
        anywhere in either case). ``takeover``: engines still held by a sync of another
        coordinator that is gone (a crashed trainer) are taken at once instead of after that
        sync's lease lapses. ``canary``: reference logprobs every engine must reproduce after
        its load, before the commit (``types.Canary``; ``weightsync.canary.reference``).
        """
        _check_sleep_level(sleep_level)
        with self._exclusive(takeover):
            return self._sync(weights, pause_mode, sleep_level, engines, wave_size,
                              leg or ("ipc" if ipc else "broadcast"), partial, canary)

    def reload_checkpoint(self, path: str | None, *, pause_mode: PauseMode = "abort",
                          engines: Sequence[str] | None = None, partial: bool = False,
                          roots: Sequence[str] | None = None,
                          takeover: bool = False) -> SyncResult:
        """Reload every engine from a safetensors directory (``None``: the original model).

        Every engine first resolves the directory into its files (inside ``roots`` when given)
        and checks their headers against its model: a checkpoint that lacks any of the model's
        tensors is refused unless ``partial``, and nothing changes anywhere (``ManifestError``
        or ``ConfigError``). Each engine then loads exactly the files it checked.
        """
        with self._exclusive(takeover):
            targets = self._targets(engines)
            version = self._next_version(targets)
            dl = self.transfer.deadlines
            self._phase("validate")
            e = self.access
            checked, refused = e.each(targets, lambda n: e.validate_checkpoint(
                n, path, partial=partial, roots=roots, deadline_s=dl.verify), dl.verify * 1.5)
            _raise_refusal(checked, refused)
            if len(set(checked.values())) != 1:  # a file changed between engines' reads
                # (each engine closes the files it kept at its next check or reload)
                raise ManifestError("the checkpoint's files changed while the engines checked "
                                    "them (they read different files); nothing was loaded")
            self._layout_cache.clear()  # a new checkpoint: engines re-derive and re-verify
            t0 = time.perf_counter()
            runs = {n: EngineRun() for n in targets}
            with self._holding(targets):
                self._begin(runs, None, pause_mode, 0, version)
                identity = next(iter(checked.values()))
                ok, bad = e.each(targets, lambda n: e.reload_from_path(
                    n, path, dl.reload, partial=partial, roots=roots,
                    check_finite=self.transfer.check_finite, identity=identity), dl.reload * 1.2)
                refused = (ManifestError, ConfigError, VerificationError)
                if bad and not ok and all(isinstance(e, refused) for e in bad.values()):
                    # every engine refused before loading a tensor (a non-finite file, files
                    # no longer held): each goes back as it was found, never fenced
                    self._abort({}, "reload refused", rollback=set(targets))
                    raise next(iter(bad.values()))
                for n, r in ok.items():
                    runs[n].seconds["reload"] = r.reload
                    runs[n].nbytes = r.nbytes
                result = self._finish(runs, bad, version, "checkpoint", (), t0, partial)
            return _raise_unless_ok(result)

    def sync_external(self, specs: Sequence[TensorSpec], sender: ExternalSender, *,
                      pause_mode: PauseMode = "abort", sleep_level: int = 0,
                      engines: Sequence[str] | None = None, partial: bool = False,
                      takeover: bool = False) -> SyncResult:
        """Sync weights that ``sender`` broadcasts from outside this process (e.g. a trainer
        reaching the fleet through the control plane): the ``external`` leg.

        Same protocol as ``sync``: the plan is derived here from ``specs``, validated on every
        engine before anything changes, and everything after the transfer (checksums against
        the sender's, staged apply, fingerprints, commit or rollback) is the ``sync`` path.
        """
        _check_sleep_level(sleep_level)
        if not specs:
            raise ConfigError("no tensors to sync")
        with self._exclusive(takeover):
            t0 = time.perf_counter()
            targets = self._targets(engines)
            plan = plan_buckets(list(specs), self.transfer.bucket_bytes,
                                self._next_version(targets))
            plan = plan.model_copy(update={"partial": partial})
            return _raise_unless_ok(self._sync_wave(targets, plan, sender, "external",
                                                    pause_mode, sleep_level, t0))

    def close(self) -> None:
        """Release what the legs keep across syncs (groups, IPC buffers) and stop renewing
        leases; engines keep running (any still asleep for this coordinator wake, or stay
        fenced without weights, once their lease lapses)."""
        for leg in self._legs.values():
            leg.close()
        self._beat.close()

    # ---- the protocol ------------------------------------------------------------------------
    @contextlib.contextmanager
    def _exclusive(self, takeover: bool = False):
        if not self._lock.acquire(blocking=False):
            raise SyncInProgressError("a sync is already running on this fleet")
        self._takeover = takeover
        try:
            yield
        finally:
            self._takeover = False
            self._lock.release()

    def _holding(self, names: Sequence[str]):
        """Renew this coordinator's lease on ``names`` while the body runs (if this process
        dies, the engines end the sync by themselves); then keep holding those the sync left
        asleep for this trainer (restored after a failure)."""
        return self._beat.syncing(names)

    def _next_version(self, targets: Sequence[str],
                      asked: Mapping[str, Any] | None = None) -> int:
        """One past the highest version any engine or this coordinator has seen or begun a
        sync with, so a number is never used twice: not by another coordinator (or a restarted
        trainer) over the same engines, not by a retry after a failed sync. A sync refused
        before it began (a checkpoint or plan that does not fit) uses none.

        Also refuses, before anything is touched, a sync whose targets are in no state to
        begin one (paused, asleep, loading): ``IllegalStateError``, never a fenced engine.
        """
        statuses = self.statuses(asked)
        self._trust_held = True
        busy = [s for s in statuses if s.name in targets and not self._may_take(s) and (
            s.state not in _CAN_BEGIN or s.owner not in (None, self.owner))]
        if busy:
            b = busy[0]
            why = (f": it is held by {b.owner} ({b.state.value}, lease {b.lease_left_s:.1f}s "
                   "more; take it over only if that coordinator is gone)"
                   if b.owner not in (None, self.owner) and b.state in _CAN_BEGIN else
                   f" while {b.state.value} (needs serving/fenced/asleep)")
            raise IllegalStateError(f"cannot begin a sync{why}; no engine was touched",
                                    engine=b.name)
        self.version = max([self.version, *(s.version for s in statuses)])
        self._models = {s.name: s.model for s in statuses}
        return max([self._issued, self.version, *(s.version_seen for s in statuses)]) + 1

    def _holds_asleep(self, targets: Sequence[str]) -> bool:
        return self._trust_held and not self._takeover and self._beat.holds_asleep(targets)

    def _held_version(self) -> int:
        """``_next_version`` for engines asleep for this coordinator, without asking them: its
        heartbeat has held them since its ``sleep``, so no other coordinator began a sync on
        them, and the numbers they have seen are the ones it issued. An engine that moved on
        anyway (its lease lapsed while this process stalled, and another coordinator synced
        it) refuses the begin: a version it has seen is never reused (``begin_sync``)."""
        return max(self._issued, self.version) + 1

    def _may_take(self, status: EngineStatus) -> bool:
        """An engine held by another coordinator's sync that this one may take over."""
        return status.owner not in (None, self.owner) and \
            (self._takeover or (status.lease_left_s is not None and status.lease_left_s < 0))

    def _kernel_layout(self, names: list[str], tensors: set[str]) -> tuple[Any, str | None]:
        """The verified kernel layout every target shares, or (None, why not)."""
        mode = self.transfer.layout
        if mode == "checkpoint":
            return None, "checkpoint format requested"
        cached = self._layout_cache.get(tuple(sorted(names)))
        if cached is not None:  # verified once; dropped on any failure, reload or restart
            if not {n for p in cached.params for n, _ in p.parts} - set(tensors):
                return cached, None
        ok, bad = self.access.each(names, self.access.kernel_layout,
                                   self.transfer.deadlines.verify)
        statuses: list[LayoutStatus] = list(ok.values())
        note = None
        if bad:
            note = f"layout query failed on {sorted(bad)}"
        elif not all(s.verified for s in statuses):
            note = "; ".join(sorted({s.reason for s in statuses if not s.verified}))
        elif len({s.signature for s in statuses}) != 1 or statuses[0].layout is None:
            note = "engines report different kernel layouts"
        else:
            layout = statuses[0].layout
            self._layout_cache[tuple(sorted(names))] = layout
            missing = {n for p in layout.params for n, _ in p.parts} - set(tensors)
            if not missing:
                return layout, None
            note = f"partial update ({len(missing)} checkpoint tensors not sent)"
        if mode == "kernel":
            raise ConfigError(f"kernel layout unavailable: {note}")
        return None, note

    def _kernel_plan(self, layout, version: int) -> TransferPlan:
        """The kernel-layout plan, planned once per layout: the same bucket objects every sync
        let the IPC leg reuse its packing views (``pack_bucket(views=...)``)."""
        cached = self._kernel_plan_of
        if cached is None or cached[0] is not layout:
            plan = plan_buckets([layout.spec(p) for p in layout.params],
                                self.transfer.bucket_bytes, version)
            cached = self._kernel_plan_of = (layout, plan.model_copy(update={"format": "kernel"}))
        return cached[1].model_copy(update={"version": version})

    def _targets(self, engines: Sequence[str] | None) -> list[str]:
        names = list(engines) if engines else list(self.engines)
        unknown = [n for n in names if n not in self.engines]
        if unknown:
            raise ConfigError(f"unknown engine(s): {unknown}")
        return names

    def _sync(self, weights, pause_mode, sleep_level, engines, wave_size, leg,
              partial, canary: Canary | None = None) -> SyncResult:
        t0 = time.perf_counter()
        targets = self._targets(engines)
        held = self._holds_asleep(targets)  # the colocated loop: asleep for this trainer
        # the engines answer while the trainer's side is described
        asked = None if held else self._ask_statuses()
        source = as_source(weights)  # metadata first: no tensor is read before the plan
        specs = source.specs()
        if not specs:
            raise ConfigError("no tensors to sync")
        self._leg(leg)  # an unknown leg is a ConfigError before anything is touched
        version = self._held_version() if held else self._next_version(targets, asked)
        layout, note = self._kernel_layout(targets, {s.name for s in specs}) \
            if source.random_access else (None, "a streamed source is sent in its own order")
        if layout is not None:
            plan = self._kernel_plan(layout, version)
            tensors = source.feed(plan, {p.name: [n for n, _ in p.parts] for p in layout.params})
        else:
            plan = plan_buckets(specs, self.transfer.bucket_bytes, version)
            plan = plan.model_copy(update={"partial": partial})
            tensors = source.feed(plan)
        waves = [targets] if not wave_size else [targets[i:i + wave_size]
                                                 for i in range(0, len(targets), wave_size)]
        results = []
        for wave in waves:
            try:
                results.append(self._sync_wave(wave, plan, tensors, leg, pause_mode,
                                               sleep_level, t0, canary))
            except IllegalStateError:
                if held:  # an engine it held refused: ask them first next time
                    self._trust_held = False
                raise
            if not results[-1].ok:  # stop the rollout: later waves keep their old version
                self._layout_cache.clear()
                break
        reports = tuple(r for res in results for r in res.engines)
        result = SyncResult(version=version, ok=all(r.ok for r in reports), mode=leg,
                            layout=plan.format, layout_note=note, nbytes=plan.total_bytes,
                            partial=partial, sender_checksums=results[0].sender_checksums,
                            engines=reports, seconds={"total": time.perf_counter() - t0})
        return _raise_unless_ok(result)

    def _sync_wave(self, names, plan: TransferPlan, source, leg: str, pause_mode, sleep_level,
                   t0, canary: Canary | None = None) -> SyncResult:
        with self._holding(names):
            return self._wave(names, plan, source, leg, pause_mode, sleep_level, t0, canary)

    def _wave(self, names, plan: TransferPlan, source, leg: str, pause_mode, sleep_level,
              t0, canary: Canary | None = None) -> SyncResult:
        runs = {n: EngineRun() for n in names}
        self._begin(runs, plan_json(plan), pause_mode, sleep_level, plan.version)
        dl = self.transfer.deadlines
        self._phase("transfer")
        t = time.perf_counter()
        try:
            # a wave of one engine has nothing to agree on: it may commit as it loads (not
            # with a canary, which runs between the load and the commit)
            out = self._leg(leg).send(list(names), plan, source,
                                      {n: r.begun for n, r in runs.items()},
                                      one_phase=len(names) == 1 and canary is None)
        except WeightSyncError as e:  # the source failed before the leg reached any engine
            out = LegOutcome([], {}, {n: TransferError(f"sender failed: {e}", engine=n)
                                      for n in names})
        transfer_s = time.perf_counter() - t
        bad = dict(out.failed)
        fence: set[str] = set()  # engines at fault themselves (their workers disagree)
        for n, run in runs.items():
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
            # verify every worker's checksums before anything is applied
            err, at_fault = verify_receipt(receipt, out.sums, n)
            run.checksum_ok = err is None
            if err is not None:
                bad[n] = err
                if at_fault or run.committed:
                    fence.add(n)
        # an engine that committed in its receive call checked the same sums itself: should
        # the check here still fail, it serves weights nobody verified: fence it (its sync is
        # over, so abort_sync would no longer touch it)
        self._fence_committed({n: e for n, e in bad.items() if runs[n].committed})
        if bad and self.transfer.apply == "staged":
            # all-or-nothing: nobody applies; intact engines resume their old version
            return self._fail_all(runs, bad, plan.version, leg, out.sums, fence)
        staged = [n for n in runs if n not in bad and not runs[n].applied]
        if staged:
            self._phase("reload")
            ok, bad2 = self.access.each(staged, lambda n: self.access.apply_staged(n, dl.reload),
                                        dl.reload * 1.2)
            bad.update(bad2)
            loaded = time.perf_counter() - t  # trainer's wall time: transfer start -> loaded
            for n, reply in ok.items():
                runs[n].seconds["reload"] = reply.reload
                # (less the fingerprint the engine took in the same call: the verify step's)
                runs[n].seconds["transfer+reload"] = loaded - reply.seconds.get("fingerprint",
                                                                                0.0)
                runs[n].finish = reply.finish
        self._leg(leg).loaded()  # every engine has applied: free buffers before wake_kv
        return self._finish(runs, bad, plan.version, leg, tuple(out.sums), t0, plan.partial,
                            canary)

    def _begin(self, runs: dict[str, EngineRun], plan_text, pause_mode, sleep_level,
               version: int) -> None:
        """Validate + pause (+ sleep/wake weights) everywhere; a bad manifest changes nothing."""
        dl = self.transfer.deadlines
        if plan_text is not None:  # validate everywhere before touching any engine
            self._phase("validate")
            self._validate(list(runs), plan_text)
        self._phase("pause")
        self._issued = max(self._issued, version)  # begun: never handed out again
        ok, bad = self.access.each(runs, lambda n: self.access.begin_sync(
            n, pause_mode=pause_mode, sleep_level=sleep_level, deadline_s=max(dl.pause, dl.sleep),
            lease_s=dl.lease, takeover=self._takeover, version=version), dl.pause + 2 * dl.sleep)
        for n, reply in ok.items():
            runs[n].begun = reply
            runs[n].seconds.update(reply.seconds)
        refused = {n: e for n, e in bad.items() if isinstance(e, IllegalStateError)}
        if refused:  # those engines were not touched: leave them as they are, undo the rest
            self._abort({n: e for n, e in bad.items() if n not in refused}, "begin",
                        rollback=set(ok))
            raise next(iter(refused.values()))
        if bad:
            self._abort(bad, "begin", rollback=set(ok))
            raise SyncFailedError(f"could not begin the sync on {sorted(bad)}: "
                                  + "; ".join(str(e) for e in bad.values()),
                                  engine=next(iter(bad)))

    def _validate(self, names: list[str], plan_text: str) -> None:
        """Every engine checks the plan against its model (``ManifestError`` before anything
        is touched). Whether a plan fits depends on the plan and the engine's model only, so
        an engine that accepted this plan (its version aside) is not asked again until it is
        replaced (``replace_engine``): the kernel-layout plan is the same every sync."""
        body = versionless(plan_text)
        key = {n: (self._models.get(n), body) for n in names}  # (the model it serves, plan)
        ask = [n for n in names if self._validated.get(n) != key[n]]
        if not ask:
            return
        ok, bad = self.access.each(ask, lambda n: self.access.validate(n, plan_text),
                                   self.transfer.deadlines.verify)
        _raise_refusal(ok, bad)
        self._validated.update({n: key[n] for n in ask})

    def _finish(self, runs, bad, version, mode, sums, t0, partial: bool,
                canary: Canary | None = None) -> SyncResult:
        """Reset caches + fingerprint on engines that loaded, verify agreement, run the canary
        where one was asked for, commit."""
        dl = self.transfer.deadlines
        self._phase("verify")
        # engines that fingerprinted as they loaded, with no cache to reset, are done with it
        done = {n: r.finish for n, r in runs.items() if n not in bad and r.finish is not None}
        ok, bad2 = self.access.each([n for n in runs if n not in bad and n not in done],
                                    lambda n: self.access.finish_load(n, dl.verify),
                                    dl.verify * 1.5)
        ok.update(done)
        bad.update(bad2)
        for n, reply in ok.items():
            runs[n].seconds.update(reply.seconds)
            runs[n].fingerprint = reply.fingerprint
            runs[n].skipped += reply.skipped
            runs[n].rebuilt += reply.rebuilt
        # engines disagree (worker by worker, within a shape): fence all but the majority
        bad.update(disagreeing(ok))
        if canary is not None:  # what the engines compute, against the trainer's logprobs
            self._phase("canary")
            text = canary.model_dump_json()
            ok, bad4 = self.access.each([n for n in runs if n not in bad],
                                        lambda n: self.access.run_canary(n, text, dl.verify),
                                        dl.verify * 1.5)
            bad.update(bad4)
            for n, reply in ok.items():
                runs[n].seconds["canary"] = reply.seconds
                runs[n].skipped += (f"canary: largest gap {reply.max_gap:.3g} at token "
                                    f"{reply.position} (tolerance {canary.tolerance:g})",)
        self._phase("resume")
        ok, bad3 = self.access.each([n for n in runs if n not in bad and not runs[n].committed],
                                    lambda n: self.access.commit(n, version, dl.resume),
                                    dl.resume + dl.wake)
        bad.update(bad3)
        for n, reply in ok.items():
            runs[n].seconds.update(reply.seconds)
        self._abort(bad, "finish")
        return self._result(runs, bad, set(), version, mode, sums, t0, partial)
