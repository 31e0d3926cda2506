"""One vLLM engine (``AsyncLLM``) and the per-engine half of the sync protocol.

The host owns the engine's state machine. The coordinator drives it with coarse steps —
``begin_sync`` -> ``receive`` -> ``apply_staged`` -> ``finish_load`` -> ``commit`` (or
``abort_sync``) — and every step checks that it is legal now, so a confused caller gets an
``IllegalStateError`` instead of an engine in an undefined state. Every reply is a frozen model
(``weightsync.messages``); every call into vLLM goes through ``vllm_compat``.

Three parts live in their own modules and are mixed in: serving and the pause
(``engine.serving``), sleep and wake for the colocated loop (``engine.dormancy``), and who may
drive the sync (``engine.lease``).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel

from weightsync.checkpoint import read_checkpoint
from weightsync.config import EngineSpec
from weightsync.engine import vllm_compat
from weightsync.engine.channel import SERVED, ChannelServer
from weightsync.engine.dormancy import Dormancy, Found
from weightsync.engine.lease import LeaseHolder, SyncLease
from weightsync.engine.serving import Serving
from weightsync.engine.workers import (check_workers, merge_applies, merge_fingerprints,
                                       merge_layouts, merge_memory, merge_receipts)
from weightsync.errors import (DeadlineExceeded, EngineError, IllegalStateError, ManifestError,
                               TransferError, VerificationError, WeightSyncError, error_class)
from weightsync.messages import (Ack, ApplyReply, BeginReply, CheckedFiles, CommitReply,
                                 EngineWorkers, Fingerprint, GpuMemory, JoinProgress, JoinReply,
                                 LayoutStatus, ReceiveRequest, ReloadReply, WorkerInfo,
                                 reply_of)
from weightsync.transport.legs.base import hops
from weightsync.types import (IN_SYNC, Canary, CanaryReply, CheckpointFiles, EngineState,
                              EngineStatus, FinishReply, HeldPlan, PauseMode, ReceiveReport,
                              plan_version)

logger = logging.getLogger(__name__)

_CLEAN = "reset_caches: vLLM cleared them when the engine paused or slept, and nothing ran since"
WORKER_EXTENSION = "weightsync.engine.worker_ext.WeightSyncWorkerExtension"
_JOIN_POLL_S = 0.1  # how long one RPC of a join waits for the workers' rendezvous
M = TypeVar("M", bound=BaseModel)


class EngineHost(Serving, Dormancy, LeaseHolder):
    """Hosts one engine. All methods are coroutines; none blocks the event loop for long.

    ``make_engine`` builds the engine from keyword arguments (default: vLLM's ``AsyncLLM``
    through ``vllm_compat.make_async_engine``); ``weightsync.testing.fleet`` passes a stand-in.
    """

    def __init__(self, spec: EngineSpec,
                 make_engine: Callable[..., Any] = vllm_compat.make_async_engine) -> None:
        self.spec = spec
        self.device = vllm_compat.resolve_device(spec.device)
        self._make_engine = make_engine
        self.engine: Any = None
        self.state = EngineState.STARTING
        self.version = 0
        self.version_seen = 0  # the highest version a sync here was for (never reused)
        self.sleep_level = 0
        self.sleep_supported = False
        self.weights_intact = True  # False once weights were discarded or partly overwritten
        self.fenced_reason: str | None = None
        self.last_sync: dict[str, float] = {}
        self.info: WorkerInfo | None = None
        self.workers: EngineWorkers | None = None  # every worker vLLM started, at start
        self._serving = asyncio.Event()
        self._admitted = 0  # requests past the serving gate that vLLM has not started yet
        self._all_in_engine = asyncio.Event()
        self._all_in_engine.set()
        self._running = 0  # requests inside vLLM whose final output has not come back yet
        self._none_running = asyncio.Event()
        self._none_running.set()
        self._sync_started = 0.0
        self.group_id: str | None = None  # the broadcast group this engine is in, if any
        self._asleep: set[str] = set()  # what sleep released and nothing woke yet
        self._found: Found | None = None  # how the sync in progress found the engine
        self.last_sleep_memory: GpuMemory | None = None  # right after a sync's sleep
        self._testing_keep_caches = False  # TEST ONLY: see testing_keep_caches()
        # vLLM cleared its prefix, multimodal and encoder caches (pause or sleep) and no request
        # has run since: a reset (after loading, or at the next pause) would find them empty
        self._caches_clean = False
        self._lease = SyncLease()  # who owns the sync in progress, until when
        self._loaded: FinishReply | None = None  # this sync's load, fingerprinted as it loaded
        self._watchdog: asyncio.Task | None = None
        self._channel: ChannelServer | None = None
        self._plan = HeldPlan()  # the plan the trainer last sent in full (BeginReply.plan_key)
        self._workers_plan: str | None = None  # the key of the one every worker holds
        # the load in progress skipped the finite check (TransferConfig.check_finite=False);
        # once such a version served, its KV blocks may hold NaN: zeroed at the next commit
        self._unchecked_load = False
        self._kv_tainted = False
        self._checked: CheckpointFiles | None = None  # what validate_checkpoint's workers hold

    # ---- lifecycle -----------------------------------------------------------------------
    async def start(self) -> EngineStatus:
        vllm_compat.prepare_process_env(self.device, self.spec.tensor_parallel_size,
                                        self.spec.cpu_threads_bind)
        sleep = self.device == "cuda" and vllm_compat.sleep_mode_available()
        t0 = time.perf_counter()
        self._workers_plan = None  # new workers hold no plan
        self.engine = self._make_engine(
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
        infos = await self._rpc("ws_info", reply=WorkerInfo, timeout=300)
        self.workers = check_workers(infos, self.spec.name)
        self.info = infos[0]
        # the colocated trainer's short way in for the call every sync makes (RayEngines)
        if self._channel is not None:  # (a restart)
            await self._channel.close()
        self._channel = ChannelServer({m: getattr(self, m) for m in SERVED})
        await self._channel.start()
        self.state = EngineState.SERVING
        self._serving.set()
        logger.info("engine %s up in %.1fs on %s (runner %s)", self.spec.name,
                    time.perf_counter() - t0, self.device, self.info.runner)
        return self.status()

    def status(self) -> EngineStatus:
        return EngineStatus(
            name=self.spec.name, state=self.state, version=self.version, device=self.device,
            sleep_supported=self.sleep_supported, sleep_level=self.sleep_level,
            fenced_reason=self.fenced_reason, last_sync=self.last_sync, model=self.spec.model,
            version_seen=self.version_seen, owner=self._lease.owner,
            lease_left_s=self._lease.left(),
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
        self.state = EngineState.STOPPED

    # ---- sync protocol (engine half) -------------------------------------------------------
    def _expect(self, *states: EngineState, op: str, owner: str | None = None) -> None:
        """Refuse ``op`` unless the engine is in one of ``states`` and, for a step of a sync,
        the caller (``owner``) still holds that sync: a coordinator that stalled past its
        lease and comes back must not touch a sync another one now drives."""
        self._check_owner(owner, op)
        if self.state not in states:
            raise IllegalStateError(
                f"cannot {op} while {self.state.value} (needs {'/'.join(s.value for s in states)})",
                engine=self.spec.name)

    async def _rpc(self, method: str, *args: Any, reply: type[M],
                   timeout: float | None = None) -> list[M]:
        """``collective_rpc`` with a deadline; every worker's ``WorkerReply`` parsed once, and
        a worker's error re-raised as the same typed error."""
        try:
            out = await asyncio.wait_for(vllm_compat.collective_rpc(self.engine, method, args),
                                         timeout)
        except TimeoutError as e:
            raise DeadlineExceeded(f"{method} exceeded {timeout}s", engine=self.spec.name) from e
        except Exception as e:  # noqa: BLE001 - vLLM reports worker crashes as plain Exception
            raise EngineError(f"{method} failed in the worker: {e}", engine=self.spec.name) from e
        replies = [reply_of(reply).model_validate_json(o) for o in out]
        for rank, r in enumerate(replies):  # any worker's error fails the call
            if r.error is not None:
                where = f"worker rank {rank}/{len(replies)}: " if len(replies) > 1 else ""
                raise error_class(r.error.code)(where + r.error.message, engine=self.spec.name)
        return [r.reply for r in replies]

    async def engine_workers(self) -> EngineWorkers:
        """The engine's workers (how many join a transfer group, and their parallel shape)."""
        if self.workers is None:
            raise EngineError("engine not started", engine=self.spec.name)
        return self.workers

    async def validate(self, plan_json: str) -> None:
        """Check a plan against the model before anything changes (raises ManifestError)."""
        await self._plan_rpc("ws_validate", self._plan.text(plan_json), reply=Ack, timeout=60)

    async def _plan_rpc(self, method: str, plan_text: str, *args: Any, reply: type[M],
                        timeout: float) -> list[M]:
        """``_rpc`` of a worker method whose first argument is a plan: sent by key (``PlanRef``)
        when every worker holds it already — a worker keeps the last plan it was sent whole,
        and nothing but this host sends them plans."""
        key = self._plan.key
        if key is not None and key == self._workers_plan:
            plan_text = self._plan.ref(plan_version(plan_text))
        else:
            self._workers_plan = None  # until every worker has it
        out = await self._rpc(method, plan_text, *args, reply=reply, timeout=timeout)
        self._workers_plan = key
        return out

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
        self._expect(EngineState.SERVING, EngineState.FENCED, EngineState.ASLEEP,
                     EngineState.WEIGHTS_AWAKE, op="begin a sync")
        if version and version <= self.version_seen:  # a coordinator that did not ask first
            raise IllegalStateError(f"version {version} was already used here (up to "
                                    f"{self.version_seen}): another sync ran since; nothing "
                                    "was touched", engine=self.spec.name)
        self._found = Found(self.state, frozenset(self._asleep), self.sleep_level,
                             self.weights_intact, self._lease.owner, self._lease.duration)
        self._loaded = None
        self.version_seen = max(self.version_seen, version)
        self._hold(owner, lease_s)
        seconds: dict[str, float] = {}
        skipped: list[str] = []
        self._serving.clear()
        self._sync_started = time.perf_counter()
        if self.state in (EngineState.ASLEEP, EngineState.WEIGHTS_AWAKE):
            if sleep_level:  # paused since it fell asleep; nothing to pause or sleep
                skipped.append(f"sleep: already asleep at level {self.sleep_level}")
        else:
            t = time.perf_counter()
            # Requests that passed the gate just before it closed may not have reached vLLM
            # yet: pausing now would park them unstarted and stamp them with both versions
            # although the new weights produce all their tokens. Let them in first; the pause
            # mode then decides their fate like any other request in flight.
            await asyncio.wait_for(self._all_in_engine.wait(), deadline_s)
            await self._pause(pause_mode, deadline_s, clear_cache=not self._testing_keep_caches)
            seconds["pause"] = time.perf_counter() - t
            if sleep_level and not self._asleep:
                if self.sleep_supported:
                    t = time.perf_counter()
                    await self._sleep(sleep_level, pause_mode, deadline_s)
                    seconds["sleep"] = time.perf_counter() - t
                    self.last_sleep_memory = await self.gpu_memory()
                else:
                    skipped.append(f"sleep/wake: sleep mode is CUDA-only; engine "
                                   f"{self.spec.name} runs on {self.device}")
        if "weights" in self._asleep:
            t = time.perf_counter()
            await self._wake(["weights"], deadline_s)
            seconds["wake_weights"] = time.perf_counter() - t
        if self.state != EngineState.FENCED:
            self.state = EngineState.WEIGHTS_AWAKE if self._asleep else EngineState.PAUSED
        return BeginReply(seconds=seconds, skipped=tuple(skipped), group_id=self.group_id,
                          plan_key=self._plan.key)

    _join: object | None = None  # the join in progress (join_group); abort_sync ends it

    async def join_group(self, backend: str, host: str, port: int, rank_offset: int,
                         world_size: int, timeout_s: float, group_id: str = "",
                         owner: str | None = None) -> JoinReply:
        """Join the trainer's transfer group. It stays open across syncs (rebuilding NCCL
        communicators every sync is expensive) until a failure or ``leave_group``.

        The workers join in a thread of their own and are asked every ``_JOIN_POLL_S`` how
        far they got: a worker answers RPCs one at a time, and one held in the rendezvous
        would make ``abort_sync`` wait for the whole deadline behind it. ``abort_sync`` ends a
        join in progress at once (the workers' ``ws_leave_group`` cancels theirs)."""
        self._expect(*IN_SYNC, EngineState.FENCED, op="join a transfer group", owner=owner)
        self.group_id = None
        token = self._join = object()
        end = time.monotonic() + timeout_s * 1.5
        with self._lease.busy():
            out = await self._rpc("ws_join_group", backend, host, port, rank_offset, world_size,
                                  timeout_s, _JOIN_POLL_S, reply=JoinProgress,
                                  timeout=timeout_s * 1.5)
            while not all(p.joined for p in out):
                left = end - time.monotonic()
                if self._join is not token:
                    raise TransferError("the join was cancelled (the sync was aborted)",
                                        engine=self.spec.name)
                if left <= 0:
                    await self._rpc("ws_leave_group", reply=Ack, timeout=60)
                    raise DeadlineExceeded(f"ws_join_group exceeded {timeout_s * 1.5}s",
                                           engine=self.spec.name)
                out = await self._rpc("ws_join_wait", min(_JOIN_POLL_S, left),
                                      reply=JoinProgress, timeout=left + _JOIN_POLL_S)
        if self._join is token:
            self._join = None
        joined = [r.rank for r in out]
        if joined != list(range(rank_offset, rank_offset + len(out))):
            raise TransferError(f"workers joined at ranks {joined}, not {len(out)} ranks from "
                                f"{rank_offset}", engine=self.spec.name)
        self.group_id = group_id or None
        return out[0]

    async def leave_group(self) -> None:
        self.group_id = None
        await self._rpc("ws_leave_group", reply=Ack, timeout=60)

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
        self._expect(*IN_SYNC, EngineState.FENCED, op="receive weights", owner=owner)
        request = ReceiveRequest.model_validate_json(request_json)
        plan_json = self._plan.text(plan_json)  # (or PlanNotHeld: nothing changed yet)
        self._unchecked_load = not request.check_finite
        if self.state != EngineState.FENCED:
            self.state = EngineState.LOADING
        if request.apply == "streaming":
            self.weights_intact = False  # from the first byte on, until commit
        t = time.perf_counter()
        try:
            with self._lease.busy():
                reports = await self._plan_rpc("ws_receive", plan_json, request_json,
                                               reply=ReceiveReport,
                                               timeout=request.deadline_s * 1.5)
            report = merge_receipts([hops(r, t, time.perf_counter(), "vllm", "worker")
                                     for r in reports], self.spec.name)
        except WeightSyncError as e:
            self.group_id = None  # a worker leaves a group that failed it
            several = self.workers is not None and self.workers.workers > 1
            if request.apply == "atomic" and (several or not isinstance(e, TransferError)):
                self.weights_intact = False  # (several workers: another one may have loaded)
            raise
        if report.applied:
            self.weights_intact = False  # new weights, not yet committed
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
        self._expect(EngineState.LOADING, EngineState.FENCED, op="apply staged weights",
                     owner=owner)
        self.weights_intact = False
        with self._lease.busy():
            replies = await self._rpc("ws_apply_staged", reply=ApplyReply, timeout=deadline_s)
        return merge_applies(replies, self.spec.name).model_copy(
            update={"finish": self._fingerprinted(replies)})

    def _fingerprinted(self, replies: Sequence[ReceiveReport | ApplyReply]
                       ) -> FinishReply | None:
        """Keep the fingerprints every worker took of what it just loaded, for ``finish_load``;
        returned as the finished verify step when no cache needs a reset before commit."""
        if not replies or any(r.fingerprint is None for r in replies):
            return None  # not applied (staged), or a worker that did not fingerprint
        took = max(r.seconds.get("fingerprint", 0.0) for r in replies)
        self._loaded = merge_fingerprints(
            [Fingerprint(digest=r.fingerprint, rebuilt=r.rebuilt) for r in replies], self.workers,
            seconds={"fingerprint": took}, skipped=(_CLEAN,) if self._caches_clean else ())
        return self._loaded if self._caches_clean else None

    async def _checkpoint(self, path: str | None, partial: bool,
                          roots: Sequence[str] | None, deadline_s: float,
                          check_finite: bool = True) -> CheckpointFiles:
        """Resolve a checkpoint directory (``None``: the engine's own model) into its files, in
        a thread and under a deadline (``weightsync.checkpoint``: files one by one, inside the
        load roots, regular files only, bounded headers). The worker opens them, checks their
        headers against the model and loads those same open files (``ws_check_files``,
        ``ws_reload_files``).

        The engine's own ``EngineSpec.load_roots`` bind every path it reads, whoever asks:
        ``roots`` from a caller may only narrow them (a path must be inside both), never widen
        them. An engine started without load roots reads where its (trusted) caller says."""
        own = self.spec.load_roots if path is not None else ()

        def resolve() -> tuple[str, ...]:
            if path is None:
                return read_checkpoint(self.spec.model).files
            if own and roots is not None:
                read_checkpoint(path, roots)  # (inside the caller's roots too)
            return read_checkpoint(path, own or roots).files

        try:
            files = await asyncio.wait_for(asyncio.to_thread(resolve), deadline_s)
        except TimeoutError as e:
            raise DeadlineExceeded(f"reading checkpoint headers took over {deadline_s:.0f}s",
                                   engine=self.spec.name) from e
        return CheckpointFiles(files=files, partial=partial and path is not None,
                               check_finite=check_finite,
                               roots=tuple(own or roots or ()) if path is not None else ())

    async def validate_checkpoint(self, path: str | None, *, partial: bool = False,
                                  roots: Sequence[str] | None = None,
                                  deadline_s: float = 60.0) -> str:
        """Check a checkpoint against the model before anything changes (any state):
        ``ManifestError``/``ConfigError`` if it does not fit. The workers keep the files they
        checked open; returns their identity (``CheckedFiles``), for ``reload_from_path``."""
        ckpt = await self._checkpoint(path, partial, roots, deadline_s)
        checked = await self._rpc("ws_check_files", ckpt.model_dump_json(), reply=CheckedFiles,
                                  timeout=deadline_s)
        if len({c.identity for c in checked}) != 1:
            raise ManifestError("the checkpoint changed while this engine's workers read it; "
                                "nothing was loaded", engine=self.spec.name)
        self._checked = ckpt.model_copy(update={"identity": checked[0].identity})
        return checked[0].identity

    async def reload_from_path(self, path: str | None, deadline_s: float, *,
                               partial: bool = False,
                               roots: Sequence[str] | None = None,
                               owner: str | None = None,
                               check_finite: bool = True,
                               identity: str | None = None) -> ReloadReply:
        """Reload weights from a safetensors directory (``None``: the original model), loading
        exactly the files that were checked. A checkpoint refused before loading leaves the
        weights as they were."""
        self._expect(*IN_SYNC, EngineState.FENCED, op="reload from a checkpoint", owner=owner)
        kept, self._checked = self._checked, None
        if identity is not None:  # the files the workers checked and kept open: no new read
            if kept is None or kept.identity != identity:
                raise ManifestError("this engine no longer holds the checkpoint it checked; "
                                    "nothing was loaded", engine=self.spec.name)
            ckpt = kept.model_copy(update={"check_finite": check_finite})
        else:
            ckpt = await self._checkpoint(path, partial, roots, deadline_s, check_finite)
        if self.state != EngineState.FENCED:
            self.state = EngineState.LOADING
        self._unchecked_load = not check_finite
        intact, self.weights_intact = self.weights_intact, False
        try:
            with self._lease.busy():
                out = await self._rpc("ws_reload_files", ckpt.model_dump_json(),
                                      reply=ReloadReply, timeout=deadline_s)
        except (ManifestError, VerificationError):  # refused before loading any tensor
            self.weights_intact = intact
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
        self._check_owner(owner, "verify the weights")
        seconds: dict[str, float] = {}
        skipped: tuple[str, ...] = ()
        t = time.perf_counter()
        with self._lease.busy():
            if self._caches_clean:
                skipped = (_CLEAN,)
            elif not self._testing_keep_caches:
                await asyncio.wait_for(self._reset_caches(), deadline_s)
                seconds["reset_caches"] = time.perf_counter() - t
            loaded, self._loaded = self._loaded, None
            if loaded is not None:  # the workers fingerprinted the load as they made it
                return loaded.model_copy(update={"seconds": {**loaded.seconds, **seconds},
                                                 "skipped": skipped})
            t = time.perf_counter()
            prints = await self._rpc("ws_fingerprint", reply=Fingerprint, timeout=deadline_s)
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
        self._expect(*IN_SYNC, EngineState.FENCED, op="run the canary", owner=owner)
        canary = Canary.model_validate_json(canary_json)
        t = time.perf_counter()
        with self._lease.busy():
            woke = "kv_cache" in self._asleep
            if woke:
                await self._wake(["kv_cache"], deadline_s)
            if not (woke and vllm_compat.WAKE_RESUMES and not self._asleep):
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
        self._expect(*IN_SYNC, EngineState.FENCED, op="commit", owner=owner)
        return await self._commit(version, deadline_s)

    async def _commit(self, version: int, deadline_s: float) -> CommitReply:
        if version <= self.version:
            raise IllegalStateError(f"version {version} is not newer than {self.version}",
                                    engine=self.spec.name)
        with self._lease.busy():
            seconds = await self._wake_and_resume(deadline_s)
            if self._kv_tainted:  # the version before may have written NaN into KV blocks
                t = time.perf_counter()
                await self._rpc("ws_scrub_kv", reply=Ack, timeout=deadline_s)
                seconds["scrub_kv"] = time.perf_counter() - t
        self._kv_tainted = self._unchecked_load
        self._lease.release()
        self._found = None
        self._loaded = None
        self.version = version
        self.weights_intact = True
        self.fenced_reason = None
        seconds["total"] = time.perf_counter() - self._sync_started
        self.last_sync = seconds
        self.state = EngineState.SERVING
        self._serving.set()
        return CommitReply(seconds=seconds)

    async def abort_sync(self, reason: str, deadline_s: float = 60.0, *,
                         fence: bool = False, owner: str | None = None,
                         restore: bool = True) -> EngineStatus:
        """Undo a sync that will not commit. With ``fence`` (this engine failed), or when the
        sync touched its weights, the engine is fenced (not routable) until a resync
        verifies. Otherwise it goes back to how the sync found it: serving its old version,
        or (``restore``) asleep at the level it slept, for the trainer that put it there.

        A call from an ``owner`` that no longer holds the sync (its lease lapsed, or another
        coordinator took over) changes nothing."""
        if self._lease.held_by_other(owner):
            return self.status()
        self._join = None  # a join in progress stops asking its workers (who leave below)
        found, self._found = self._found, None
        self._loaded = None
        if found is None:  # no sync in progress: as a sleep (or pause) left the engine
            found = Found(self.state, frozenset(self._asleep), self.sleep_level,
                           self.weights_intact, None, 0.0)
        self._lease.release()
        if fence:
            self.fence(reason)
        if self.state not in IN_SYNC and self.state != EngineState.FENCED:
            return self.status()
        try:
            await self._rpc("ws_drop_staged", reply=Ack, timeout=deadline_s)
            self.group_id = None  # a failed sync never reuses its group
            await self._rpc("ws_leave_group", reply=Ack, timeout=deadline_s)
        except WeightSyncError:
            logger.warning("engine %s: cleanup after failed sync raised", self.spec.name,
                           exc_info=True)
        asleep = found.state in (EngineState.ASLEEP, EngineState.WEIGHTS_AWAKE)
        untouched = self.weights_intact or (asleep and not found.weights_intact)
        if self.state == EngineState.FENCED or not untouched:
            self.fence(reason)
        elif asleep and restore:
            await self._sleep_again(found, deadline_s)
            logger.warning("engine %s: sync aborted (%s); asleep again at level %d",
                           self.spec.name, reason, self.sleep_level)
        elif self.weights_intact:
            await self._wake_and_resume(deadline_s)
            self.state = EngineState.SERVING
            self._serving.set()
            logger.warning("engine %s: sync aborted (%s); still serving version %d",
                           self.spec.name, reason, self.version)
        else:  # its owner is gone and its weights were discarded by sleep: keep it asleep
            self.fence(f"{reason} (asleep at level {self.sleep_level}: no weights to serve)")
        return self.status()

    def fence(self, reason: str) -> None:
        self.state = EngineState.FENCED
        self.fenced_reason = reason
        self._serving.clear()
        logger.error("engine %s fenced: %s", self.spec.name, reason)

    async def pause(self, mode: PauseMode = "abort") -> EngineStatus:
        """Manual pause (control plane). New requests wait until ``resume``."""
        self._expect(EngineState.SERVING, op="pause")
        self._serving.clear()
        await self._pause(mode, 60.0)
        self.state = EngineState.PAUSED
        return self.status()

    async def resume(self) -> EngineStatus:
        self._expect(EngineState.PAUSED, op="resume")
        await vllm_compat.resume_generation(self.engine)
        self.state = EngineState.SERVING
        self._serving.set()
        return self.status()

    async def kernel_layout(self) -> LayoutStatus:
        """The engine's kernel layout (fast path) and whether it has been verified."""
        return merge_layouts(await self._rpc("ws_kernel_layout", reply=LayoutStatus,
                                             timeout=120), self.workers)

    async def runner_class(self) -> str:
        return self.info.runner if self.info is not None else ""

    async def gpu_memory(self) -> GpuMemory:
        """Device memory of every GPU the engine's workers use, as they see it now
        (``free``/``total`` are device-wide, so a colocated trainer counts too;
        ``workers.merge_memory``); all ``None`` on CPU."""
        return merge_memory(await self._rpc("ws_gpu_memory", reply=GpuMemory, timeout=30),
                            self.workers)

    async def reset_caches(self) -> None:
        """Drop prefix, multimodal and encoder caches (a sync makes sure of this every load)."""
        await self._reset_caches()

    async def testing_keep_caches(self, keep: bool) -> None:
        """TEST ONLY — never in production. With ``keep``, a sync neither clears caches at pause
        nor resets them after the load, so tests can show that stale encoder / prefix caches are
        real. Sleep levels 1 and 2 still clear caches inside vLLM, so use sleep_level=0."""
        logger.warning("engine %s: TEST ONLY cache resets %s", self.spec.name,
                       "DISABLED" if keep else "enabled")
        self._testing_keep_caches = keep


