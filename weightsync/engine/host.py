"""One vLLM engine (``AsyncLLM``) and the per-engine half of the sync protocol.

The host owns the engine's state machine. The coordinator drives it with coarse steps —
``begin_sync`` -> ``receive`` -> ``apply_staged`` -> ``finish_load`` -> ``commit`` (or
``abort_sync``) — and every step checks that it is legal now, so a confused caller gets an
``IllegalStateError`` instead of an engine in an undefined state. Every reply is a frozen model
(``weightsync.messages``); every call into vLLM goes through ``vllm_compat``.

The host composes small objects that each own their state and its invariants: the serving gate
(``engine.serving.ServingGate``: admission, requests in flight, cache cleanliness), the sleep
state (``engine.dormancy.SleepState``: what is asleep, and whether the weights are intact), the
lease (``engine.lease.SyncLease``: who holds the engine, until when), the calls into the workers
(``engine.worker_calls``), the transfer group (``engine.group``) and the checkpoint files
(``engine.checkpoints``). Test seams are fixed at construction (``engine.options.HostOptions``).

Public actor methods (everything else is private). "Owner": the method takes ``owner`` and,
while a sync or a trainer's sleep holds the engine, refuses (``SyncInProgressError``, nothing
changed) a caller that is not its holder, one that names no owner included; "step": a caller
that names an owner must also hold the engine (``SyncLease.check_step``). Signed: the
coordinator passes its owner (``remote.OwnedEngines.SIGNED``, or explicitly).

==================  =====================================================  ================
method              called by                                              owner
==================  =====================================================  ================
start               ``engine.actor.start_engines``, services, tests        owner
shutdown            ``engine.actor.stop_engines``                          no (``ray.kill``
                                                                           is always open)
status              coordinator, ``api.fleet``, CLI, tests                 no (reads)
local_channel       ``remote.RayEngines`` (once per host)                  no (reads)
close_channel       ``testing.fleet``                                      no (transport)
engine_workers      transfer legs                                          no (reads)
kernel_layout       coordinator, tests                                     no (reads)
runner_class        tests                                                  no (reads)
gpu_memory          tests, ``sleep``                                       no (reads)
memory_after_sleep  tests                                                  no (reads)
generate            ``api``, rollouts, tests                               no (the gate)
validate            coordinator (unsigned)                                 no (checks only)
validate_checkpoint coordinator (unsigned)                                 no (checks only)
begin_sync          coordinator (explicit)                                 takeover rules
join_group          broadcast / external legs (signed)                     step
receive             transfer legs (signed; or the local channel)           step
apply_staged        coordinator (signed)                                   step
reload_from_path    coordinator (signed)                                   step
finish_load         coordinator (signed), tests                            step
run_canary          coordinator (signed)                                   step
commit              coordinator (signed)                                   step
abort_sync          coordinator (signed)                                   step (a no-op)
renew_lease         ``heartbeat.Heartbeat`` (explicit)                     its own
sleep               coordinator (explicit; the sleep's holder)             owner
wake_up             coordinator (signed)                                   owner
pause / resume      ``api`` ``/pause`` ``/resume``                         owner
fence               coordinator (after a commit; a restarted engine)       owner
reset_caches        tests                                                  owner
leave_group         (none in the package)                                  owner
==================  =====================================================  ================
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from weightsync.config import EngineSpec
from weightsync.engine import vllm_compat
from weightsync.engine.channel import SERVED, ChannelServer
from weightsync.engine.checkpoints import CheckpointReader
from weightsync.engine.dormancy import TAGS, Found, SleepState
from weightsync.engine.group import TransferGroup
from weightsync.engine.lease import SyncLease
from weightsync.engine.options import HostOptions
from weightsync.engine.serving import ServingGate
from weightsync.engine.worker_calls import WorkerCalls
from weightsync.engine.workers import (check_workers, merge_applies, merge_fingerprints,
                                       merge_layouts, merge_memory, merge_receipts)
from weightsync.errors import (ConfigError, EngineError, FencedError, IllegalStateError,
                               ManifestError, TransferError, VerificationError, WeightSyncError)
from weightsync.messages import (Ack, ApplyReply, BeginReply, CommitReply, EngineWorkers,
                                 Fingerprint, GpuMemory, JoinReply, LayoutStatus, ReceiveRequest,
                                 ReloadReply, SleepReply, WorkerInfo)
from weightsync.transport.legs.base import hops
from weightsync.types import (IN_SYNC, Canary, CanaryReply, EngineState, EngineStatus,
                              FinishReply, GenerationResult, PauseMode, ReceiveReport)

logger = logging.getLogger(__name__)

_CLEAN = "reset_caches: vLLM cleared them when the engine paused or slept, and nothing ran since"
WORKER_EXTENSION = "weightsync.engine.worker_ext.WeightSyncWorkerExtension"
S = EngineState


class EngineHost:
    """Hosts one engine. All methods are coroutines; none blocks the event loop for long.

    ``make_engine`` builds the engine from keyword arguments (default: vLLM's ``AsyncLLM``
    through ``vllm_compat.make_async_engine``); ``weightsync.testing.fleet`` passes a stand-in.
    """

    def __init__(self, spec: EngineSpec,
                 make_engine: Callable[..., Any] = vllm_compat.make_async_engine,
                 options: HostOptions | None = None) -> None:
        self.spec = spec
        self.options = options or HostOptions()
        if self.options.keep_caches:
            logger.warning("engine %s: TEST ONLY cache resets DISABLED", spec.name)
        self.device = vllm_compat.resolve_device(spec.device)
        self._make_engine = make_engine
        self.state = S.STARTING
        self.version = 0
        self.version_seen = 0  # the highest version a sync here was for (never reused)
        self.fenced_reason: str | None = None
        self.last_sync: dict[str, float] = {}
        self.info: WorkerInfo | None = None
        self.workers: EngineWorkers | None = None  # every worker vLLM started, at start
        self.gate = ServingGate()
        self.dormancy = SleepState(self.gate)
        self.lease = SyncLease(spec.name, on_lapse=self._lapsed)
        self.calls = WorkerCalls(spec.name)
        self.group = TransferGroup(self.calls)
        self.checkpoints = CheckpointReader(spec, self.calls)
        self._sync_started = 0.0
        self._found: Found | None = None  # how the sync in progress found the engine
        self._loaded: FinishReply | None = None  # this sync's load, fingerprinted as it loaded
        self._channel: ChannelServer | None = None
        # the load in progress skipped the finite check (TransferConfig.check_finite=False);
        # once such a version served, its KV blocks may hold NaN: zeroed at the next commit
        self._unchecked_load = False
        self._kv_tainted = False

    @property
    def engine(self) -> Any:
        return self.calls.engine

    @engine.setter
    def engine(self, engine: Any) -> None:
        self.calls.attach(engine)

    @property
    def sleep_supported(self) -> bool:
        return self.dormancy.supported

    @sleep_supported.setter
    def sleep_supported(self, supported: bool) -> None:  # (a stand-in with GPU semantics)
        self.dormancy.supported = supported

    # ---- lifecycle -----------------------------------------------------------------------
    async def start(self, *, owner: str | None = None) -> EngineStatus:
        self.lease.check(owner, "start")
        vllm_compat.prepare_process_env(self.device, self.spec.tensor_parallel_size,
                                        self.spec.cpu_threads_bind)
        sleep = self.device == "cuda" and vllm_compat.sleep_mode_available()
        t0 = time.perf_counter()
        self.engine = self._make_engine(  # (new workers hold no plan)
            model=self.spec.model, dtype=self.spec.dtype, max_model_len=self.spec.max_model_len,
            seed=self.spec.seed, enforce_eager=self.spec.enforce_eager,
            tensor_parallel_size=self.spec.tensor_parallel_size,
            gpu_memory_utilization=self.spec.gpu_memory_utilization, enable_sleep_mode=sleep,
            worker_extension_cls=WORKER_EXTENSION,
            limit_mm_per_prompt=self.spec.limit_mm_per_prompt,
            kv_cache_bytes=int(self.spec.cpu_kvcache_gib * (1 << 30)) if self.device == "cpu"
            else None,
            engine_args=self.spec.engine_args,
        )
        self.sleep_supported = sleep
        infos = await self.calls.rpc("ws_info", reply=WorkerInfo, timeout=300)
        self.workers = check_workers(infos, self.spec.name)
        self.info = infos[0]
        # the colocated trainer's short way in for the call every sync makes (RayEngines)
        if self._channel is not None:  # (a restart)
            await self._channel.close()
        self._channel = ChannelServer({m: getattr(self, m) for m in SERVED})
        await self._channel.start()
        self.state = S.SERVING
        self.gate.open()
        logger.info("engine %s up in %.1fs on %s (runner %s)", self.spec.name,
                    time.perf_counter() - t0, self.device, self.info.runner)
        return self.status()

    def status(self) -> EngineStatus:
        return EngineStatus(
            name=self.spec.name, state=self.state, version=self.version, device=self.device,
            sleep_supported=self.sleep_supported, sleep_level=self.dormancy.level,
            fenced_reason=self.fenced_reason, last_sync=self.last_sync, model=self.spec.model,
            version_seen=self.version_seen, owner=self.lease.owner,
            lease_left_s=self.lease.left(),
        )

    async def local_channel(self) -> str | None:
        """The path of the Unix socket this host serves ``receive`` on (``engine.channel``),
        for a trainer on its machine; None before start."""
        return self._channel.path if self._channel is not None else None

    async def close_channel(self) -> None:
        """Stop serving the local channel (its calls go through Ray from then on)."""
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def shutdown(self) -> None:
        await self.close_channel()
        if self.engine is not None:
            vllm_compat.shutdown(self.engine)
            self.engine = None
        self.state = S.STOPPED

    # ---- the lease -------------------------------------------------------------------------
    def _expect(self, *states: EngineState, op: str, owner: str | None = None) -> None:
        """Refuse ``op`` unless the caller (``owner``) may drive this step
        (``SyncLease.check_step``: a coordinator that stalled past its lease and comes back
        must not touch a sync another one now drives) and the engine is in one of ``states``."""
        self.lease.check_step(owner, op)
        self._expect_state(*states, op=op)

    def _expect_state(self, *states: EngineState, op: str) -> None:
        if self.state not in states:
            raise IllegalStateError(
                f"cannot {op} while {self.state.value} (needs {'/'.join(s.value for s in states)})",
                engine=self.spec.name)

    async def renew_lease(self, owner: str, lease_s: float) -> bool:
        """The owner's heartbeat; False when it no longer holds this engine's sync."""
        return self.lease.renew(owner, lease_s)

    async def _take_over(self, owner: str, takeover: bool) -> None:
        """Before a sync of ``owner``: a sync held by another is ended first if its lease
        lapsed or ``takeover`` says that owner is gone; otherwise this is refused."""
        held_by, left = self.lease.owner, self.lease.left()
        if held_by is None or held_by == owner or self.state not in (*IN_SYNC, S.FENCED):
            return
        if not (takeover or self.lease.lapsed()):
            raise IllegalStateError(
                f"a sync owned by {held_by} holds this engine for {max(left or 0, 0):.1f}s "
                "more; take it over only if that coordinator is gone", engine=self.spec.name)
        await self._end_stale_sync(f"taken over by {owner or 'a new coordinator'} from "
                                   f"{held_by}")

    async def _lapsed(self) -> None:
        """The lease lapsed between its owner's calls (``SyncLease`` watches): end a sync (or
        a sleep) whose owner went silent."""
        if self.state in (*IN_SYNC, S.FENCED):
            held = "mid-sync" if self._found else "while the engine slept for it"
            await self._end_stale_sync(f"lease of {self.lease.owner} expired: its "
                                       f"coordinator went silent {held}")

    async def _end_stale_sync(self, reason: str) -> None:
        """Weights intact: serve the old version again; touched: fenced with ``reason``."""
        logger.warning("engine %s: ending a sync nobody drives: %s", self.spec.name, reason)
        await self._abort(reason, 60.0, fence=False, restore=False)

    # ---- sync protocol (engine half) -------------------------------------------------------
    async def engine_workers(self) -> EngineWorkers:
        """The engine's workers (how many join a transfer group, and their parallel shape)."""
        if self.workers is None:
            raise EngineError("engine not started", engine=self.spec.name)
        return self.workers

    async def validate(self, plan_json: str) -> None:
        """Check a plan against the model before anything changes (raises ManifestError)."""
        await self.calls.plan_rpc("ws_validate", self.calls.plan.text(plan_json), reply=Ack,
                                  timeout=60)

    async def begin_sync(self, *, pause_mode: PauseMode, sleep_level: int, deadline_s: float,
                         owner: str = "", lease_s: float = 0.0, takeover: bool = False,
                         version: int = 0) -> BeginReply:
        """Pause, and make the weights resident for the transfer. The coordinator validates
        the plan on every engine (``validate``) before any begins.

        An engine that is asleep (the colocated loop: ``sleep`` before the trainer's step) is
        already paused: only its weights wake; the KV cache wakes at ``commit``. A serving
        engine sleeps here when ``sleep_level`` asks (level 2 frees the weights' memory for
        the transfer) and wakes its weights at once.

        The sync belongs to ``owner`` for ``lease_s`` seconds, renewed by ``renew_lease``
        (``weightsync.engine.lease``). A sync still held by another owner is ended first if
        its lease lapsed or ``takeover`` says that owner is gone; otherwise this is refused."""
        await self._take_over(owner, takeover)
        self.lease.check(owner, "begin a sync")  # (asleep for another: ``wake_up`` rules)
        self._expect_state(S.SERVING, S.FENCED, S.ASLEEP, S.WEIGHTS_AWAKE, op="begin a sync")
        if version and version <= self.version_seen:  # a coordinator that did not ask first
            raise IllegalStateError(f"version {version} was already used here (up to "
                                    f"{self.version_seen}): another sync ran since; nothing "
                                    "was touched", engine=self.spec.name)
        dorm = self.dormancy
        self._found = dorm.found(self.state, self.lease.owner, self.lease.duration)
        self._loaded = None
        self.version_seen = max(self.version_seen, version)
        self.lease.hold(owner, lease_s)
        seconds: dict[str, float] = {}
        skipped: list[str] = []
        self.gate.close()
        self._sync_started = time.perf_counter()
        if self.state in (S.ASLEEP, S.WEIGHTS_AWAKE):
            if sleep_level:  # paused since it fell asleep; nothing to pause or sleep
                skipped.append(f"sleep: already asleep at level {dorm.level}")
        else:
            t = time.perf_counter()
            # Requests that passed the gate just before it closed may not have reached vLLM
            # yet: pausing now would park them unstarted and stamp them with both versions
            # although the new weights produce all their tokens. Let them in first; the pause
            # mode then decides their fate like any other request in flight.
            await self.gate.all_in_engine(deadline_s)
            await self.gate.pause(self.engine, pause_mode, deadline_s,
                                  clear_cache=not self.options.keep_caches)
            seconds["pause"] = time.perf_counter() - t
            if sleep_level and not dorm.asleep:
                if dorm.supported:
                    t = time.perf_counter()
                    await dorm.sleep(self.engine, sleep_level, pause_mode, deadline_s)
                    seconds["sleep"] = time.perf_counter() - t
                    dorm.last_memory = await self.gpu_memory()
                else:
                    skipped.append(f"sleep/wake: sleep mode is CUDA-only; engine "
                                   f"{self.spec.name} runs on {self.device}")
        if "weights" in dorm.asleep:
            t = time.perf_counter()
            await dorm.wake(self.engine, ["weights"], deadline_s)
            seconds["wake_weights"] = time.perf_counter() - t
        if self.state != S.FENCED:
            self.state = S.WEIGHTS_AWAKE if dorm.asleep else S.PAUSED
        return BeginReply(seconds=seconds, skipped=tuple(skipped), group_id=self.group.group_id,
                          plan_key=self.calls.plan.key)

    async def join_group(self, backend: str, host: str, port: int, rank_offset: int,
                         world_size: int, timeout_s: float, group_id: str = "",
                         owner: str | None = None) -> JoinReply:
        """Join the trainer's transfer group (``engine.group``). It stays open across syncs
        until a failure or ``leave_group``; ``abort_sync`` ends a join in progress at once."""
        self._expect(*IN_SYNC, S.FENCED, op="join a transfer group", owner=owner)
        with self.lease.busy():
            return await self.group.join(backend, host, port, rank_offset, world_size,
                                         timeout_s, group_id)

    async def leave_group(self, *, owner: str | None = None) -> None:
        self.lease.check(owner, "leave the transfer group")
        await self.group.leave()

    async def receive(self, plan_json: str, request_json: str, *,
                      owner: str | None = None) -> str:
        """Receive a plan through the leg ``request_json`` (a ``ReceiveRequest``) names; the
        worker stages it, streams it into the loader, or verifies and loads it (``atomic``).
        Returns the ``ReceiveReport`` as JSON, which the sender leg parses
        (``SenderLeg.wait_receipts``): this is the one call inside every sync's transfer, and
        Ray passes a string for less than it pickles a model.

        A ``TransferError`` (a verification error included) means nothing was applied; any
        other failure of a streaming or atomic apply may have left the weights half-applied.

        With ``commit_version`` (the coordinator's wave is this engine alone) an atomic apply
        that verified, loaded and fingerprinted everything, with no cache left to reset, also
        commits that version here (the report's ``commit``); otherwise ``commit`` follows.
        """
        t_enter = time.perf_counter()
        self._expect(*IN_SYNC, S.FENCED, op="receive weights", owner=owner)
        request = ReceiveRequest.model_validate_json(request_json)
        plan_json = self.calls.plan.text(plan_json)  # (or PlanNotHeld: nothing changed yet)
        self._unchecked_load = not request.check_finite
        if self.state != S.FENCED:
            self.state = S.LOADING
        if request.apply == "streaming":
            self.dormancy.overwriting()  # from the first byte on, until commit
        t = time.perf_counter()
        try:
            with self.lease.busy():
                reports = await self.calls.plan_rpc("ws_receive", plan_json, request_json,
                                                     reply=ReceiveReport,
                                                     timeout=request.deadline_s * 1.5)
            report = merge_receipts([hops(r, t, time.perf_counter(), "vllm", "worker")
                                     for r in reports], self.spec.name)
        except WeightSyncError as e:
            self.group.failed()
            several = self.workers is not None and self.workers.workers > 1
            if request.apply == "atomic" and (several or not isinstance(e, TransferError)):
                self.dormancy.overwriting()  # (several workers: another one may have loaded)
            raise
        if report.applied:
            self.dormancy.overwriting()  # new weights, not yet committed
        finish = self._fingerprinted(reports)
        report = report.model_copy(update={"finish": finish, "seconds": {
            **report.seconds, "host_rpc": time.perf_counter() - t,  # vLLM's RPC included
            "host": time.perf_counter() - t_enter}})  # this whole actor method
        if request.commit_version is not None and request.apply == "atomic" and \
                report.applied and finish is not None:
            # a wave of one engine: verified (against the sender's checksums), loaded and
            # fingerprinted, no cache to reset — nothing is left to agree on, so commit now
            # instead of in a round trip of its own
            t = time.perf_counter()
            done = await self._commit(request.commit_version, request.deadline_s)
            report = report.model_copy(update={"commit": done.seconds, "seconds": {
                **report.seconds, "commit": time.perf_counter() - t}})  # not the transfer's
        # when this call began and ended here, for the caller's hops (transfer.legs.base.hops)
        return report.model_copy(update={"seconds": {
            **report.seconds, "at_host_enter": t_enter,
            "at_host_exit": time.perf_counter()}}).model_dump_json()

    async def apply_staged(self, deadline_s: float, *, owner: str | None = None) -> ApplyReply:
        self._expect(S.LOADING, S.FENCED, op="apply staged weights", owner=owner)
        self.dormancy.overwriting()
        with self.lease.busy():
            replies = await self.calls.rpc("ws_apply_staged", reply=ApplyReply,
                                           timeout=deadline_s)
        return merge_applies(replies, self.spec.name).model_copy(
            update={"finish": self._fingerprinted(replies)})

    def _fingerprinted(self, replies: Sequence[ReceiveReport | ApplyReply]
                       ) -> FinishReply | None:
        """Keep the fingerprints every worker took of what it just loaded, for ``finish_load``;
        returned as the finished verify step when no cache needs a reset before commit."""
        if not replies or any(r.fingerprint is None for r in replies):
            return None  # not applied (staged), or a worker that did not fingerprint
        took = max(r.seconds.get("fingerprint", 0.0) for r in replies)
        clean = self.gate.caches_clean
        self._loaded = merge_fingerprints(
            [Fingerprint(digest=r.fingerprint, rebuilt=r.rebuilt) for r in replies], self.workers,
            seconds={"fingerprint": took}, skipped=(_CLEAN,) if clean else ())
        return self._loaded if clean else None

    async def validate_checkpoint(self, path: str | None, *, partial: bool = False,
                                  roots: Sequence[str] | None = None,
                                  deadline_s: float = 60.0) -> str:
        """Check a checkpoint against the model before anything changes (any state):
        ``ManifestError``/``ConfigError`` if it does not fit. The workers keep the files they
        checked open; returns their identity (``CheckedFiles``), for ``reload_from_path``.
        The engine's own load roots bind the path whatever ``roots`` says
        (``engine.checkpoints``)."""
        return await self.checkpoints.check(path, partial, roots, deadline_s)

    async def reload_from_path(self, path: str | None, deadline_s: float, *,
                               partial: bool = False,
                               roots: Sequence[str] | None = None,
                               owner: str | None = None,
                               check_finite: bool = True,
                               identity: str | None = None) -> ReloadReply:
        """Reload weights from a safetensors directory (``None``: the original model), loading
        exactly the files that were checked. A checkpoint refused before loading leaves the
        weights as they were."""
        self._expect(*IN_SYNC, S.FENCED, op="reload from a checkpoint", owner=owner)
        ckpt = await self.checkpoints.for_load(path, partial, roots, deadline_s, check_finite,
                                               identity)
        if self.state != S.FENCED:
            self.state = S.LOADING
        self._unchecked_load = not check_finite
        intact = self.dormancy.overwriting()
        try:
            with self.lease.busy():
                out = await self.calls.rpc("ws_reload_files", ckpt.model_dump_json(),
                                           reply=ReloadReply, timeout=deadline_s)
        except (ManifestError, VerificationError):  # refused before loading any tensor
            self.dormancy.load_refused(intact)
            raise
        return ReloadReply(reload=max(r.reload for r in out),  # every worker loaded
                           rebuilt=out[0].rebuilt, nbytes=out[0].nbytes)

    async def finish_load(self, deadline_s: float, *, owner: str | None = None) -> FinishReply:
        """Make sure no cache holds what the old weights computed; return a fingerprint of the
        weights.

        The pause (or sleep) that began the sync already had vLLM clear its prefix, multimodal
        and encoder caches and preempt requests kept across it (vLLM 0.24 and 0.32:
        ``EngineCore.pause_scheduler(clear_cache=True)``), and nothing has run since, so the
        reset is skipped then, and said so; otherwise (a manual pause that kept its caches)
        they are reset here."""
        self.lease.check_step(owner, "verify the weights")
        seconds: dict[str, float] = {}
        skipped: tuple[str, ...] = ()
        t = time.perf_counter()
        with self.lease.busy():
            if self.gate.caches_clean:
                skipped = (_CLEAN,)
            elif not self.options.keep_caches:
                await asyncio.wait_for(self._reset_caches(), deadline_s)
                seconds["reset_caches"] = time.perf_counter() - t
            loaded, self._loaded = self._loaded, None
            if loaded is not None:  # the workers fingerprinted the load as they made it
                return loaded.model_copy(update={"seconds": {**loaded.seconds, **seconds},
                                                 "skipped": skipped})
            t = time.perf_counter()
            prints = await self.calls.rpc("ws_fingerprint", reply=Fingerprint,
                                          timeout=deadline_s)
        seconds["fingerprint"] = time.perf_counter() - t
        return merge_fingerprints(prints, self.workers, seconds=seconds, skipped=skipped)

    async def run_canary(self, canary_json: str, deadline_s: float, *,
                         owner: str | None = None) -> CanaryReply:
        """The sync's canary (``types.Canary``): after the load and the verify step, before
        the commit, score the trainer's token sequence on the new weights and compare with
        its logprobs. vLLM's scheduler runs for it (the KV cache woken if a sleep released
        it) while this host's gate stays closed: no rollout request reaches the engine
        before the commit. A gap over the tolerance is a ``VerificationError``; the weights
        are applied, so the coordinator fences this engine."""
        self._expect(*IN_SYNC, S.FENCED, op="run the canary", owner=owner)
        canary = Canary.model_validate_json(canary_json)
        t = time.perf_counter()
        dorm = self.dormancy
        with self.lease.busy():
            woke = "kv_cache" in dorm.asleep
            if woke:
                await dorm.wake(self.engine, ["kv_cache"], deadline_s)
            if not (woke and vllm_compat.WAKE_RESUMES and not dorm.asleep):
                await asyncio.wait_for(vllm_compat.resume_generation(self.engine), deadline_s)
            got = await asyncio.wait_for(vllm_compat.prompt_logprobs(
                self.engine, list(canary.token_ids), f"canary-{uuid.uuid4().hex}"), deadline_s)
        gaps = [abs(a - b) for a, b in zip(got, canary.logprobs, strict=True)]
        worst = max(range(len(gaps)), key=gaps.__getitem__)
        if not gaps[worst] <= canary.tolerance:  # (NaN fails too)
            raise VerificationError(
                f"canary: the engine's logprob of token {worst + 1} differs from the trainer's "
                f"by {gaps[worst]:.3g} (tolerance {canary.tolerance:g}): it does not compute "
                "what the trainer sent", engine=self.spec.name)
        return CanaryReply(max_gap=gaps[worst], position=worst + 1,
                           seconds=time.perf_counter() - t)

    async def _reset_caches(self) -> None:
        # Requests frozen by pause mode "keep" hold KV blocks computed with the old weights:
        # preempt them so they recompute on the new ones, and insist the reset succeeded.
        if not await vllm_compat.reset_caches(self.engine):
            raise EngineError("prefix cache could not be reset: stale KV would be served",
                              engine=self.spec.name)

    async def commit(self, version: int, deadline_s: float, *,
                     owner: str | None = None) -> CommitReply:
        """Wake the KV cache, resume, and serve ``version``. Unfences a resynced engine."""
        self._expect(*IN_SYNC, S.FENCED, op="commit", owner=owner)
        return await self._commit(version, deadline_s)

    async def _commit(self, version: int, deadline_s: float) -> CommitReply:
        if version <= self.version:
            raise IllegalStateError(f"version {version} is not newer than {self.version}",
                                    engine=self.spec.name)
        with self.lease.busy():
            seconds = await self.dormancy.wake_and_resume(self.engine, deadline_s)
            if self._kv_tainted:  # the version before may have written NaN into KV blocks
                t = time.perf_counter()
                await self.calls.rpc("ws_scrub_kv", reply=Ack, timeout=deadline_s)
                seconds["scrub_kv"] = time.perf_counter() - t
        self._kv_tainted = self._unchecked_load
        self.lease.release()
        self._found = None
        self._loaded = None
        self.version = version
        self.dormancy.committed()
        self.fenced_reason = None
        seconds["total"] = time.perf_counter() - self._sync_started
        self.last_sync = seconds
        self._serve()
        return CommitReply(seconds=seconds)

    async def abort_sync(self, reason: str, deadline_s: float = 60.0, *,
                         fence: bool = False, owner: str | None = None,
                         restore: bool = True) -> EngineStatus:
        """Undo a sync that will not commit. With ``fence`` (this engine failed), or when the
        sync touched its weights, the engine is fenced (not routable) until a resync
        verifies. Otherwise it goes back to how the sync found it: serving its old version,
        or (``restore``) asleep at the level it slept, for the trainer that put it there.

        A call from an ``owner`` that no longer holds the sync (its lease lapsed, or another
        coordinator took over), or one that names none while an owner holds it, changes
        nothing."""
        if not self.lease.is_holder(owner):
            return self.status()
        return await self._abort(reason, deadline_s, fence=fence, restore=restore)

    async def _abort(self, reason: str, deadline_s: float, *, fence: bool,
                     restore: bool) -> EngineStatus:
        self.group.cancel()  # a join in progress stops asking its workers (who leave below)
        found, self._found = self._found, None
        self._loaded = None
        dorm = self.dormancy
        if found is None:  # no sync in progress: as a sleep (or pause) left the engine
            found = dorm.found(self.state, None, 0.0)
        self.lease.release()
        if fence:
            self._fence(reason)
        if self.state not in IN_SYNC and self.state != S.FENCED:
            return self.status()
        try:
            await self.calls.rpc("ws_drop_staged", reply=Ack, timeout=deadline_s)
            await self.group.leave(deadline_s)  # a failed sync never reuses its group
        except WeightSyncError:
            logger.warning("engine %s: cleanup after failed sync raised", self.spec.name,
                           exc_info=True)
        asleep = found.state in (S.ASLEEP, S.WEIGHTS_AWAKE)
        untouched = dorm.weights_intact or (asleep and not found.weights_intact)
        if self.state == S.FENCED or not untouched:
            self._fence(reason)
        elif asleep and restore:
            await dorm.put_back(self.engine, found, deadline_s)
            self.state = found.state
            if found.owner is not None:
                self.lease.hold(found.owner, found.lease_s)
            logger.warning("engine %s: sync aborted (%s); asleep again at level %d",
                           self.spec.name, reason, dorm.level)
        elif dorm.weights_intact:
            await dorm.wake_and_resume(self.engine, deadline_s)
            self._serve()
            logger.warning("engine %s: sync aborted (%s); still serving version %d",
                           self.spec.name, reason, self.version)
        else:  # its owner is gone and its weights were discarded by sleep: keep it asleep
            self._fence(f"{reason} (asleep at level {dorm.level}: no weights to serve)")
        return self.status()

    # ---- control plane ---------------------------------------------------------------------
    def _serve(self) -> None:
        self.state = S.SERVING
        self.gate.open()

    def fence(self, reason: str, *, owner: str | None = None) -> None:
        """Take the engine out of serving until a sync verifies it (``reason`` shown)."""
        self.lease.check(owner, "fence")
        self._fence(reason)

    def _fence(self, reason: str) -> None:
        self.state = S.FENCED
        self.fenced_reason = reason
        self.gate.close()
        logger.error("engine %s fenced: %s", self.spec.name, reason)

    async def pause(self, mode: PauseMode = "abort", *,
                    owner: str | None = None) -> EngineStatus:
        """Manual pause (control plane). New requests wait until ``resume``."""
        self.lease.check(owner, "pause")
        self._expect_state(S.SERVING, op="pause")
        self.gate.close()
        await self.gate.pause(self.engine, mode, 60.0)
        self.state = S.PAUSED
        return self.status()

    async def resume(self, *, owner: str | None = None) -> EngineStatus:
        self.lease.check(owner, "resume")
        self._expect_state(S.PAUSED, op="resume")
        await vllm_compat.resume_generation(self.engine)
        self._serve()
        return self.status()

    async def reset_caches(self, *, owner: str | None = None) -> None:
        """Drop prefix, multimodal and encoder caches (a sync makes sure of this every load)."""
        self.lease.check(owner, "reset caches")
        await self._reset_caches()

    async def kernel_layout(self) -> LayoutStatus:
        """The engine's kernel layout (fast path) and whether it has been verified."""
        return merge_layouts(await self.calls.rpc("ws_kernel_layout", reply=LayoutStatus,
                                                  timeout=120), self.workers)

    async def runner_class(self) -> str:
        return self.info.runner if self.info is not None else ""

    async def gpu_memory(self) -> GpuMemory:
        """Device memory of every GPU the engine's workers use, as they see it now
        (``free``/``total`` are device-wide, so a colocated trainer counts too;
        ``workers.merge_memory``); all ``None`` on CPU."""
        return merge_memory(await self.calls.rpc("ws_gpu_memory", reply=GpuMemory,
                                                 timeout=30), self.workers)

    # ---- serving ---------------------------------------------------------------------------
    async def generate(self, prompts: list[Any], *, max_tokens: int = 16,
                       temperature: float = 0.0, logprobs: bool = False, seed: int | None = None,
                       ignore_eos: bool = False, n: int = 1,
                       wait_s: float = 300.0) -> list[GenerationResult]:
        """Generate for each prompt (a string, or a vLLM prompt dict with multimodal data).

        Requests that arrive during a sync wait for it and run on the new weights; each result
        names the version(s) that produced it.
        """
        self._require_routable()
        try:
            await self.gate.wait_open(wait_s)
        except TimeoutError as e:
            raise EngineError(f"engine not serving after {wait_s}s (state {self.state.value})",
                              engine=self.spec.name) from e
        self._require_routable()
        self.gate.admit(len(prompts) * n)  # no await since the gate: begin_sync waits for them

        def params(i: int):  # a seeded request with n copies: copy i uses seed + i
            return vllm_compat.sampling_params(
                max_tokens=max_tokens, temperature=temperature, logprobs=0 if logprobs else None,
                seed=None if seed is None else seed + i, ignore_eos=ignore_eos)

        return list(await asyncio.gather(*(self.gate.run(self.engine, p, params(i),
                                                         lambda: self.version)
                                           for p in prompts for i in range(n))))

    def _require_routable(self) -> None:
        if self.state == S.FENCED:
            raise FencedError(f"fenced: {self.fenced_reason}", engine=self.spec.name)
        if self.state in (S.STARTING, S.STOPPED):
            raise EngineError(f"engine is {self.state.value}", engine=self.spec.name)

    # ---- sleep and wake (the colocated loop; engine.dormancy) ------------------------------
    async def memory_after_sleep(self) -> GpuMemory | None:
        """``gpu_memory()`` as read right after the last sync's sleep (None if none slept)."""
        return self.dormancy.last_memory

    async def sleep(self, level: int, mode: PauseMode = "abort", *, owner: str = "",
                    lease_s: float = 0.0, deadline_s: float = 60.0) -> SleepReply:
        """Stop serving and release device memory for a colocated trainer's step: level 1
        offloads the weights to host memory, level 2 discards them (the next sync brings new
        ones); both release the KV cache. A sync goes straight into the sleeping engine and
        wakes it; ``wake_up`` wakes it without one.

        Where vLLM has no sleep mode (CPU) the engine only pauses, reports why nothing was
        released, and follows the same states, so the same loop runs there.

        With ``owner`` the sleep belongs to that coordinator for ``lease_s`` (renewed while its
        trainer lives); if it goes silent the engine serves again (level 1) or, its weights
        gone, stays asleep fenced (level 2). A sleep that fails part-way fences the engine."""
        if level not in (1, 2):
            raise ConfigError(f"sleep level must be 1 or 2, not {level}", engine=self.spec.name)
        if mode == "keep":
            raise ConfigError("pause mode 'keep' cannot hold requests through sleep: their KV "
                              "cache is released; use 'abort' or 'wait'", engine=self.spec.name)
        self.lease.check(owner, "sleep")
        self._expect_state(S.SERVING, S.PAUSED, op="sleep")
        self.gate.close()
        before = await self.gpu_memory() if self.sleep_supported else GpuMemory()
        t = time.perf_counter()
        try:
            skipped = await self.dormancy.sleep_serving(
                self.engine, level, mode, deadline_s,
                where=f"engine {self.spec.name} runs on {self.device}")
        except Exception as e:
            self._fence(f"sleep at level {level} failed part-way: {e}")
            raise
        seconds = {"sleep": time.perf_counter() - t}
        after = await self.gpu_memory() if self.sleep_supported else GpuMemory()
        self.dormancy.last_memory = after
        self.state = S.ASLEEP
        self.lease.hold(owner, lease_s)
        freed = None if after.free is None or before.free is None else after.free - before.free
        return SleepReply(level=level, freed_bytes=freed, free_after=after.free,
                          seconds=seconds, skipped=skipped)

    async def wake_up(self, tags: list[str] | None = None, *, owner: str | None = None,
                      deadline_s: float = 60.0) -> EngineStatus:
        """Wake what ``tags`` names (None: everything). Serving resumes once both the weights
        and the KV cache are awake. Weights that sleep discarded (level 2) are undefined until
        a sync brings new ones: waking them is allowed (a sync can follow), serving them is
        not, so the engine is fenced instead of resuming."""
        self._expect_state(S.ASLEEP, S.WEIGHTS_AWAKE, op="wake up")
        self.lease.check(owner, "wake up")
        self.dormancy.check_tags(tags, self.spec.name)
        await self.dormancy.wake(self.engine, tags or TAGS, deadline_s)
        if not self.dormancy.asleep:
            self.lease.release()
            if not self.dormancy.weights_intact:
                self._fence("woken after sleep level 2 without new weights: weights undefined")
                return self.status()
            await vllm_compat.resume_generation(self.engine)
            self._serve()
        elif "weights" not in self.dormancy.asleep:
            self.state = S.WEIGHTS_AWAKE
        return self.status()
