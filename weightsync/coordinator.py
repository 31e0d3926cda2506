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

import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import ray

from weightsync.config import TransferConfig
from weightsync.errors import (ConfigError, EngineDeadError, EngineError, EngineUnresponsive,
                               ManifestError, SyncFailedError, SyncInProgressError,
                               TransferError, VerificationError, WeightSyncError)
from weightsync.metrics import SyncMetrics
from weightsync.transport.broadcast import BroadcastSender, free_port, open_group
from weightsync.transport.packing import named_tensors, pack_bucket, plan_buckets, spec_of
from weightsync.types import (EngineState, EngineStatus, EngineSyncReport, PauseMode, SyncResult,
                              TensorSpec, TransferPlan)

logger = logging.getLogger(__name__)

PhaseHook = Callable[[str, str | None], None]  # (phase, engine or None)


class ExternalSender(Protocol):
    """The far end of ``SyncCoordinator.sync_external``: a sender in another process (a trainer
    outside the Ray cluster) that hosts the group as rank 0 and broadcasts the plan."""

    address: tuple[str, int]  # where rank 0 hosts the group's store

    def ready(self, plan: TransferPlan, world_size: int) -> None:
        """The engines are joining ``address``: the sender may open the group and send."""

    def wait_checksums(self, timeout: float) -> list[int]:
        """The sender's per-bucket checksums once it sent everything; raises a
        ``WeightSyncError`` if it failed, aborted, or did not finish within ``timeout``."""


