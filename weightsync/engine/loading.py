"""The load of a sync in progress on one engine host, from the first byte to the verify step:
``receive`` (the transfer), ``apply_staged``, ``reload`` (from a checkpoint), ``finish`` (no
stale cache; the fingerprint) and ``canary``. The host checks who calls and in which state;
this does the step.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence

from weightsync.config import EngineSpec
from weightsync.engine import vllm_compat
from weightsync.engine.checkpoints import CheckpointReader
from weightsync.engine.dormancy import SleepState
from weightsync.engine.group import TransferGroup
from weightsync.engine.lease import SyncLease
from weightsync.engine.machine import EngineMachine
from weightsync.engine.serving import ServingGate
from weightsync.engine.worker_calls import WorkerCalls
from weightsync.engine.workers import merge_applies, merge_fingerprints, merge_receipts
from weightsync.errors import (
    EngineError,
    ManifestError,
    TransferError,
    VerificationError,
    WeightSyncError,
)
from weightsync.messages import (
    Ack,
    ApplyReply,
    CommitReply,
    EngineWorkers,
    Fingerprint,
    ReceiveRequest,
    ReloadReply,
)
from weightsync.transport.legs.base import hops
from weightsync.types import Canary, CanaryReply, FinishReply, ReceiveReport

CLEAN = "reset_caches: vLLM cleared them when the engine paused or slept, and nothing ran since"


class Loads:
    """Invariants: the weights count as touched (``SleepState.overwriting``) from the first
    byte a load may apply until a commit; the fingerprint the workers took as they loaded is
    kept for the verify step and dropped at every begin and end (``forget``); KV blocks that a
    version loaded without the finite check may have written are zeroed at the next commit
    (``scrub_kv``)."""

    def __init__(self, spec: EngineSpec, calls: WorkerCalls, *, machine: EngineMachine,
                 gate: ServingGate, dormancy: SleepState, lease: SyncLease,
                 group: TransferGroup) -> None:
        self.name = spec.name
        self.calls, self.machine, self.gate, self.dormancy = calls, machine, gate, dormancy
        self.lease, self.group = lease, group
        self.checkpoints = CheckpointReader(spec, calls)
        self.workers: EngineWorkers | None = None  # every worker vLLM started, at start
        self._loaded: FinishReply | None = None  # this sync's load, fingerprinted as it loaded
        # the load in progress skipped the finite check (TransferConfig.check_finite=False);
        # once such a version served, its KV blocks may hold NaN: zeroed at the next commit
        self._unchecked = False
        self._kv_tainted = False

    def forget(self) -> None:
        """A sync begins or ends: no load of it is kept."""
        self._loaded = None

    async def receive(self, plan: str, request_json: str,
                      commit: Callable[[int, float], Awaitable[CommitReply]]) -> str:
        """Receive a plan (a ``plan_wire.PlanMessage``: its body whole or named by key)
        through the leg ``request_json`` (a ``ReceiveRequest``) names; the worker stages it,
        streams it into the loader, or verifies and loads it (``atomic``).
        Returns the ``ReceiveReport`` as JSON, which the sender leg parses
        (``SenderLeg.wait_receipts``): this is the one call inside every sync's transfer, and
        Ray passes a string for less than it pickles a model.

        A ``TransferError`` (a verification error included) means nothing was applied; any
        other failure of a streaming or atomic apply may have left the weights half-applied.

        With ``commit_version`` (the coordinator's wave is this engine alone) an atomic apply
        that verified, loaded and fingerprinted everything, with no cache left to reset, also
        commits that version here (``commit``; the report's ``commit``); otherwise the
        coordinator's ``commit`` follows."""
        t_enter = time.perf_counter()
        request = ReceiveRequest.model_validate_json(request_json)
        message = self.calls.plan.read(plan)  # (or PlanNotHeld: nothing changed yet)
        self._unchecked = not request.check_finite
        self.machine.loading()
        if request.apply == "streaming":
            self.dormancy.overwriting()  # from the first byte on, until commit
        t = time.perf_counter()
        try:
            with self.lease.busy():
                reports = await self.calls.plan_rpc("ws_receive", message, request_json,
                                                    reply=ReceiveReport,
                                                    timeout=request.deadline_s * 1.5)
            report = merge_receipts([hops(r, t, time.perf_counter(), "vllm", "worker")
                                     for r in reports], self.name)
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
            done = await commit(request.commit_version, request.deadline_s)
            report = report.model_copy(update={"commit": done.seconds, "seconds": {
                **report.seconds, "commit": time.perf_counter() - t}})  # not the transfer's
        # when this call began and ended here, for the caller's hops (transfer.legs.base.hops)
        return report.model_copy(update={"seconds": {
            **report.seconds, "at_host_enter": t_enter,
            "at_host_exit": time.perf_counter()}}).model_dump_json()

    async def apply_staged(self, deadline_s: float) -> ApplyReply:
        self.dormancy.overwriting()
        with self.lease.busy():
            replies = await self.calls.rpc("ws_apply_staged", reply=ApplyReply,
                                           timeout=deadline_s)
        return merge_applies(replies, self.name).model_copy(
            update={"finish": self._fingerprinted(replies)})

    def _fingerprinted(self, replies: Sequence[ReceiveReport | ApplyReply]
                       ) -> FinishReply | None:
        """Keep the fingerprints every worker took of what it just loaded, for ``finish``;
        returned as the finished verify step when no cache needs a reset before commit."""
        if not replies or any(r.fingerprint is None for r in replies):
            return None  # not applied (staged), or a worker that did not fingerprint
        took = max(r.seconds.get("fingerprint", 0.0) for r in replies)
        clean = self.gate.caches_clean
        self._loaded = merge_fingerprints(
            [Fingerprint(digest=r.fingerprint, rebuilt=r.rebuilt) for r in replies], self.workers,
            seconds={"fingerprint": took}, skipped=(CLEAN,) if clean else ())
        return self._loaded if clean else None

    async def reload(self, path: str | None, deadline_s: float, *, partial: bool,
                     roots: Sequence[str] | None, check_finite: bool,
                     identity: str | None) -> ReloadReply:
        """Load exactly the checkpoint files that were checked (``engine.checkpoints``). A
        checkpoint refused before loading leaves the weights as they were."""
        ckpt = await self.checkpoints.for_load(path, partial, roots, deadline_s, check_finite,
                                               identity)
        self.machine.loading()
        self._unchecked = not check_finite
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

    async def finish(self, deadline_s: float) -> FinishReply:
        """Make sure no cache holds what the old weights computed; return a fingerprint of the
        weights.

        The pause (or sleep) that began the sync already had vLLM clear its prefix, multimodal
        and encoder caches and preempt requests kept across it (vLLM 0.24 and 0.32:
        ``EngineCore.pause_scheduler(clear_cache=True)``), and nothing has run since, so the
        reset is skipped then, and said so; otherwise (a manual pause that kept its caches)
        they are reset here."""
        seconds: dict[str, float] = {}
        skipped: tuple[str, ...] = ()
        t = time.perf_counter()
        with self.lease.busy():
            if self.gate.caches_clean:
                skipped = (CLEAN,)
            else:
                await asyncio.wait_for(self.reset_caches(), deadline_s)
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

    async def reset_caches(self) -> None:
        # Requests frozen by pause mode "keep" hold KV blocks computed with the old weights:
        # preempt them so they recompute on the new ones, and insist the reset succeeded.
        if not await vllm_compat.reset_caches(self.calls.engine):
            raise EngineError("prefix cache could not be reset: stale KV would be served",
                              engine=self.name)

    async def canary(self, canary_json: str, deadline_s: float) -> CanaryReply:
        """The sync's canary (``types.Canary``): after the load and the verify step, before
        the commit, score the trainer's token sequence on the new weights and compare with
        its logprobs. vLLM's scheduler runs for it (the KV cache woken if a sleep released
        it) while the serving gate stays closed: no rollout request reaches the engine
        before the commit. A gap over the tolerance is a ``VerificationError``; the weights
        are applied, so the coordinator fences this engine."""
        canary = Canary.model_validate_json(canary_json)
        t = time.perf_counter()
        engine, dorm = self.calls.engine, self.dormancy
        with self.lease.busy():
            woke = "kv_cache" in dorm.asleep
            if woke:
                await dorm.wake(engine, ["kv_cache"], deadline_s)
            if not (woke and vllm_compat.WAKE_RESUMES and not dorm.asleep):
                await asyncio.wait_for(vllm_compat.resume_generation(engine), deadline_s)
            got = await asyncio.wait_for(vllm_compat.prompt_logprobs(
                engine, list(canary.token_ids), f"canary-{uuid.uuid4().hex}"), deadline_s)
        gaps = [abs(a - b) for a, b in zip(got, canary.logprobs, strict=True)]
        worst = max(range(len(gaps)), key=gaps.__getitem__)
        if not gaps[worst] <= canary.tolerance:  # (NaN fails too)
            raise VerificationError(
                f"canary: the engine's logprob of token {worst + 1} differs from the trainer's "
                f"by {gaps[worst]:.3g} (tolerance {canary.tolerance:g}): it does not compute "
                "what the trainer sent", engine=self.name)
        return CanaryReply(max_gap=gaps[worst], position=worst + 1,
                           seconds=time.perf_counter() - t)

    async def scrub_kv(self, deadline_s: float) -> dict[str, float]:
        """At a commit: zero the KV blocks if the version before was loaded unchecked (it may
        have written NaN there); the new version is judged the same way at the next commit."""
        seconds: dict[str, float] = {}
        if self._kv_tainted:
            t = time.perf_counter()
            await self.calls.rpc("ws_scrub_kv", reply=Ack, timeout=deadline_s)
            seconds["scrub_kv"] = time.perf_counter() - t
        return seconds

    def committed(self) -> None:
        self._kv_tainted = self._unchecked
        self._loaded = None
