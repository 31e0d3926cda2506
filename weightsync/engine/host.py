"""One vLLM engine (``AsyncLLM``) and the per-engine half of the sync protocol.

The host owns the engine's state machine. The coordinator drives it with coarse steps —
``begin_sync`` -> ``receive`` -> ``apply_staged`` -> ``finish_load`` -> ``commit`` (or
``abort_sync``) — and every step checks that it is legal now, so a confused caller gets an
``IllegalStateError`` instead of an engine in an undefined state. Every reply is a frozen model
(``weightsync.messages``); every call into vLLM goes through ``vllm_compat``.
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
from weightsync.engine.lease import SyncLease
from weightsync.errors import (DeadlineExceeded, EngineError, FencedError, IllegalStateError,
                               ManifestError, TransferError, UnsupportedError, WeightSyncError,
                               error_class)
from weightsync.engine.workers import (check_workers, merge_applies, merge_fingerprints,
                                       merge_layouts, merge_receipts)
from weightsync.messages import (Ack, ApplyReply, BeginReply, CommitReply, EngineWorkers,
                                 FinishReply, Fingerprint, GpuMemory, JoinReply, LayoutStatus,
                                 ReceiveRequest, ReloadReply, WorkerInfo, reply_of)
from weightsync.types import (CheckpointFiles, EngineState, EngineStatus, GenerationResult,
                              PauseMode, ReceiveReport)

logger = logging.getLogger(__name__)

WORKER_EXTENSION = "weightsync.engine.worker_ext.WeightSyncWorkerExtension"
_IN_SYNC = {EngineState.PAUSED, EngineState.ASLEEP, EngineState.WEIGHTS_AWAKE, EngineState.LOADING}
M = TypeVar("M", bound=BaseModel)


class EngineHost:
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
        self._asleep: set[str] = set()  # vLLM sleep tags not yet woken (manual sleep/wake)
        self.last_sleep_memory: GpuMemory | None = None  # right after a sync's sleep
        self._testing_keep_caches = False  # TEST ONLY: see testing_keep_caches()
        self._lease = SyncLease()  # who owns the sync in progress, until when
        self._watchdog: asyncio.Task | None = None

    # ---- lifecycle -----------------------------------------------------------------------
    async def start(self) -> EngineStatus:
        vllm_compat.prepare_process_env(self.device, self.spec.tensor_parallel_size,
                                        self.spec.cpu_threads_bind)
        sleep = self.device == "cuda" and vllm_compat.sleep_mode_available()
        t0 = time.perf_counter()
        self.engine = self._make_engine(
            model=self.spec.model, dtype=self.spec.dtype, max_model_len=self.spec.max_model_len,
            seed=self.spec.seed, enforce_eager=self.spec.enforce_eager,
            tensor_parallel_size=self.spec.tensor_parallel_size,
            gpu_memory_utilization=self.spec.gpu_memory_utilization, enable_sleep_mode=sleep,
            worker_extension_cls=WORKER_EXTENSION,
            limit_mm_per_prompt=self.spec.limit_mm_per_prompt,
            kv_cache_bytes=int(self.spec.cpu_kvcache_gib * (1 << 30)) if self.device == "cpu"
            else None,
        )
        self.sleep_supported = sleep
        infos = await self._rpc("ws_info", reply=WorkerInfo, timeout=300)
        self.workers = check_workers(infos, self.spec.name)
        self.info = infos[0]
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

    async def shutdown(self) -> None:
        if self.engine is not None:
            vllm_compat.shutdown(self.engine)
            self.engine = None
        self.state = EngineState.STOPPED

    # ---- serving -------------------------------------------------------------------------
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
            await asyncio.wait_for(self._serving.wait(), wait_s)
        except TimeoutError as e:
            raise EngineError(f"engine not serving after {wait_s}s (state {self.state.value})",
                              engine=self.spec.name) from e
        self._require_routable()
        self._admit(len(prompts) * n)  # no await since the gate: begin_sync will wait for them

        def params(i: int):  # a seeded request with n copies: copy i uses seed + i
            return vllm_compat.sampling_params(
                max_tokens=max_tokens, temperature=temperature, logprobs=0 if logprobs else None,
                seed=None if seed is None else seed + i, ignore_eos=ignore_eos)

        return list(await asyncio.gather(*(self._one(p, params(i))
                                           for p in prompts for i in range(n))))

    def _admit(self, k: int) -> None:
        self._admitted += k
        if self._admitted:
            self._all_in_engine.clear()

    def _in_engine(self) -> None:
        self._admitted -= 1
        if not self._admitted:
            self._all_in_engine.set()

    async def _one(self, prompt: Any, params: Any) -> GenerationResult:
        v0 = self.version
        final = None
        self._running += 1
        self._none_running.clear()
        try:
            async for out in vllm_compat.generate(self.engine, prompt, params,
                                                  request_id=uuid.uuid4().hex):
                if final is None:
                    self._in_engine()  # its first output: vLLM is running it
                final = out
        finally:
            if final is None:
                self._in_engine()
            self._running -= 1
            if not self._running:
                self._none_running.set()
        v1 = self.version
        c = vllm_compat.completion(final)
        return GenerationResult(
            prompt=prompt if isinstance(prompt, str) else None, text=c.text,
            token_ids=c.token_ids, logprobs=c.logprobs, finish_reason=c.finish_reason,
            version=v0 if v0 == v1 else None, versions=(v0, v1),
            aborted=c.finish_reason == "abort",
        )

    async def _pause(self, mode: PauseMode, deadline_s: float, clear_cache: bool = True) -> None:
        """Pause vLLM, then wait until every request it aborted or drained has its final
        output (so each is stamped with the version that produced it), and no longer: an idle
        pause costs what vLLM's own steps cost. Requests frozen by ``keep`` finish after the
        sync, on the new weights."""
        await asyncio.wait_for(vllm_compat.pause_generation(self.engine, mode,
                                                            clear_cache=clear_cache), deadline_s)
        if mode != "keep":
            await asyncio.wait_for(self._none_running.wait(), deadline_s)

    def _require_routable(self) -> None:
        if self.state == EngineState.FENCED:
            raise FencedError(f"fenced: {self.fenced_reason}", engine=self.spec.name)
        if self.state in (EngineState.STARTING, EngineState.STOPPED):
            raise EngineError(f"engine is {self.state.value}", engine=self.spec.name)

    # ---- sync protocol (engine half) -------------------------------------------------------
    def _expect(self, *states: EngineState, op: str) -> None:
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
        await self._rpc("ws_validate", plan_json, reply=Ack, timeout=60)

    async def begin_sync(self, *, pause_mode: PauseMode, sleep_level: int, deadline_s: float,
                         owner: str = "", lease_s: float = 0.0, takeover: bool = False,
                         version: int = 0) -> BeginReply:
        """Pause, and (GPU) sleep + wake the weights. The coordinator validates the plan on
        every engine (``validate``) before any begins.

        The sync belongs to ``owner`` for ``lease_s`` seconds, renewed by ``renew_lease``
        (``weightsync.engine.lease``). A sync still held by another owner is ended first if
        its lease lapsed or ``takeover`` says that owner is gone; otherwise this is refused."""
        await self._take_over(owner, takeover)
        self._expect(EngineState.SERVING, EngineState.FENCED, op="begin a sync")
        self.version_seen = max(self.version_seen, version)
        self._lease.take(owner, lease_s)
        if lease_s and (self._watchdog is None or self._watchdog.done()):
            self._watchdog = asyncio.create_task(self._watch(lease_s))
        seconds: dict[str, float] = {}
        skipped: list[str] = []
        self._serving.clear()
        self._sync_started = time.perf_counter()
        t = time.perf_counter()
        # Requests that passed the gate just before it closed may not have reached vLLM yet:
        # pausing now would park them unstarted and stamp them with both versions although
        # the new weights produce all their tokens. Let them in first; the pause mode then
        # decides their fate like any other request in flight.
        await asyncio.wait_for(self._all_in_engine.wait(), deadline_s)
        await self._pause(pause_mode, deadline_s, clear_cache=not self._testing_keep_caches)
        seconds["pause"] = time.perf_counter() - t
        if self.state != EngineState.FENCED:
            self.state = EngineState.PAUSED
        if sleep_level:
            if not self.sleep_supported:
                skipped.append(f"sleep/wake: sleep mode is CUDA-only; engine {self.spec.name} "
                               f"runs on {self.device}")
            else:
                t = time.perf_counter()
                await asyncio.wait_for(vllm_compat.sleep(self.engine, sleep_level, pause_mode),
                                       deadline_s)
                seconds["sleep"] = time.perf_counter() - t
                self.last_sleep_memory = await self.gpu_memory()
                self.sleep_level = sleep_level
                self.weights_intact = sleep_level == 1
                t = time.perf_counter()
                await asyncio.wait_for(vllm_compat.wake_up(self.engine, ["weights"]), deadline_s)
                seconds["wake_weights"] = time.perf_counter() - t
                if self.state != EngineState.FENCED:
                    self.state = EngineState.WEIGHTS_AWAKE
        return BeginReply(seconds=seconds, skipped=tuple(skipped), group_id=self.group_id)

    async def _take_over(self, owner: str, takeover: bool) -> None:
        held_by, left = self._lease.owner, self._lease.left()
        if held_by is None or held_by == owner or self.state not in _IN_SYNC:
            return
        if not (takeover or self._lease.lapsed()):
            raise IllegalStateError(
                f"a sync owned by {held_by} holds this engine for {max(left or 0, 0):.1f}s "
                "more; take it over only if that coordinator is gone", engine=self.spec.name)
        await self._end_stale_sync(f"taken over by {owner or 'a new coordinator'} from "
                                   f"{held_by}")

    async def renew_lease(self, owner: str, lease_s: float) -> bool:
        """The owner's heartbeat; False when it no longer holds this engine's sync."""
        return self._lease.renew(owner, lease_s)

    async def _watch(self, lease_s: float) -> None:
        """End a sync whose owner went silent (its lease lapsed between calls)."""
        while True:
            await asyncio.sleep(min(1.0, max(lease_s / 4, 0.05)))
            if self._lease.lapsed() and self.state in (*_IN_SYNC, EngineState.FENCED):
                await self._end_stale_sync(f"lease of {self._lease.owner} expired: its "
                                           "coordinator went silent mid-sync")
            elif self._lease.owner is None:
                return

    async def _end_stale_sync(self, reason: str) -> None:
        """Weights intact: serve the old version again; touched: fenced with ``reason``."""
        logger.warning("engine %s: ending a sync nobody drives: %s", self.spec.name, reason)
        self._lease.release()
        await self.abort_sync(reason, fence=False)

    async def join_group(self, backend: str, host: str, port: int, rank_offset: int,
                         world_size: int, timeout_s: float, group_id: str = "") -> JoinReply:
        """Join the trainer's transfer group. It stays open across syncs (rebuilding NCCL
        communicators every sync is expensive) until a failure or ``leave_group``."""
        self._expect(*_IN_SYNC, EngineState.FENCED, op="join a transfer group")
        self.group_id = None
        with self._lease.busy():
            out = await self._rpc("ws_join_group", backend, host, port, rank_offset, world_size,
                                  timeout_s, reply=JoinReply, timeout=timeout_s * 1.5)
        joined = [r.rank for r in out]
        if joined != list(range(rank_offset, rank_offset + len(out))):
            raise TransferError(f"workers joined at ranks {joined}, not {len(out)} ranks from "
                                f"{rank_offset}", engine=self.spec.name)
        self.group_id = group_id or None
        return out[0]

    async def leave_group(self) -> None:
        self.group_id = None
        await self._rpc("ws_leave_group", reply=Ack, timeout=60)

    async def receive(self, plan_json: str, request_json: str) -> ReceiveReport:
        """Receive a plan through the leg ``request_json`` (a ``ReceiveRequest``) names; the
        worker stages it, streams it into the loader, or verifies and loads it (``atomic``).

        A ``TransferError`` (a verification error included) means nothing was applied; any
        other failure of a streaming or atomic apply may have left the weights half-applied.
        """
        t_enter = time.perf_counter()
        self._expect(*_IN_SYNC, EngineState.FENCED, op="receive weights")
        request = ReceiveRequest.model_validate_json(request_json)
        if self.state != EngineState.FENCED:
            self.state = EngineState.LOADING
        if request.apply == "streaming":
            self.weights_intact = False  # from the first byte on, until commit
        t = time.perf_counter()
        try:
            with self._lease.busy():
                report = merge_receipts(await self._rpc("ws_receive", plan_json, request_json,
                                                        reply=ReceiveReport,
                                                        timeout=request.deadline_s * 1.5),
                                        self.spec.name)
        except WeightSyncError as e:
            self.group_id = None  # a worker leaves a group that failed it
            if request.apply == "atomic" and not isinstance(e, TransferError):
                self.weights_intact = False
            raise
        if report.applied:
            self.weights_intact = False  # new weights, not yet committed
        return report.model_copy(update={"seconds": {
            **report.seconds, "host_rpc": time.perf_counter() - t,  # vLLM's RPC included
            "host": time.perf_counter() - t_enter}})  # this whole actor method

    async def apply_staged(self, deadline_s: float) -> ApplyReply:
        self._expect(EngineState.LOADING, EngineState.FENCED, op="apply staged weights")
        self.weights_intact = False
        with self._lease.busy():
            return merge_applies(await self._rpc("ws_apply_staged", reply=ApplyReply,
                                                 timeout=deadline_s), self.spec.name)

    async def _checkpoint(self, path: str | None, partial: bool,
                          roots: Sequence[str] | None, deadline_s: float) -> CheckpointFiles:
        """Resolve a checkpoint directory (``None``: the engine's own model) into its files, in
        a thread and under a deadline (``weightsync.checkpoint``: files one by one, inside
        ``roots`` when given, regular files only, bounded headers). The worker checks their
        headers against the model before it loads anything (``ws_check_files``,
        ``ws_reload_files``)."""
        def resolve() -> tuple[str, ...]:
            if path is None:
                return read_checkpoint(self.spec.model).files
            return read_checkpoint(path, roots).files

        try:
            files = await asyncio.wait_for(asyncio.to_thread(resolve), deadline_s)
        except TimeoutError as e:
            raise DeadlineExceeded(f"reading checkpoint headers took over {deadline_s:.0f}s",
                                   engine=self.spec.name) from e
        return CheckpointFiles(files=files, partial=partial and path is not None)

    async def validate_checkpoint(self, path: str | None, *, partial: bool = False,
                                  roots: Sequence[str] | None = None,
                                  deadline_s: float = 60.0) -> None:
        """Check a checkpoint against the model before anything changes (any state):
        ``ManifestError``/``ConfigError`` if it does not fit."""
        ckpt = await self._checkpoint(path, partial, roots, deadline_s)
        await self._rpc("ws_check_files", ckpt.model_dump_json(), reply=Ack, timeout=deadline_s)

    async def reload_from_path(self, path: str | None, deadline_s: float, *,
                               partial: bool = False,
                               roots: Sequence[str] | None = None) -> ReloadReply:
        """Reload weights from a safetensors directory (``None``: the original model), loading
        exactly the files that were checked. A checkpoint refused before loading leaves the
        weights as they were."""
        self._expect(*_IN_SYNC, EngineState.FENCED, op="reload from a checkpoint")
        ckpt = await self._checkpoint(path, partial, roots, deadline_s)
        if self.state != EngineState.FENCED:
            self.state = EngineState.LOADING
        intact, self.weights_intact = self.weights_intact, False
        try:
            with self._lease.busy():
                out = await self._rpc("ws_reload_files", ckpt.model_dump_json(),
                                      reply=ReloadReply, timeout=deadline_s)
        except ManifestError:  # the worker refused the files before loading any of them
            self.weights_intact = intact
            raise
        return ReloadReply(reload=max(r.reload for r in out))  # every worker loaded

    async def finish_load(self, deadline_s: float) -> FinishReply:
        """Reset prefix, encoder and multimodal caches; return a fingerprint of the weights."""
        t = time.perf_counter()
        with self._lease.busy():
            if not self._testing_keep_caches:
                await asyncio.wait_for(self._reset_caches(), deadline_s)
            reset = time.perf_counter() - t
            t = time.perf_counter()
            prints = await self._rpc("ws_fingerprint", reply=Fingerprint, timeout=deadline_s)
        return merge_fingerprints(prints, self.workers, {
            "reset_caches": reset, "fingerprint": time.perf_counter() - t})

    async def _reset_caches(self) -> None:
        # Requests frozen by pause mode "keep" hold KV blocks computed with the old weights:
        # preempt them so they recompute on the new ones, and insist the reset succeeded.
        if not await vllm_compat.reset_caches(self.engine):
            raise EngineError("prefix cache could not be reset: stale KV would be served",
                              engine=self.spec.name)

    async def commit(self, version: int, deadline_s: float) -> CommitReply:
        """Wake the KV cache, resume, and serve ``version``. Unfences a resynced engine."""
        self._expect(*_IN_SYNC, EngineState.FENCED, op="commit")
        if version <= self.version:
            raise IllegalStateError(f"version {version} is not newer than {self.version}",
                                    engine=self.spec.name)
        with self._lease.busy():
            seconds = await self._wake_and_resume(deadline_s)
        self._lease.release()
        self.version = version
        self.weights_intact = True
        self.fenced_reason = None
        seconds["total"] = time.perf_counter() - self._sync_started
        self.last_sync = seconds
        self.state = EngineState.SERVING
        self._serving.set()
        return CommitReply(seconds=seconds)

    async def _wake_and_resume(self, deadline_s: float) -> dict[str, float]:
        seconds: dict[str, float] = {}
        if self.sleep_level:
            t = time.perf_counter()
            await asyncio.wait_for(vllm_compat.wake_up(self.engine, ["kv_cache"]), deadline_s)
            seconds["wake_kv"] = time.perf_counter() - t
            self.sleep_level = 0
        t = time.perf_counter()
        await asyncio.wait_for(vllm_compat.resume_generation(self.engine), deadline_s)
        seconds["resume"] = time.perf_counter() - t
        return seconds

    async def abort_sync(self, reason: str, deadline_s: float = 60.0, *,
                         fence: bool = False) -> EngineStatus:
        """Undo a sync that will not commit. With ``fence`` (this engine failed), or when its
        weights were touched, the engine is fenced (not routable) until a resync verifies;
        otherwise it resumes serving its old version."""
        self._lease.release()
        if fence:
            self.fence(reason)
        if self.state not in _IN_SYNC and self.state != EngineState.FENCED:
            return self.status()
        try:
            await self._rpc("ws_drop_staged", reply=Ack, timeout=deadline_s)
            self.group_id = None  # a failed sync never reuses its group
            await self._rpc("ws_leave_group", reply=Ack, timeout=deadline_s)
        except WeightSyncError:
            logger.warning("engine %s: cleanup after failed sync raised", self.spec.name,
                           exc_info=True)
        if self.weights_intact and self.state != EngineState.FENCED:
            await self._wake_and_resume(deadline_s)
            self.state = EngineState.SERVING
            self._serving.set()
            logger.warning("engine %s: sync aborted (%s); still serving version %d",
                           self.spec.name, reason, self.version)
        else:
            self.fence(reason)
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
        """Device memory as the worker sees it now (``free``/``total`` are device-wide, so a
        colocated trainer counts too); all ``None`` on CPU."""
        return (await self._rpc("ws_gpu_memory", reply=GpuMemory, timeout=30))[0]

    async def memory_after_sleep(self) -> GpuMemory | None:
        """``gpu_memory()`` as read right after the last sync's sleep (None if none slept)."""
        return self.last_sleep_memory

    async def reset_caches(self) -> None:
        """Drop prefix, multimodal and encoder caches (a sync does this after every load)."""
        await self._reset_caches()

    async def testing_keep_caches(self, keep: bool) -> None:
        """TEST ONLY — never in production. With ``keep``, a sync neither clears caches at pause
        nor resets them after the load, so tests can show that stale encoder / prefix caches are
        real. Sleep levels 1 and 2 still clear caches inside vLLM, so use sleep_level=0."""
        logger.warning("engine %s: TEST ONLY cache resets %s", self.spec.name,
                       "DISABLED" if keep else "enabled")
        self._testing_keep_caches = keep

    async def sleep(self, level: int) -> None:
        if not self.sleep_supported:
            raise UnsupportedError(f"sleep mode is CUDA-only; engine runs on {self.device}",
                                   engine=self.spec.name)
        self._expect(EngineState.SERVING, EngineState.PAUSED, op="sleep")
        self._serving.clear()
        await vllm_compat.sleep(self.engine, level)
        self.sleep_level = level
        self._asleep = {"weights", "kv_cache"}
        self.weights_intact = level == 1
        self.state = EngineState.ASLEEP

    async def wake_up(self, tags: list[str] | None) -> None:
        """Wake what ``tags`` names (None: everything). Serving resumes only once both the
        weights and the KV cache are awake; weights discarded by sleep level 2 and woken
        without a sync are undefined, so the engine is fenced until one verifies."""
        self._expect(EngineState.ASLEEP, EngineState.WEIGHTS_AWAKE, op="wake up")
        waking = {"weights", "kv_cache"} if tags is None else set(tags)
        await vllm_compat.wake_up(self.engine, tags)
        if "weights" in waking and not self.weights_intact:
            self.fence("woken after sleep level 2 without new weights: weights undefined")
            return
        self._asleep -= waking
        if not self._asleep:
            self.sleep_level = 0
            await vllm_compat.resume_generation(self.engine)
            self.state = EngineState.SERVING
            self._serving.set()
        elif "weights" not in self._asleep:
            self.state = EngineState.WEIGHTS_AWAKE
