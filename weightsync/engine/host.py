"""One vLLM engine (``AsyncLLM``) and the per-engine half of the sync protocol.

The host owns the engine's state machine. The coordinator drives it with coarse steps —
``begin_sync`` -> ``receive``/``receive_ipc`` -> ``apply_staged`` -> ``finish_load`` -> ``commit``
(or ``abort_sync``) — and every step checks that it is legal now, so a confused caller gets an
``IllegalStateError`` instead of an engine in an undefined state.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Sequence
from typing import Any

from weightsync.checkpoint import read_checkpoint
from weightsync.config import EngineSpec
from weightsync.engine import vllm_compat
from weightsync.engine.worker_ext import ERROR_KEY
from weightsync.errors import (DeadlineExceeded, EngineError, FencedError, IllegalStateError,
                               ManifestError, TransferError, UnsupportedError, WeightSyncError, error_class)
from weightsync.types import (CheckpointFiles, EngineState, EngineStatus, GenerationResult,
                              PauseMode, ReceiveReport)

logger = logging.getLogger(__name__)

WORKER_EXTENSION = "weightsync.engine.worker_ext.WeightSyncWorkerExtension"
_IN_SYNC = {EngineState.PAUSED, EngineState.ASLEEP, EngineState.WEIGHTS_AWAKE, EngineState.LOADING}


class EngineHost:
    """Hosts one engine. All methods are coroutines; none blocks the event loop for long."""

    def __init__(self, spec: EngineSpec) -> None:
        self.spec = spec
        self.device = vllm_compat.resolve_device(spec.device)
        self.engine: Any = None
        self.state = EngineState.STARTING
        self.version = 0
        self.sleep_level = 0
        self.weights_intact = True  # False once weights were discarded or partly overwritten
        self.fenced_reason: str | None = None
        self.last_sync: dict[str, float] = {}
        self._serving = asyncio.Event()
        self._admitted = 0  # requests past the serving gate that vLLM has not started yet
        self._all_in_engine = asyncio.Event()
        self._all_in_engine.set()
        self._sync_started = 0.0
        self.group_id: str | None = None  # the broadcast group this engine is in, if any
        self._asleep: set[str] = set()  # vLLM sleep tags not yet woken (manual sleep/wake)
        self.last_sleep_memory: dict[str, int] | None = None  # GPU memory right after a sync's sleep
        self._testing_keep_caches = False  # TEST ONLY: see testing_keep_caches()

    # ---- lifecycle -----------------------------------------------------------------------
    async def start(self) -> EngineStatus:
        vllm_compat.prepare_process_env(self.device)
        sleep = self.device == "cuda" and vllm_compat.sleep_mode_available()
        t0 = time.perf_counter()
        self.engine = vllm_compat.make_async_engine(
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
        self.info = json.loads((await self.engine.collective_rpc("ws_info"))[0])
        self.state = EngineState.SERVING
        self._serving.set()
        logger.info("engine %s up in %.1fs on %s (runner %s)", self.spec.name,
                    time.perf_counter() - t0, self.device, self.info["runner"])
        return self.status()

    def status(self) -> EngineStatus:
        return EngineStatus(
            name=self.spec.name, state=self.state, version=self.version, device=self.device,
            sleep_supported=getattr(self, "sleep_supported", False), sleep_level=self.sleep_level,
            fenced_reason=self.fenced_reason, last_sync=self.last_sync, model=self.spec.model,
        )

    async def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
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
        try:
            async for out in self.engine.generate(prompt, params, request_id=uuid.uuid4().hex):
                if final is None:
                    self._in_engine()  # its first output: vLLM is running it
                final = out
        finally:
            if final is None:
                self._in_engine()
        v1 = self.version
        c = final.outputs[0]
        lps = tuple(float(step[t].logprob) for step, t in zip(c.logprobs, c.token_ids,
                                                                strict=True)) if c.logprobs else ()
        return GenerationResult(
            prompt=prompt if isinstance(prompt, str) else None, text=c.text,
            token_ids=tuple(c.token_ids), logprobs=lps, finish_reason=c.finish_reason,
            version=v0 if v0 == v1 else None, versions=(v0, v1),
            aborted=c.finish_reason == "abort",
        )

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

    async def _rpc(self, method: str, *args: Any, timeout: float | None = None) -> list[Any]:
        """collective_rpc with a deadline; worker errors come back as the same typed errors."""
        try:
            out = await asyncio.wait_for(self.engine.collective_rpc(method, args=args), timeout)
        except TimeoutError as e:
            raise DeadlineExceeded(f"{method} exceeded {timeout}s", engine=self.spec.name) from e
        except Exception as e:  # noqa: BLE001 - vLLM reports worker crashes as plain Exception
            raise EngineError(f"{method} failed in the worker: {e}", engine=self.spec.name) from e
        for o in out:
            if isinstance(o, str) and o.startswith('{"' + ERROR_KEY):
                err = json.loads(o)
                raise error_class(err[ERROR_KEY])(err["message"], engine=self.spec.name)
        return out

    async def validate(self, plan_json: str) -> None:
        """Check a plan against the model before anything changes (raises ManifestError)."""
        await self._rpc("ws_validate", plan_json, timeout=60)

    async def begin_sync(self, *, pause_mode: PauseMode, sleep_level: int,
                         deadline_s: float) -> dict:
        """Pause, and (GPU) sleep + wake the weights. Returns timings and skips. The
        coordinator validates the plan on every engine (``validate``) before any begins."""
        self._expect(EngineState.SERVING, EngineState.FENCED, op="begin a sync")
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
        await asyncio.wait_for(vllm_compat.pause_generation(
            self.engine, pause_mode, clear_cache=not self._testing_keep_caches), deadline_s)
        seconds["pause"] = time.perf_counter() - t
        if self.state != EngineState.FENCED:
            self.state = EngineState.PAUSED
        if sleep_level:
            if not self.sleep_supported:
                skipped.append(f"sleep/wake: sleep mode is CUDA-only; engine {self.spec.name} "
                               f"runs on {self.device}")
            else:
                t = time.perf_counter()
                await asyncio.wait_for(self.engine.sleep(level=sleep_level, mode=pause_mode),
                                       deadline_s)
                seconds["sleep"] = time.perf_counter() - t
                self.last_sleep_memory = await self.gpu_memory()
                self.sleep_level = sleep_level
                self.weights_intact = sleep_level == 1
                t = time.perf_counter()
                await asyncio.wait_for(self.engine.wake_up(tags=["weights"]), deadline_s)
                seconds["wake_weights"] = time.perf_counter() - t
                if self.state != EngineState.FENCED:
                    self.state = EngineState.WEIGHTS_AWAKE
        return {"seconds": seconds, "skipped": skipped, "group_id": self.group_id}

    async def join_group(self, backend: str, host: str, port: int, rank_offset: int,
                         world_size: int, timeout_s: float, group_id: str = "") -> None:
        """Join the trainer's broadcast group. It stays open across syncs (rebuilding NCCL
        communicators every sync is expensive) until a failure or ``leave_group``."""
        self._expect(*_IN_SYNC, EngineState.FENCED, op="join a transfer group")
        self.group_id = None
        await self._rpc("ws_join_group", backend, host, port, rank_offset, world_size,
                        timeout_s, timeout=timeout_s * 1.5)
        self.group_id = group_id or None

    async def leave_group(self) -> None:
        self.group_id = None
        await self._rpc("ws_leave_group", timeout=60)

    async def receive(self, plan_json: str, apply: str, deadline_s: float,
                      ipc_share_json: str | None = None) -> ReceiveReport:
        """Receive a plan (broadcast group, or colocated IPC: an ``IpcShare``, which carries
        the sender's checksums); stage or stream-apply.

        ``apply="atomic"`` (IPC): verify every bucket, then load, in one call. A checksum or
        transfer error leaves the weights untouched; any later failure means they may be
        half-applied (the engine gets fenced).
        """
        t_enter = time.perf_counter()
        self._expect(*_IN_SYNC, EngineState.FENCED, op="receive weights")
        prev = self.state
        self.state = EngineState.LOADING if prev != EngineState.FENCED else prev
        if apply == "streaming":
            self.weights_intact = False  # from the first byte on, until commit
        if ipc_share_json is None:
            try:
                out = await self._rpc("ws_receive", plan_json, apply, deadline_s,
                                      timeout=deadline_s * 1.5)
            except WeightSyncError:
                self.group_id = None  # the worker left the broken group
                raise
        else:
            t = time.perf_counter()
            try:
                out = await self._rpc("ws_receive_ipc", plan_json, ipc_share_json, apply,
                                      timeout=deadline_s * 1.5)
            except TransferError:
                raise  # refused before anything was applied (VerificationError included)
            except WeightSyncError:
                if apply == "atomic":
                    self.weights_intact = False
                raise
        report = ReceiveReport.model_validate_json(out[0])
        if ipc_share_json is not None:  # the call as the host saw it (vLLM's RPC included)
            report.seconds["host_rpc"] = time.perf_counter() - t
            report.seconds["host"] = time.perf_counter() - t_enter  # this whole actor method
        if report.applied:
            self.weights_intact = False  # new weights, not yet committed
        return report

    async def apply_staged(self, deadline_s: float) -> float:
        self._expect(EngineState.LOADING, EngineState.FENCED, op="apply staged weights")
        self.weights_intact = False
        out = await self._rpc("ws_apply_staged", timeout=deadline_s)
        return json.loads(out[0])["reload"]

    async def _checkpoint(self, path: str | None, partial: bool,
                          roots: Sequence[str] | None, deadline_s: float) -> CheckpointFiles:
        """Resolve a checkpoint directory (``None``: the engine's own model) into its files, in
        a thread and under a deadline (``weightsync.checkpoint``: files one by one, inside
        ``roots`` when given, regular files only, bounded headers), and check the headers
        against the model in the worker. Nothing is loaded; ``ManifestError``/``ConfigError``
        if it does not fit."""
        def resolve() -> tuple[str, ...]:
            if path is None:
                return read_checkpoint(self.spec.model).files
            return read_checkpoint(path, roots).files

        try:
            files = await asyncio.wait_for(asyncio.to_thread(resolve), deadline_s)
        except TimeoutError as e:
            raise DeadlineExceeded(f"reading checkpoint headers took over {deadline_s:.0f}s",
                                   engine=self.spec.name) from e
        ckpt = CheckpointFiles(files=files, partial=partial and path is not None)
        await self._rpc("ws_check_files", ckpt.model_dump_json(), timeout=deadline_s)
        return ckpt

    async def validate_checkpoint(self, path: str | None, *, partial: bool = False,
                                  roots: Sequence[str] | None = None,
                                  deadline_s: float = 60.0) -> None:
        """Check a checkpoint against the model before anything changes (any state)."""
        await self._checkpoint(path, partial, roots, deadline_s)

    async def reload_from_path(self, path: str | None, deadline_s: float, *,
                               partial: bool = False,
                               roots: Sequence[str] | None = None) -> float:
        """Reload weights from a safetensors directory (``None``: the original model), loading
        exactly the files that were checked. A checkpoint refused before loading leaves the
        weights as they were."""
        self._expect(*_IN_SYNC, EngineState.FENCED, op="reload from a checkpoint")
        ckpt = await self._checkpoint(path, partial, roots, deadline_s)
        if self.state != EngineState.FENCED:
            self.state = EngineState.LOADING
        intact, self.weights_intact = self.weights_intact, False
        try:
            out = await self._rpc("ws_reload_files", ckpt.model_dump_json(), timeout=deadline_s)
        except ManifestError:  # the worker refused the files before loading any of them
            self.weights_intact = intact
            raise
        return json.loads(out[0])["reload"]

    async def finish_load(self, deadline_s: float) -> dict:
        """Reset prefix, encoder and multimodal caches; return a fingerprint of the weights."""
        t = time.perf_counter()
        if not self._testing_keep_caches:
            await asyncio.wait_for(self._reset_caches(), deadline_s)
        reset = time.perf_counter() - t
        t = time.perf_counter()
        prints = await self._rpc("ws_fingerprint", timeout=deadline_s)
        return {"fingerprint": "|".join(prints),
                "seconds": {"reset_caches": reset, "fingerprint": time.perf_counter() - t}}

    async def _reset_caches(self) -> None:
        # Requests frozen by pause mode "keep" hold KV blocks computed with the old weights:
        # preempt them so they recompute on the new ones, and insist the reset succeeded.
        if not await self.engine.reset_prefix_cache(reset_running_requests=True):
            raise EngineError("prefix cache could not be reset: stale KV would be served",
                              engine=self.spec.name)
        await self.engine.reset_mm_cache()
        await self.engine.reset_encoder_cache()

    async def commit(self, version: int, deadline_s: float) -> dict:
        """Wake the KV cache, resume, and serve ``version``. Unfences a resynced engine."""
        self._expect(*_IN_SYNC, EngineState.FENCED, op="commit")
        if version <= self.version:
            raise IllegalStateError(f"version {version} is not newer than {self.version}",
                                    engine=self.spec.name)
        seconds = await self._wake_and_resume(deadline_s)
        self.version = version
        self.weights_intact = True
        self.fenced_reason = None
        seconds["total"] = time.perf_counter() - self._sync_started
        self.last_sync = seconds
        self.state = EngineState.SERVING
        self._serving.set()
        return seconds

    async def _wake_and_resume(self, deadline_s: float) -> dict[str, float]:
        seconds: dict[str, float] = {}
        if self.sleep_level:
            t = time.perf_counter()
            await asyncio.wait_for(self.engine.wake_up(tags=["kv_cache"]), deadline_s)
            seconds["wake_kv"] = time.perf_counter() - t
            self.sleep_level = 0
        t = time.perf_counter()
        await asyncio.wait_for(self.engine.resume_generation(), deadline_s)
        seconds["resume"] = time.perf_counter() - t
        return seconds

    async def abort_sync(self, reason: str, deadline_s: float = 60.0, *,
                         fence: bool = False) -> EngineStatus:
        """Undo a sync that will not commit. With ``fence`` (this engine failed), or when its
        weights were touched, the engine is fenced (not routable) until a resync verifies;
        otherwise it resumes serving its old version."""
        if fence:
            self.fence(reason)
        if self.state not in _IN_SYNC and self.state != EngineState.FENCED:
            return self.status()
        try:
            await self._rpc("ws_drop_staged", timeout=deadline_s)
            self.group_id = None  # a failed sync never reuses its group
            await self._rpc("ws_leave_group", timeout=deadline_s)
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
        await self.engine.pause_generation(mode=mode)
        self.state = EngineState.PAUSED
        return self.status()

    async def resume(self) -> EngineStatus:
        self._expect(EngineState.PAUSED, op="resume")
        await self.engine.resume_generation()
        self.state = EngineState.SERVING
        self._serving.set()
        return self.status()

    async def kernel_layout(self) -> dict:
        """The engine's kernel layout (fast path) and whether it has been verified."""
        return json.loads((await self._rpc("ws_kernel_layout", timeout=120))[0])

    async def runner_class(self) -> str:
        return self.info["runner"]

    async def gpu_memory(self) -> dict[str, int]:
        """Device memory as the worker sees it now (``free``/``total`` are device-wide, so a
        colocated trainer counts too); empty on CPU."""
        return json.loads((await self._rpc("ws_gpu_memory", timeout=30))[0])

    async def memory_after_sleep(self) -> dict[str, int] | None:
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
        await self.engine.sleep(level=level)
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
        await self.engine.wake_up(tags=tags)
        if "weights" in waking and not self.weights_intact:
            self.fence("woken after sleep level 2 without new weights: weights undefined")
            return
        self._asleep -= waking
        if not self._asleep:
            self.sleep_level = 0
            await self.engine.resume_generation()
            self.state = EngineState.SERVING
            self._serving.set()
        elif "weights" not in self._asleep:
            self.state = EngineState.WEIGHTS_AWAKE