def _unwrap(e: BaseException) -> WeightSyncError:
    """Ray wraps remote exceptions; surface our typed error (or a typed stand-in)."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, WeightSyncError):
        return cause
    if isinstance(e, WeightSyncError):
        return e
    if isinstance(e, ray.exceptions.RayActorError):
        return EngineDeadError(f"engine actor died: {type(e).__name__}")
    text = str(cause or e)
    if "ManifestError" in text:
        return ManifestError(text.splitlines()[-1])
    return EngineError(f"{type(e).__name__}: {text.splitlines()[-1] if text else ''}")


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
        self._group: tuple[tuple[str, ...], str, BroadcastSender] | None = None
        self._ipc_keepalive: list[Any] | None = None  # this sync's CUDA-IPC buckets

    # ---- helpers ---------------------------------------------------------------------------
    def _phase(self, phase: str, engine: str | None = None) -> None:
        if self.on_phase is not None:
            self.on_phase(phase, engine)

    def _gather(self, refs: dict[str, Any], timeout: float) -> tuple[dict, dict]:
        """Wait for one ref per engine; returns (results, errors) — never raises, never hangs."""
        ok: dict[str, Any] = {}
        bad: dict[str, WeightSyncError] = {}
        end = time.monotonic() + timeout
        for name, ref in refs.items():
            try:
                ok[name] = ray.get(ref, timeout=max(0.0, end - time.monotonic()))
            except ray.exceptions.GetTimeoutError:
                bad[name] = EngineUnresponsive(f"no answer within {timeout:.1f}s", engine=name)
            except Exception as e:  # noqa: BLE001 - classified by _unwrap
                err = _unwrap(e)
                err.engine = err.engine or name
                bad[name] = err
        return ok, bad

    def statuses(self) -> list[EngineStatus]:
        refs = {n: a.status.remote() for n, a in self.engines.items()}
        ok, bad = self._gather(refs, self.transfer.deadlines.verify)
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
        self.close_group()

    # ---- public API ------------------------------------------------------------------------
    def sync(self, weights: Any, *, pause_mode: PauseMode = "abort", sleep_level: int = 0,
             engines: Sequence[str] | None = None, wave_size: int | None = None,
             ipc: bool = False) -> SyncResult:
        """Sync ``weights`` (module, state dict or iterable of ``(name, tensor)``) to the fleet.

        ``wave_size`` turns on rolling mode: engines update a wave at a time while the others
        keep serving. ``ipc=True`` shares CUDA buckets with colocated engines instead of
        broadcasting. Raises ``SyncFailedError`` (with ``.result``) if any engine failed,
        ``ManifestError`` if the weights do not fit the model (nothing changed anywhere).
        """
        if sleep_level not in (0, 1, 2):
            raise ConfigError(f"sleep_level must be 0, 1 or 2, not {sleep_level}")
        if not self._lock.acquire(blocking=False):
            raise SyncInProgressError("a sync is already running on this fleet")
        try:
            return self._sync(weights, pause_mode, sleep_level, engines, wave_size, ipc)
        finally:
            self._lock.release()

    def reload_checkpoint(self, path: str | None, *, pause_mode: PauseMode = "abort",
                          engines: Sequence[str] | None = None) -> SyncResult:
        """Reload every engine from a safetensors directory (``None``: the original model)."""
        if not self._lock.acquire(blocking=False):
            raise SyncInProgressError("a sync is already running on this fleet")
        try:
            version = self._next_version()
            targets = self._targets(engines)
            t0 = time.perf_counter()
            fleet = {n: _Engine(n, self.engines[n]) for n in targets}
            self._begin(fleet, None, pause_mode, 0)
            dl = self.transfer.deadlines
            refs = {n: e.actor.reload_from_path.remote(path, dl.reload) for n, e in fleet.items()}
            ok, bad = self._gather(refs, dl.reload * 1.2)
            for n, s in ok.items():
                fleet[n].report.setdefault("seconds", {})["reload"] = s
            result = self._finish(fleet, bad, version, "checkpoint", 0, (), t0)
            if not result.ok:
                raise SyncFailedError(f"reload to version {version} failed on {result.failed}",
                                      result=result)
            return result
        finally:
            self._lock.release()

    def sync_external(self, specs: Sequence[TensorSpec], sender: ExternalSender, *,
                      pause_mode: PauseMode = "abort", sleep_level: int = 0,
                      engines: Sequence[str] | None = None) -> SyncResult:
        """Sync weights that ``sender`` broadcasts from outside this process (e.g. a trainer
        reaching the fleet through the control plane).

        Same protocol as ``sync``: the plan is derived here from ``specs``, validated on every
        engine before anything changes, and everything after the transfer (checksums against
        the sender's, staged apply, fingerprints, commit or rollback) is the ``sync`` path.
        """
        if sleep_level not in (0, 1, 2):
            raise ConfigError(f"sleep_level must be 0, 1 or 2, not {sleep_level}")
        if not specs:
            raise ConfigError("no tensors to sync")
        if not self._lock.acquire(blocking=False):
            raise SyncInProgressError("a sync is already running on this fleet")
        try:
            t0 = time.perf_counter()
            plan = plan_buckets(list(specs), self.transfer.bucket_bytes, self.version + 1)
            result = self._sync_wave(self._targets(engines), plan, None, pause_mode, sleep_level,
                                     False, t0, external=sender)
            if not result.ok:
                raise SyncFailedError(f"sync to version {plan.version} failed on {result.failed}",
                                      result=result)
            return result
        finally:
            self._lock.release()

    # ---- the protocol ------------------------------------------------------------------------
    def _next_version(self) -> int:
        """One past the highest version any engine or this coordinator has seen, so another
        coordinator (or a restarted trainer) over the same engines never reuses a number."""
        seen = [s.version for s in self.statuses()]
        self.version = max([self.version, *seen])
        return self.version + 1

    def _kernel_layout(self, names: list[str], tensors: dict) -> tuple[Any, str | None]:
        """The verified kernel layout every target shares, or (None, why not)."""
        from weightsync.transport.layout import KernelLayout

        mode = self.transfer.layout
        if mode == "checkpoint":
            return None, "checkpoint format requested"
        refs = {n: self.engines[n].kernel_layout.remote() for n in names}
        ok, bad = self._gather(refs, self.transfer.deadlines.verify)
        note = None
        if bad:
            note = f"layout query failed on {sorted(bad)}"
        elif not all(r["verified"] for r in ok.values()):
            note = "; ".join(sorted({r["reason"] for r in ok.values() if not r["verified"]}))
        elif len({r["signature"] for r in ok.values()}) != 1:
            note = "engines report different kernel layouts"
        else:
            layout = KernelLayout.model_validate(next(iter(ok.values()))["layout"])
            missing = {n for p in layout.params for n, _ in p.parts} - set(tensors)
            if not missing:
                return layout, None
            note = f"partial update ({len(missing)} checkpoint tensors not sent)"
        if mode == "kernel":
            raise ConfigError(f"kernel layout unavailable: {note}")
        return None, note

    def _targets(self, engines: Sequence[str] | None) -> list[str]:
        names = list(engines) if engines else list(self.engines)
        unknown = [n for n in names if n not in self.engines]
        if unknown:
            raise ConfigError(f"unknown engine(s): {unknown}")
        return names

    def _sync(self, weights, pause_mode, sleep_level, engines, wave_size, ipc) -> SyncResult:
        t0 = time.perf_counter()
        tensors = dict(named_tensors(weights))
        if not tensors:
            raise ConfigError("no tensors to sync")
        version = self._next_version()
        targets = self._targets(engines)
        layout, note = self._kernel_layout(targets, tensors)
        if layout is not None:
            sources = {p.name: [tensors[n] for n, _ in p.parts] for p in layout.params}
            plan = plan_buckets([layout.spec(p) for p in layout.params],
                                self.transfer.bucket_bytes, version).model_copy(
                                    update={"format": "kernel"})
            tensors = sources
        else:
            plan = plan_buckets([spec_of(n, t) for n, t in tensors.items()],
                                self.transfer.bucket_bytes, version)
        waves = [targets] if not wave_size else [targets[i:i + wave_size]
                                                 for i in range(0, len(targets), wave_size)]
        results = [self._sync_wave(w, plan, tensors, pause_mode, sleep_level, ipc, t0)
                   for w in waves]
        reports = tuple(r for res in results for r in res.engines)
        result = SyncResult(version=version, ok=all(r.ok for r in reports),
                            mode="ipc" if ipc else "broadcast", layout=plan.format,
                            layout_note=note, nbytes=plan.total_bytes,
                            sender_checksums=results[0].sender_checksums, engines=reports,
                            seconds={"total": time.perf_counter() - t0})
        if not result.ok:
            raise SyncFailedError(f"sync to version {version} failed on {result.failed}",
                                  result=result)
        return result

    def _sync_wave(self, names, plan: TransferPlan, tensors, pause_mode, sleep_level, ipc,
                   t0, external: ExternalSender | None = None) -> SyncResult:
        fleet = {n: _Engine(n, self.engines[n]) for n in names}
        plan_json = plan.model_dump_json()
        self._begin(fleet, plan_json, pause_mode, sleep_level)
        dl = self.transfer.deadlines
        self._phase("transfer")
        t = time.perf_counter()
        if external is not None:
            sums, bad = self._transfer_external(fleet, plan, plan_json, external)
        elif ipc:
            sums, bad = self._transfer_ipc(fleet, plan, plan_json, tensors)
        else:
            sums, bad = self._transfer_broadcast(fleet, plan, plan_json, tensors)
        transfer_s = time.perf_counter() - t
        for e in fleet.values():
            e.report.setdefault("seconds", {})["transfer"] = transfer_s
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
            ok, bad2 = self._gather(refs, dl.reload * 1.2)
            bad.update(bad2)
            for n, s in ok.items():
                fleet[n].report["seconds"]["reload"] = s
        return self._finish(fleet, bad, plan.version, "ipc" if ipc else "broadcast",
                            sleep_level, tuple(sums), t0)

    def _begin(self, fleet: dict[str, _Engine], plan_json, pause_mode, sleep_level) -> None:
        """Validate + pause (+ sleep/wake weights) everywhere; a bad manifest changes nothing."""
        dl = self.transfer.deadlines
        if plan_json is not None:  # validate everywhere before touching any engine
            self._phase("validate")
            refs = {n: e.actor.validate.remote(plan_json) for n, e in fleet.items()}
            _, bad = self._gather(refs, dl.verify)
            if bad:  # nothing was touched anywhere: report the most specific error
                manifest = [e for e in bad.values() if isinstance(e, ManifestError)]
                raise manifest[0] if manifest else next(iter(bad.values()))
        self._phase("pause")
        refs = {n: e.actor.begin_sync.remote(plan_json=None, pause_mode=pause_mode,
                                             sleep_level=sleep_level,
                                             deadline_s=max(dl.pause, dl.sleep))
                for n, e in fleet.items()}
        ok, bad = self._gather(refs, dl.pause + 2 * dl.sleep)
        for n, r in ok.items():
            fleet[n].report.update(seconds=dict(r["seconds"]), skipped=tuple(r["skipped"]),
                                   group_id=r.get("group_id"))
        if bad:
            self._abort(fleet, bad, "begin", rollback=set(ok))
            raise SyncFailedError(f"could not begin the sync on {sorted(bad)}: "
                                  + "; ".join(str(e) for e in bad.values()),
                                  engine=next(iter(bad)))

    def _group_for(self, fleet) -> tuple[BroadcastSender | None, dict]:
        """The broadcast group for ``fleet``: the open one when every member still reports it
        (saves a rendezvous, and NCCL communicator setup, per sync), else a new one."""
        dl, cfg = self.transfer.deadlines, self.transfer
        members = tuple(fleet)
        cached = self._group
        if cached and cached[0] == members and all(
                fleet[n].report.get("group_id") == cached[1] for n in fleet):
            return cached[2], {}
        self.close_group()
        group_id = uuid.uuid4().hex
        world = 1 + len(fleet)
        port = free_port(cfg.host, cfg.port)
        joins = {n: e.actor.join_group.remote(cfg.backend, cfg.host, port, 1 + i, world,
                                              dl.rendezvous, group_id)
                 for i, (n, e) in enumerate(fleet.items())}
        try:
            sender = BroadcastSender(open_group(cfg.backend, cfg.host, port, 0, world,
                                                dl.rendezvous))
        except WeightSyncError as e:
            _, bad = self._gather(joins, dl.rendezvous * 0.5)
            return None, bad or {n: TransferError(f"rendezvous failed: {e}", engine=n)
                                 for n in fleet}
        _, bad = self._gather(joins, dl.rendezvous)
        if bad:
            sender.close()
            return None, bad
        self._group = (members, group_id, sender)
        return sender, {}

    def close_group(self) -> None:
        """Tear down the open broadcast group (engines leave theirs on their next sync)."""
        if self._group is not None:
            self._group[2].close()
            self._group = None

    def _transfer_broadcast(self, fleet, plan, plan_json, tensors) -> tuple[list[int], dict]:
        dl, cfg = self.transfer.deadlines, self.transfer
        sender, bad = self._group_for(fleet)
        sums: list[int] = []
        if sender is None:
            return sums, bad
        recvs = {n: e.actor.receive.remote(plan_json, cfg.apply, dl.transfer)
                 for n, e in fleet.items()}
        send_error: WeightSyncError | None = None
        try:
            sums = sender.send(plan, tensors, dl.transfer,
                               on_bucket=lambda i: self._phase(f"bucket:{i}"))
        except WeightSyncError as e:
            send_error = e
            self.close_group()  # break the group so receivers fail fast instead of waiting
        ok, bad = self._gather(recvs, dl.transfer * 1.6)
        for n, r in ok.items():
            fleet[n].report.update(checksums=r["checksums"], applied=r["applied"],
                                   nbytes=r["nbytes"])
        if bad:
            self.close_group()  # never reuse a group that failed anyone
        if send_error is not None:
            logger.error("broadcast of version %d failed: %s; engines at fault: %s",
                         plan.version, send_error, sorted(bad) or "unknown")
            if not bad:  # nobody else failed: the sender itself is at fault
                bad = {n: TransferError(f"sender failed: {send_error}", engine=n) for n in fleet}
        return sums, bad

    def _transfer_ipc(self, fleet, plan, plan_json, tensors) -> tuple[list[int], dict]:
        import json

        import torch

        from weightsync.transport.ipc import share_bucket
        from weightsync.transport.packing import checksum

        self._release_ipc_buffers()  # left over from a sync that failed
        device = torch.device("cuda", torch.cuda.current_device())
        bufs = [pack_bucket(b, tensors, device) for b in plan.buckets]
        torch.cuda.synchronize(device)
        sums = [checksum(b) for b in bufs]
        handles = json.dumps([share_bucket(i, b).model_dump(mode="json") for i, b in enumerate(bufs)])
        refs = {n: e.actor.receive.remote(plan_json, self.transfer.apply,
                                          self.transfer.deadlines.transfer, handles)
                for n, e in fleet.items()}
        ok, bad = self._gather(refs, self.transfer.deadlines.transfer * 1.6)
        for n, r in ok.items():
            fleet[n].report.update(checksums=r["checksums"], applied=r["applied"], nbytes=r["nbytes"])
        # staged IPC views point at our buffers: keep them alive until applied or dropped
        self._ipc_keepalive = bufs
        return sums, bad

    def _release_ipc_buffers(self) -> None:
        """Hand this sync's IPC buckets back to the device once every engine applied (or
        dropped) them — before any engine wakes its KV cache into the same GPU."""
        if self._ipc_keepalive is None:
            return
        import torch

        self._ipc_keepalive = None
        torch.cuda.ipc_collect()  # blocks the engines released are freed only now
        torch.cuda.empty_cache()

    def _transfer_external(self, fleet, plan, plan_json, sender: ExternalSender
                           ) -> tuple[list[int], dict]:
        """Engines join the group an outside sender hosts; its checksums come back by call."""
        dl, cfg = self.transfer.deadlines, self.transfer
        world = 1 + len(fleet)
        host, port = sender.address
        joins = {n: e.actor.join_group.remote(cfg.backend, host, port, 1 + i, world,
                                              dl.rendezvous)
                 for i, (n, e) in enumerate(fleet.items())}
        sender.ready(plan, world)
        _, bad = self._gather(joins, dl.rendezvous * 1.2)
        if bad:  # the sync fails whatever the sender says: do not wait for it
            return [], bad
        recvs = {n: e.actor.receive.remote(plan_json, cfg.apply, dl.transfer)
                 for n, e in fleet.items()}
        ok, bad = self._gather(recvs, dl.transfer * 1.6)
        for n, r in ok.items():
            fleet[n].report.update(checksums=r["checksums"], applied=r["applied"],
                                   nbytes=r["nbytes"])
        if bad:
            return [], bad
        try:
            return sender.wait_checksums(dl.transfer), bad
        except WeightSyncError as e:
            logger.error("external sender of version %d failed: %s", plan.version, e)
            return [], {n: TransferError(f"sender failed: {e}", engine=n) for n in fleet}

    def _finish(self, fleet, bad, version, mode, sleep_level, sums, t0) -> SyncResult:
        """Reset caches + fingerprint on engines that loaded, verify agreement, commit."""
        self._release_ipc_buffers()  # every engine has applied: free them before wake_kv
        dl = self.transfer.deadlines
        live = {n: e for n, e in fleet.items() if n not in bad}
        self._phase("verify")
        refs = {n: e.actor.finish_load.remote(dl.verify) for n, e in live.items()}
        ok, bad2 = self._gather(refs, dl.verify * 1.5)
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
        ok, bad3 = self._gather(refs, dl.resume + dl.wake)
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
        ok, unreachable = self._gather(refs, self.transfer.deadlines.resume * 1.5)
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
            self._gather(refs, self.transfer.deadlines.resume * 1.5)

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
