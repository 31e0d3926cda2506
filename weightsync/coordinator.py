"""Trainer-side sync coordinator: the fleet protocol, deadlines, verification and fencing.

One ``sync()`` call moves a model's weights into every engine:

    pause -> sleep (GPU) -> wake weights -> transfer -> reload_weights -> reset caches
          -> verify -> wake kv_cache -> resume

It is all-or-nothing: with ``apply="staged"`` no engine reloads until every engine received
every bucket with matching checksums, so a dead peer leaves the whole fleet on its old
version. An engine that fails after its weights were touched is fenced (not routable) and
only unfenced by a resync that verifies. Every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import ray

from weightsync.config import TransferConfig
from weightsync.errors import (ConfigError, EngineDeadError, EngineUnresponsive,
                               IllegalStateError, ManifestError, SyncFailedError,
                               SyncInProgressError, VerificationError)
from weightsync.metrics import SyncMetrics
from weightsync.remote import gather
from weightsync.transport.fleet import ExternalSender, FleetTransfer
from weightsync.transport.packing import named_tensors, plan_buckets, spec_of
from weightsync.types import (EngineState, EngineStatus, EngineSyncReport, PauseMode, SyncResult,
                              TensorSpec, TransferPlan)

__all__ = ["ExternalSender", "SyncCoordinator"]

logger = logging.getLogger(__name__)

PhaseHook = Callable[[str, str | None], None]  # (phase, engine or None)


def _check_sleep_level(level: int) -> None:
    if level not in (0, 1, 2):
        raise ConfigError(f"sleep_level must be 0, 1 or 2, not {level}")


_CAN_BEGIN = {EngineState.SERVING, EngineState.FENCED, EngineState.STOPPED}


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


class _Engine:
    def __init__(self, name: str, actor: Any) -> None:
        self.name, self.actor = name, actor
        self.report: dict[str, Any] = {}


class SyncCoordinator:
    """Drives weight syncs over a fixed set of engine actors. Thread-safe; one sync at a time."""

    def __init__(self, engines: Sequence[Any], transfer: TransferConfig | None = None, *,
                 metrics: SyncMetrics | None = None, on_phase: PhaseHook | None = None) -> None:
        if not engines:
            raise ConfigError("a coordinator needs at least one engine")
        self.transfer = transfer or TransferConfig()
        self.metrics = metrics or SyncMetrics()
        self.on_phase = on_phase
        statuses = ray.get([a.status.remote() for a in engines], timeout=self.transfer.deadlines.verify)
        self.engines = {s.name: a for s, a in zip(statuses, engines, strict=True)}
        self.version = max(s.version for s in statuses)
        self._lock = threading.Lock()
        self._layout_cache: dict[tuple[str, ...], Any] = {}  # engine set -> verified layout
        self._kernel_plan_of: tuple[Any, TransferPlan] | None = None  # (layout, its plan)
        self.legs = FleetTransfer(self.transfer, lambda i: self._phase(f"bucket:{i}"))

    # ---- helpers ---------------------------------------------------------------------------
    def _phase(self, phase: str, engine: str | None = None) -> None:
        if self.on_phase is not None:
            self.on_phase(phase, engine)

    def statuses(self) -> list[EngineStatus]:
        refs = {n: a.status.remote() for n, a in self.engines.items()}
        ok, bad = gather(refs, self.transfer.deadlines.verify)
        out = list(ok.values())
        for n, e in bad.items():
            out.append(EngineStatus(name=n, state=EngineState.STOPPED, version=-1, device="?",
                                    sleep_supported=False, fenced_reason=str(e), model="?"))
        return out

    def replace_engine(self, name: str, actor: Any) -> None:
        """Swap in a restarted actor for ``name``. It is fenced (it serves the original
        checkpoint, not the fleet's version) until the next sync verifies it."""
        ray.get(actor.fence.remote(f"restarted: awaiting a resync to version {self.version}"),
                timeout=self.transfer.deadlines.verify)
        self.engines[name] = actor
        self.legs.close_group()
        self.legs.release_ipc_buffers(force=True)  # its handles were shared with the old one
        self._layout_cache.clear()

    # ---- public API ------------------------------------------------------------------------
    def sync(self, weights: Any, *, pause_mode: PauseMode = "abort", sleep_level: int = 0,
             engines: Sequence[str] | None = None, wave_size: int | None = None,
             ipc: bool = False, partial: bool = False) -> SyncResult:
        """Sync ``weights`` (module, state dict or iterable of ``(name, tensor)``) to the fleet.

        ``wave_size`` turns on rolling mode: engines update a wave at a time while the others
        keep serving. ``ipc=True`` shares CUDA buckets with colocated engines instead of
        broadcasting. ``weights`` must hold every tensor of the engines' model unless
        ``partial`` (then it may update a subset; the result says so). Raises
        ``SyncFailedError`` (with ``.result``) if any engine failed, ``ManifestError`` if the
        weights do not fit the model, ``IllegalStateError`` if an engine is in no state to
        begin (nothing changed anywhere in either case).
        """
        _check_sleep_level(sleep_level)
        with self._exclusive():
            return self._sync(weights, pause_mode, sleep_level, engines, wave_size, ipc,
                              partial)

    def reload_checkpoint(self, path: str | None, *, pause_mode: PauseMode = "abort",
                          engines: Sequence[str] | None = None, partial: bool = False,
                          roots: Sequence[str] | None = None) -> SyncResult:
        """Reload every engine from a safetensors directory (``None``: the original model).

        Every engine first resolves the directory into its files (inside ``roots`` when given)
        and checks their headers against its model: a checkpoint that lacks any of the model's
        tensors is refused unless ``partial``, and nothing changes anywhere (``ManifestError``
        or ``ConfigError``). Each engine then loads exactly the files it checked.
        """
        with self._exclusive():
            targets = self._targets(engines)
            version = self._next_version(targets)
            dl = self.transfer.deadlines
            self._phase("validate")
            refs = {n: self.engines[n].validate_checkpoint.remote(
                        path, partial=partial, roots=roots, deadline_s=dl.verify)
                    for n in targets}
            _raise_refusal(*gather(refs, dl.verify * 1.5))
            self._layout_cache.clear()  # a new checkpoint: engines re-derive and re-verify
            t0 = time.perf_counter()
            fleet = {n: _Engine(n, self.engines[n]) for n in targets}
            self._begin(fleet, None, pause_mode, 0)
            refs = {n: e.actor.reload_from_path.remote(path, dl.reload, partial=partial,
                                                       roots=roots)
                    for n, e in fleet.items()}
            ok, bad = gather(refs, dl.reload * 1.2)
            for n, s in ok.items():
                fleet[n].report.setdefault("seconds", {})["reload"] = s
            result = self._finish(fleet, bad, version, "checkpoint", 0, (), t0)
            return _raise_unless_ok(result.model_copy(update={"partial": partial}))

    def sync_external(self, specs: Sequence[TensorSpec], sender: ExternalSender, *,
                      pause_mode: PauseMode = "abort", sleep_level: int = 0,
                      engines: Sequence[str] | None = None,
                      partial: bool = False) -> SyncResult:
        """Sync weights that ``sender`` broadcasts from outside this process (e.g. a trainer
        reaching the fleet through the control plane).

        Same protocol as ``sync``: the plan is derived here from ``specs``, validated on every
        engine before anything changes, and everything after the transfer (checksums against
        the sender's, staged apply, fingerprints, commit or rollback) is the ``sync`` path.
        """
        _check_sleep_level(sleep_level)
        if not specs:
            raise ConfigError("no tensors to sync")
        with self._exclusive():
            t0 = time.perf_counter()
            targets = self._targets(engines)
            plan = plan_buckets(list(specs), self.transfer.bucket_bytes,
                                self._next_version(targets))
            plan = plan.model_copy(update={"partial": partial})
            result = self._sync_wave(targets, plan, None, pause_mode, sleep_level, False, t0,
                                     external=sender)
            return _raise_unless_ok(result.model_copy(update={"partial": partial}))

    def close(self) -> None:
        """Release the open broadcast group and any IPC buffers (the engines keep running)."""
        self.legs.close_group()
        self.legs.release_ipc_buffers(force=True)

    # ---- the protocol ------------------------------------------------------------------------
    @contextlib.contextmanager
    def _exclusive(self):
        if not self._lock.acquire(blocking=False):
            raise SyncInProgressError("a sync is already running on this fleet")
        try:
            yield
        finally:
            self._lock.release()

    def _next_version(self, targets: Sequence[str]) -> int:
        """One past the highest version any engine or this coordinator has seen, so another
        coordinator (or a restarted trainer) over the same engines never reuses a number.

        Also refuses, before anything is touched, a sync whose targets are in no state to
        begin one (paused, asleep, loading): ``IllegalStateError``, never a fenced engine.
        """
        statuses = self.statuses()
        busy = [s for s in statuses if s.name in targets and s.state not in _CAN_BEGIN]
        if busy:
            raise IllegalStateError(
                f"cannot begin a sync while {busy[0].state.value} (needs serving/fenced); "
                "no engine was touched", engine=busy[0].name)
        self.version = max([self.version, *(s.version for s in statuses)])
        return self.version + 1

    def _kernel_layout(self, names: list[str], tensors: dict) -> tuple[Any, str | None]:
        """The verified kernel layout every target shares, or (None, why not)."""
        from weightsync.transport.layout import KernelLayout

        mode = self.transfer.layout
        if mode == "checkpoint":
            return None, "checkpoint format requested"
        cached = self._layout_cache.get(tuple(sorted(names)))
        if cached is not None:  # verified once; dropped on any failure, reload or restart
            if not {n for p in cached.params for n, _ in p.parts} - set(tensors):
                return cached, None
        refs = {n: self.engines[n].kernel_layout.remote() for n in names}
        ok, bad = gather(refs, self.transfer.deadlines.verify)
        note = None
        if bad:
            note = f"layout query failed on {sorted(bad)}"
        elif not all(r["verified"] for r in ok.values()):
            note = "; ".join(sorted({r["reason"] for r in ok.values() if not r["verified"]}))
        elif len({r["signature"] for r in ok.values()}) != 1:
            note = "engines report different kernel layouts"
        else:
            layout = KernelLayout.model_validate(next(iter(ok.values()))["layout"])
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

    def _sync(self, weights, pause_mode, sleep_level, engines, wave_size, ipc,
              partial) -> SyncResult:
        t0 = time.perf_counter()
        tensors = dict(named_tensors(weights))
        if not tensors:
            raise ConfigError("no tensors to sync")
        targets = self._targets(engines)
        version = self._next_version(targets)
        layout, note = self._kernel_layout(targets, tensors)
        if layout is not None:
            sources = {p.name: [tensors[n] for n, _ in p.parts] for p in layout.params}
            plan = self._kernel_plan(layout, version)
            tensors = sources
        else:
            plan = plan_buckets([spec_of(n, t) for n, t in tensors.items()],
                                self.transfer.bucket_bytes, version)
            plan = plan.model_copy(update={"partial": partial})
        waves = [targets] if not wave_size else [targets[i:i + wave_size]
                                                 for i in range(0, len(targets), wave_size)]
        results = []
        for wave in waves:
            results.append(self._sync_wave(wave, plan, tensors, pause_mode, sleep_level, ipc, t0))
            if not results[-1].ok:  # stop the rollout: later waves keep their old version
                self._layout_cache.clear()
                break
        reports = tuple(r for res in results for r in res.engines)
        result = SyncResult(version=version, ok=all(r.ok for r in reports),
                            mode="ipc" if ipc else "broadcast", layout=plan.format,
                            layout_note=note, nbytes=plan.total_bytes, partial=partial,
                            sender_checksums=results[0].sender_checksums, engines=reports,
                            seconds={"total": time.perf_counter() - t0})
        return _raise_unless_ok(result)

    def _sync_wave(self, names, plan: TransferPlan, tensors, pause_mode, sleep_level, ipc,
                   t0, external: ExternalSender | None = None) -> SyncResult:
        fleet = {n: _Engine(n, self.engines[n]) for n in names}
        plan_json = plan.model_dump_json()
        self._begin(fleet, plan_json, pause_mode, sleep_level)
        dl = self.transfer.deadlines
        self._phase("transfer")
        t = time.perf_counter()
        actors = {n: e.actor for n, e in fleet.items()}
        if external is not None:
            sums, receipts, bad = self.legs.external(actors, plan, plan_json, external)
        elif ipc:
            sums, receipts, bad = self.legs.ipc(actors, plan, plan_json, tensors)
        else:
            group_ids = {n: e.report.get("group_id") for n, e in fleet.items()}
            sums, receipts, bad = self.legs.broadcast(actors, group_ids, plan, plan_json, tensors)
        transfer_s = time.perf_counter() - t
        for n, e in fleet.items():
            e.report.setdefault("seconds", {})["transfer"] = transfer_s
            if n in receipts:
                r = receipts[n]
                e.report.update(checksums=r.checksums, applied=r.applied, nbytes=r.nbytes)
                sub = dict(r.seconds)
                if r.applied and "reload" in sub:  # loaded in the same call (atomic IPC)
                    e.report["seconds"]["reload"] = sub.pop("reload")
                    e.report["seconds"]["transfer"] = transfer_s - e.report["seconds"]["reload"]
                    e.report["seconds"]["transfer+reload"] = transfer_s
                # where the transfer went: the trainer's packing/checksums, the engine's
                # mapping/receiving/checksums (sub-phases, prefixed so totals stay clear)
                e.report["seconds"].update({f"transfer.{k}": v for k, v in
                                            {**(self.legs.trainer_seconds if ipc else {}),
                                             **sub}.items()})
        # verify checksums before anything is applied
        for n, e in fleet.items():
            if n in bad:
                continue
            got = tuple(e.report.get("checksums", ()))
            e.report["checksum_ok"] = got == tuple(sums)
            if got != tuple(sums):
                bad[n] = VerificationError(
                    f"checksums differ from the sender's in bucket(s) "
                    f"{[i for i, (a, b) in enumerate(zip(got, sums)) if a != b] or 'count'}",
                    engine=n)
        if bad and self.transfer.apply == "staged":
            # all-or-nothing: nobody applies; intact engines resume their old version
            return self._fail_all(fleet, bad, plan.version, "ipc" if ipc else "broadcast", sums)
        staged = [n for n in fleet if n not in bad and not fleet[n].report.get("applied")]
        if staged:
            self._phase("reload")
            refs = {n: fleet[n].actor.apply_staged.remote(dl.reload) for n in staged}
            ok, bad2 = gather(refs, dl.reload * 1.2)
            bad.update(bad2)
            loaded = time.perf_counter() - t  # trainer's wall time: transfer start -> loaded
            for n, s in ok.items():
                fleet[n].report["seconds"]["reload"] = s
                fleet[n].report["seconds"]["transfer+reload"] = loaded
        return self._finish(fleet, bad, plan.version, "ipc" if ipc else "broadcast",
                            sleep_level, tuple(sums), t0)

    def _begin(self, fleet: dict[str, _Engine], plan_json, pause_mode, sleep_level) -> None:
        """Validate + pause (+ sleep/wake weights) everywhere; a bad manifest changes nothing."""
        dl = self.transfer.deadlines
        if plan_json is not None:  # validate everywhere before touching any engine
            self._phase("validate")
            refs = {n: e.actor.validate.remote(plan_json) for n, e in fleet.items()}
            _raise_refusal(*gather(refs, dl.verify))  # nothing was touched anywhere
        self._phase("pause")
        refs = {n: e.actor.begin_sync.remote(pause_mode=pause_mode,
                                             sleep_level=sleep_level,
                                             deadline_s=max(dl.pause, dl.sleep))
                for n, e in fleet.items()}
        ok, bad = gather(refs, dl.pause + 2 * dl.sleep)
        for n, r in ok.items():
            fleet[n].report.update(seconds=dict(r["seconds"]), skipped=tuple(r["skipped"]),
                                   group_id=r.get("group_id"))
        refused = {n: e for n, e in bad.items() if isinstance(e, IllegalStateError)}
        if refused:  # those engines were not touched: leave them as they are, undo the rest
            self._abort(fleet, {n: e for n, e in bad.items() if n not in refused}, "begin",
                        rollback=set(ok))
            raise next(iter(refused.values()))
        if bad:
            self._abort(fleet, bad, "begin", rollback=set(ok))
            raise SyncFailedError(f"could not begin the sync on {sorted(bad)}: "
                                  + "; ".join(str(e) for e in bad.values()),
                                  engine=next(iter(bad)))

    def _finish(self, fleet, bad, version, mode, sleep_level, sums, t0) -> SyncResult:
        """Reset caches + fingerprint on engines that loaded, verify agreement, commit."""
        self.legs.release_ipc_buffers()  # every engine has applied: free them before wake_kv
        dl = self.transfer.deadlines
        live = {n: e for n, e in fleet.items() if n not in bad}
        self._phase("verify")
        refs = {n: e.actor.finish_load.remote(dl.verify) for n, e in live.items()}
        ok, bad2 = gather(refs, dl.verify * 1.5)
        bad.update(bad2)
        for n, r in ok.items():
            fleet[n].report["seconds"].update(r["seconds"])
            fleet[n].report["fingerprint"] = r["fingerprint"]
        prints = {n: r["fingerprint"] for n, r in ok.items()}
        if len(set(prints.values())) > 1:  # engines disagree: fence all but the majority
            values = list(prints.values())
            major = max(set(values), key=values.count)
            for n, p in prints.items():
                if p != major:
                    bad[n] = VerificationError("loaded weights differ from the rest of the fleet",
                                               engine=n)
        self._phase("resume")
        refs = {n: fleet[n].actor.commit.remote(version, dl.resume) for n in fleet if n not in bad}
        ok, bad3 = gather(refs, dl.resume + dl.wake)
        bad.update(bad3)
        for n, s in ok.items():
            fleet[n].report["seconds"].update(s)
        self._abort(fleet, bad, "finish")
        return self._result(fleet, bad, set(), version, mode, sums, t0)

    def _fail_all(self, fleet, bad, version, mode, sums) -> SyncResult:
        """Staged all-or-nothing: nobody applies. A broken group fails every receiver, so the
        engines cannot be blamed one by one here; each host rolls back if its weights are
        intact and fences itself otherwise. Engines that died or cannot answer stay failed."""
        # engines that are gone or silent are at fault; the others answered with the error
        # they saw (a broken group, a timed-out bucket) and decide their own fate
        culprits = {n: e for n, e in bad.items()
                    if isinstance(e, (EngineDeadError, EngineUnresponsive))}
        refs = {n: fleet[n].actor.abort_sync.remote(
                    f"transfer: {bad.get(n) or 'another engine failed'}",
                    self.transfer.deadlines.resume, fence=False)
                for n in fleet}
        ok, unreachable = gather(refs, self.transfer.deadlines.resume * 1.5)
        failed = {**culprits, **unreachable}
        failed.update({n: bad[n] for n, st in ok.items()
                       if st.state == EngineState.FENCED and n in bad})
        rolled_back = {n for n in fleet if n not in failed}
        for n in rolled_back:
            if n in bad:
                fleet[n].report["error"] = str(bad[n])
        return self._result(fleet, failed, rolled_back, version, mode, tuple(sums), None)

    def _abort(self, fleet, bad: dict, stage: str, rollback: set[str] = frozenset()) -> None:
        """Fence engines in ``bad``; engines in ``rollback`` resume on their old weights."""
        refs = {n: fleet[n].actor.abort_sync.remote(f"{stage}: {err}", self.transfer.deadlines.resume,
                                                   fence=True)
                for n, err in bad.items()}
        refs.update({n: fleet[n].actor.abort_sync.remote(f"{stage}: another engine failed",
                                                          self.transfer.deadlines.resume,
                                                          fence=False)
                     for n in rollback})
        if refs:
            gather(refs, self.transfer.deadlines.resume * 1.5)

    def _result(self, fleet, bad, rolled_back, version, mode, sums, t0) -> SyncResult:
        reports = []
        for n, e in fleet.items():
            r, err = e.report, bad.get(n)
            took = n not in bad and n not in rolled_back
            reports.append(EngineSyncReport(
                engine=n, ok=took, version=version if took else self._engine_version(n),
                seconds=r.get("seconds", {}), skipped=tuple(r.get("skipped", ())),
                nbytes=r.get("nbytes", 0), checksum_ok=r.get("checksum_ok"),
                fingerprint=r.get("fingerprint"),
                error=str(err) if err else (f"rolled back: {r.get('error', 'another engine failed')}"
                                            if n in rolled_back else None),
                fenced=err is not None,
            ))
        for rep in reports:
            self.metrics.observe(rep, mode)
        if any(r.ok for r in reports):  # every routable engine that took it verified it
            self.version = max(self.version, version)
        return SyncResult(version=version, ok=all(r.ok for r in reports), mode=mode,
                          nbytes=max((r.nbytes for r in reports), default=0),
                          sender_checksums=tuple(sums), engines=tuple(reports),
                          seconds={"total": time.perf_counter() - t0} if t0 else {})

    def _engine_version(self, name: str) -> int:
        try:
            return ray.get(self.engines[name].status.remote(), timeout=5).version
        except Exception:  # noqa: BLE001 - dead engine
            return -1
