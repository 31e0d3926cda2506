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
``weightsync.transport.legs``; it never branches on the kind of either. It is composed of the
parts in ``weightsync.coordination``, each owning its state: the version book, the layout
negotiator, one ``SyncAttempt`` per sync (or wave), the colocated loop's sleep and wake.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from weightsync.adapters import AdapterFleetResult, AdapterPacker, AdapterPayload, AdapterState
from weightsync.config import TransferConfig
from weightsync.coordination.adapter_flip import AdapterFlip
from weightsync.coordination.attempt import SyncAttempt
from weightsync.coordination.colocation import Colocation
from weightsync.coordination.layout import LayoutNegotiator
from weightsync.coordination.reach import PhaseHook, Reach, raise_refusal
from weightsync.coordination.states import FleetStatuses
from weightsync.coordination.versions import VersionBook
from weightsync.errors import (
    ConfigError,
    IllegalStateError,
    ManifestError,
    SyncFailedError,
    SyncInProgressError,
    TransferError,
    WeightSyncError,
)
from weightsync.heartbeat import Heartbeat
from weightsync.metrics import SyncMetrics
from weightsync.remote import Engines, Pending, RayEngines
from weightsync.sources import as_source
from weightsync.transport.legs import sender_leg
from weightsync.transport.legs.base import LegOutcome, SenderLeg
from weightsync.transport.legs.external import ExternalSender
from weightsync.transport.packing import plan_buckets
from weightsync.types import (
    Canary,
    EngineStatus,
    PauseMode,
    SleepResult,
    SyncResult,
    TensorSpec,
    TransferPlan,
)

__all__ = ["ExternalSender", "SyncCoordinator"]

logger = logging.getLogger(__name__)


def _check_sleep_level(level: int) -> None:
    if level not in (0, 1, 2):
        raise ConfigError(f"sleep_level must be 0, 1 or 2, not {level}")


def _raise_unless_ok(result: SyncResult) -> SyncResult:
    """``result``, or ``SyncFailedError`` naming each failed engine, what became of it and
    why (the error as the engine reported it, cut at 500 characters)."""
    if not result.ok:
        why = "; ".join(
            f"{e.engine} ({'fenced' if e.fenced else 'not fenced'}): {(e.error or '?')[:500]}"
            for e in result.engines if not e.ok)
        raise SyncFailedError(f"sync to version {result.version} failed on {result.failed}: "
                              f"{why}", result=result)
    return result


class SyncCoordinator:
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
        statuses: list[EngineStatus] | None = None
        if isinstance(engines, Sequence):
            if not engines:
                raise ConfigError("a coordinator needs at least one engine")
            engines, statuses = RayEngines.connect(engines, self.transfer.deadlines.verify)
        self.access = engines.signed(self.owner)  # every step of a sync signed as ours
        self._reach = Reach(self.access, self.transfer, self._phase)
        self._statuses = FleetStatuses(self.access, self.transfer.deadlines.verify)
        statuses = statuses if statuses is not None else self.statuses()
        self._beat = Heartbeat(self.access, self.transfer.deadlines.lease)
        self._book = VersionBook(self.owner, max(s.version for s in statuses))
        self._plans = LayoutNegotiator(self._reach)
        self._colocation = Colocation(self._reach, self._statuses, self._book, self._beat)
        self._adapters = AdapterFlip(self._reach, self._leg)
        self._packers: dict[str, AdapterPacker] = {}  # by adapter name: its peft model's
        self._lock = threading.Lock()
        self._legs: dict[str, SenderLeg] = {}
        self._takeover = False  # the sync in progress may take engines from a silent owner

    @property
    def engines(self) -> dict[str, Any]:
        """Engine name -> handle."""
        return self.access.handles

    @property
    def version(self) -> int:
        """The latest version published: every routable engine that took it verified it."""
        return self._book.published

    def _phase(self, phase: str, engine: str | None = None) -> None:
        if self.on_phase is not None:
            self.on_phase(phase, engine)

    def _leg(self, name: str) -> SenderLeg:
        if name not in self._legs:
            self._legs[name] = sender_leg(name)(self.transfer, self.access,
                                                lambda i: self._phase(f"bucket:{i}"))
        return self._legs[name]

    def statuses(self, asked: Mapping[str, Pending[EngineStatus]] | None = None
                 ) -> list[EngineStatus]:
        """Every engine's status; one that does not answer shows as stopped."""
        return self._statuses.collect(asked)

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
        self._plans.forget(name)  # its layout and model may differ
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
            raise_refusal(refused)
            if len(set(checked.values())) != 1:  # a file changed between engines' reads
                # (each engine closes the files it kept at its next check or reload)
                raise ManifestError("the checkpoint's files changed while the engines checked "
                                    "them (they read different files); nothing was loaded")
            self._plans.forget_layouts()  # a new checkpoint: engines re-derive and re-verify
            t0 = time.perf_counter()
            attempt = SyncAttempt(self._reach, targets, version, "checkpoint", self.statuses)
            with self._beat.syncing(targets):  # (see _sync_wave)
                self._begin(attempt, None, pause_mode, 0)
                bad = attempt.reload(path, partial, roots, next(iter(checked.values())))
                result = self._settled(attempt.finish(bad, (), t0, partial))
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

    def sync_adapter(self, adapter: AdapterPayload | Any, *, name: str | None = None,
                     engines: Sequence[str] | None = None, leg: str | None = None,
                     wave_size: int | None = None) -> AdapterFleetResult:
        """Sync a LoRA adapter to the fleet as its next version ``<name>@v<N>``, all or
        nothing: ``adapter`` an ``AdapterPayload`` or a peft model (then ``name`` is
        required). N is 1 + the highest version of the name on any engine; every engine
        stages vN (loaded, not served), then all commit (``<name>`` resolves to vN) or, if
        any refused or failed, all abort and ``AdapterSyncFailedError`` names them: ``<name>``
        stays on v(N-1) everywhere (``coordination.adapter_flip``, which also says what a
        commit failing part-way leaves).

        The bytes travel in the engine calls (Ray's object store) or, ``leg="broadcast"``,
        over the coordinator's transfer group with every engine's workers (a broadcast, or a
        chain per ``TransferConfig.broadcast``), opened for the first sync that needs it and
        shared with full syncs, or, ``leg="ipc"``, as one CUDA IPC share on the trainer's GPU
        that colocated engines map (a peft model's adapter is packed there).

        Engines asleep for this coordinator (``sleep`` level 1) take the adapter with their
        weights woken and serve from the commit on, as after a full sync; level 2 discarded
        the base the adapter needs, so they refuse it (``IllegalStateError``).

        ``wave_size`` turns on rolling mode: vN flips that many engines at a time, each wave
        all or nothing; a failed wave stops the rollout, leaving the waves before it on vN and
        the rest on v(N-1) (``AdapterSyncFailedError`` says which)."""
        if isinstance(adapter, AdapterPayload):
            if name is not None and name != adapter.manifest.name:
                raise ConfigError(f"name {name!r} differs from the payload's "
                                  f"{adapter.manifest.name!r}")
            payload = adapter
        elif name is None:
            raise ConfigError("sync_adapter of a peft model needs its name")
        else:
            import torch

            ipc = leg == "ipc" and torch.cuda.is_available()  # packed where it is shared
            payload = self._packer(name, adapter).pack(
                torch.device("cuda", torch.cuda.current_device()) if ipc else "cpu")
        with self._exclusive():
            return self._adapters.run(self._targets(engines), payload, leg, wave_size)

    def _packer(self, name: str, model: Any) -> AdapterPacker:
        """The packer of ``name``'s peft model (``adapters.AdapterPacker``), made for the
        first sync of that model under that name and kept while it is the model synced."""
        packer = self._packers.get(name)
        if packer is None or packer.model is not model:
            packer = self._packers[name] = AdapterPacker(name, model)
        return packer

    def adapter_states(self, engines: Sequence[str] | None = None) -> dict[str, AdapterState]:
        """What each engine holds of its LoRA adapters (``EngineHost.adapter_state``)."""
        e, dl = self.access, self.transfer.deadlines
        states, bad = e.each(self._targets(engines), lambda n: e.adapter_state(n, dl.verify),
                             dl.verify * 1.5)
        raise_refusal(bad)
        return dict(sorted(states.items()))

    def sleep(self, level: int = 1, *, engines: Sequence[str] | None = None,
              pause_mode: PauseMode = "abort") -> SleepResult:
        """Put the engines to sleep so the trainer can use their device memory: level 1
        offloads the weights to host memory, level 2 discards them (the next ``sync`` brings
        new ones); both release the KV cache. The next ``sync`` goes straight into the
        sleeping engines (wake weights -> transfer -> reload -> verify -> wake KV cache ->
        resume); ``wake`` wakes them without one.

        Every target must be serving or paused, or nothing is touched
        (``IllegalStateError``). The engines stay this coordinator's while it lives (its
        heartbeat renews their lease); if its process dies they serve again (level 1) or stay
        asleep fenced (level 2). On CPU, where vLLM has no sleep mode, engines only pause and
        each report says why nothing was freed."""
        if level not in (1, 2):
            raise ConfigError(f"sleep level must be 1 or 2, not {level}")
        with self._exclusive():
            return self._colocation.sleep(self._targets(engines), level, pause_mode)

    def wake(self, *, engines: Sequence[str] | None = None,
             tags: Sequence[str] | None = None) -> list[EngineStatus]:
        """Wake sleeping engines without a sync (``tags``: "weights" and/or "kv_cache"; all
        when None). They serve once both are awake; weights that sleep level 2 discarded
        cannot be served, so such an engine is fenced until a sync."""
        with self._exclusive():
            return self._colocation.wake(self._targets(engines), tags)

    def close(self) -> None:
        """Release what the legs keep across syncs (groups, IPC buffers) and stop renewing
        leases; engines keep running (any still asleep for this coordinator wake, or stay
        fenced without weights, once their lease lapses)."""
        for leg in self._legs.values():
            leg.close()
        self._beat.close()

    # ---- the protocol ------------------------------------------------------------------------
    @contextlib.contextmanager
    def _exclusive(self, takeover: bool = False) -> Iterator[None]:
        if not self._lock.acquire(blocking=False):
            raise SyncInProgressError("a sync is already running on this fleet")
        self._takeover = takeover
        try:
            yield
        finally:
            self._takeover = False
            self._lock.release()

    def _next_version(self, targets: Sequence[str],
                      asked: Mapping[str, Pending[EngineStatus]] | None = None) -> int:
        """``VersionBook.next`` from every engine's status (``asked``: already asked)."""
        statuses = self.statuses(asked)
        version = self._book.next(statuses, targets, self._takeover)
        self._plans.saw(statuses)
        return version

    def _targets(self, engines: Sequence[str] | None) -> list[str]:
        names = list(engines) if engines else list(self.engines)
        unknown = [n for n in names if n not in self.engines]
        if unknown:
            raise ConfigError(f"unknown engine(s): {unknown}")
        return names

    def _settled(self, result: SyncResult) -> SyncResult:
        """A sync (or wave) ended: metrics, the heartbeat (engines that took it are awake and
        serving) and the version book (published if any routable engine took it)."""
        for rep in result.engines:
            self.metrics.observe(rep, result.mode)
        self._beat.sleeping([r.engine for r in result.engines if r.ok], False)
        self._book.publish(result)
        return result

    def _sync(self, weights: Any, pause_mode: PauseMode, sleep_level: int,
              engines: Sequence[str] | None, wave_size: int | None, leg: str, partial: bool,
              canary: Canary | None = None) -> SyncResult:
        t0 = time.perf_counter()
        targets = self._targets(engines)
        # the colocated loop: every target asleep for this trainer, trusted without asking
        held = self._book.trust_held and not self._takeover and \
            self._beat.holds_asleep(targets)
        # the engines answer while the trainer's side is described
        asked = None if held else self._statuses.ask()
        source = as_source(weights)  # metadata first: no tensor is read before the plan
        specs = source.specs()
        if not specs:
            raise ConfigError("no tensors to sync")
        self._leg(leg)  # an unknown leg is a ConfigError before anything is touched
        version = self._book.next_held() if held else self._next_version(targets, asked)
        plan, tensors, note = self._plans.plan(targets, source, specs, version, partial)
        waves = [targets] if not wave_size else [targets[i:i + wave_size]
                                                 for i in range(0, len(targets), wave_size)]
        results = []
        for wave in waves:
            try:
                results.append(self._sync_wave(wave, plan, tensors, leg, pause_mode,
                                               sleep_level, t0, canary))
            except IllegalStateError:
                if held:  # an engine it held refused: ask them first next time
                    self._book.distrust()
                raise
            if not results[-1].ok:  # stop the rollout: later waves keep their old version
                self._plans.forget_layouts()
                break
        reports = tuple(r for res in results for r in res.engines)
        result = SyncResult(version=version, ok=all(r.ok for r in reports), mode=leg,
                            layout=plan.format, layout_note=note, nbytes=plan.total_bytes,
                            partial=partial, sender_checksums=results[0].sender_checksums,
                            engines=reports, seconds={"total": time.perf_counter() - t0})
        return _raise_unless_ok(result)

    def _sync_wave(self, names: Sequence[str], plan: TransferPlan, source: Any, leg: str,
                   pause_mode: PauseMode, sleep_level: int, t0: float,
                   canary: Canary | None = None) -> SyncResult:
        # renew this coordinator's lease on ``names`` while the wave runs (if this process
        # dies, the engines end the sync by themselves); then keep holding those the sync left
        # asleep for this trainer (restored after a failure)
        with self._beat.syncing(names):
            return self._settled(self._wave(names, plan, source, leg, pause_mode, sleep_level,
                                            t0, canary))

    def _wave(self, names: Sequence[str], plan: TransferPlan, source: Any, leg: str,
              pause_mode: PauseMode, sleep_level: int, t0: float,
              canary: Canary | None) -> SyncResult:
        attempt = SyncAttempt(self._reach, names, plan.version, leg, self.statuses)
        self._begin(attempt, plan, pause_mode, sleep_level)
        self._phase("transfer")
        t = time.perf_counter()
        try:
            # a wave of one engine has nothing to agree on: it may commit as it loads (not
            # with a canary, which runs between the load and the commit)
            out = self._leg(leg).send(list(names), plan, source, attempt.begun,
                                      one_phase=len(names) == 1 and canary is None)
        except WeightSyncError as e:  # the source failed before the leg reached any engine
            out = LegOutcome([], {}, {n: TransferError(f"sender failed: {e}", engine=n)
                                      for n in names})
        bad, fence = attempt.received(out, time.perf_counter() - t)
        if bad and self.transfer.apply == "staged":
            # all-or-nothing: nobody applies; intact engines resume their old version
            return attempt.fail_all(bad, tuple(out.sums), fence)
        attempt.apply_staged(bad, t)
        self._leg(leg).loaded()  # every engine has applied: free buffers before wake_kv
        return attempt.finish(bad, tuple(out.sums), t0, plan.partial, canary)

    def _begin(self, attempt: SyncAttempt, plan: TransferPlan | None, pause_mode: PauseMode,
               sleep_level: int) -> None:
        """Validate + pause (+ sleep/wake weights) everywhere; a bad manifest changes nothing."""
        if plan is not None:  # validate everywhere before touching any engine
            self._phase("validate")
            self._plans.validate(list(attempt.runs), plan)
        self._phase("pause")
        self._book.issue(attempt.version)  # begun: never handed out again
        attempt.begin(pause_mode, sleep_level, self._takeover)
