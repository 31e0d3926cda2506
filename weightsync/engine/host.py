"""One vLLM engine (``AsyncLLM``) and the per-engine half of the sync protocol.

The host owns the engine's state machine. The coordinator drives it with coarse steps —
``begin_sync`` -> ``receive`` -> ``apply_staged`` -> ``finish_load`` -> ``commit`` (or
``abort_sync``) — and every step checks that it is legal now, so a confused caller gets an
``IllegalStateError`` instead of an engine in an undefined state. Every reply is a frozen model
(``weightsync.messages``); every call into vLLM goes through ``vllm_compat``.

The host composes small objects that each own their state and its invariants: the state and
why it is fenced (``engine.machine.EngineMachine``), the serving gate (``engine.serving``:
admission, requests in flight, cache cleanliness), the sleep state (``engine.dormancy``: what
is asleep, whether the weights are intact), the lease (``engine.lease``: who holds the engine,
until when), the load of a sync (``engine.loading``: its steps, its fingerprint, the KV taint),
the calls into the workers (``engine.worker_calls``), the transfer group (``engine.group``) and
the checkpoint files (``engine.checkpoints``). The engine itself comes from ``make_engine``,
fixed at construction (a stand-in or a wrapped engine in tests, from ``weightsync.testing``).

Its public methods are its Ray actor's, each with the rule for who may call it (the owner
checks of ``SyncLease``): docs/development/architecture.md, "The engine host's actor methods".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from weightsync.adapters import AdapterState, AdapterSyncReply
from weightsync.config import BATCH_INVARIANT_CPU, EngineSpec
from weightsync.engine import requests, vllm_compat, vllm_fp8
from weightsync.engine.adapter_gate import AdapterGate
from weightsync.engine.adapters import Adapters
from weightsync.engine.channel import SERVED, ChannelServer, ray_node
from weightsync.engine.dormancy import TAGS, Found, SleepState
from weightsync.engine.group import TransferGroup
from weightsync.engine.lease import SyncLease
from weightsync.engine.loading import Loads
from weightsync.engine.machine import EngineMachine
from weightsync.engine.openai_server import OpenAIServer
from weightsync.engine.options import engine_args
from weightsync.engine.serving import ServingGate
from weightsync.engine.worker_calls import WorkerCalls
from weightsync.engine.workers import (
    check_workers,
    merge_layouts,
    merge_memory,
    merge_tensor_digests,
)
from weightsync.errors import (
    ConfigError,
    EngineError,
    IllegalStateError,
    WeightSyncError,
)
from weightsync.messages import (
    Ack,
    ApplyReply,
    BeginReply,
    CommitReply,
    EngineWorkers,
    GpuMemory,
    JoinReply,
    LayoutStatus,
    ReloadReply,
    SleepReply,
    TensorDigests,
    WorkerInfo,
)
from weightsync.types import (
    IN_SYNC,
    CanaryReply,
    EngineState,
    EngineStatus,
    FinishReply,
    GenerationResult,
    PauseMode,
)

logger = logging.getLogger(__name__)

S = EngineState


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
        self.version = 0
        self.version_seen = 0  # the highest version a sync here was for (never reused)
        self.last_sync: dict[str, float] = {}
        self.info: WorkerInfo | None = None
        self.gate = ServingGate()
        self.machine = EngineMachine(spec.name, self.gate)
        self.dormancy = SleepState(self.gate)
        self.lease = SyncLease(spec.name, on_lapse=self._lapsed)
        self.calls = WorkerCalls(spec.name)
        self.group = TransferGroup(self.calls)
        self.adapters = Adapters(spec, self.calls)  # LoRA adapter versions (engine.adapters)
        self.adapter_gate = AdapterGate(spec.name, self.machine, self.lease, self.dormancy,
                                        self.group, self.calls, self.adapters)
        self.loads = Loads(spec, self.calls, machine=self.machine, gate=self.gate,
                           dormancy=self.dormancy, lease=self.lease, group=self.group)
        self._sync_started = 0.0
        self._found: Found | None = None  # how the sync in progress found the engine
        self._channel: ChannelServer | None = None
        self.openai_server = OpenAIServer(self, spec.name, spec.model)  # serves once asked

    # the composed objects' state, as callers and tests read (and stand-ins set) it
    engine = property(lambda self: self.calls.engine,
                      lambda self, engine: self.calls.attach(engine))
    state = property(lambda self: self.machine.state,
                     lambda self, state: setattr(self.machine, "state", state))
    sleep_supported = property(lambda self: self.dormancy.supported,
                               lambda self, on: setattr(self.dormancy, "supported", on))

    # ---- lifecycle -----------------------------------------------------------------------
    async def start(self, *, owner: str | None = None) -> EngineStatus:
        self.lease.check(owner, "start")
        why = vllm_fp8.quantization_refusal(self.spec.engine_args, self.device)
        if why is None and self.spec.batch_invariant and self.device != "cuda":
            why = BATCH_INVARIANT_CPU  # (device "auto" that came out CPU)
        if why is not None:  # before vLLM starts anything
            raise ConfigError(why, engine=self.spec.name)
        await self.openai_server.close()  # (a restart: the next serve_openai builds a fresh app)
        vllm_compat.prepare_process_env(self.device, self.spec.tensor_parallel_size,
                                        self.spec.cpu_threads_bind, self.spec.batch_invariant)
        sleep = self.device == "cuda" and vllm_compat.sleep_mode_available()
        t0 = time.perf_counter()
        self.engine = self._make_engine(**engine_args(self.spec, self.device, sleep))
        self.sleep_supported = sleep
        infos = await self.calls.rpc("ws_info", reply=WorkerInfo, timeout=300)
        self.loads.workers = check_workers(infos, self.spec.name)
        self.info = infos[0]
        if self.spec.leg_modules:  # the legs its spec adds (never named by a request)
            await self.calls.rpc("ws_import_legs", list(self.spec.leg_modules), reply=Ack,
                                 timeout=60)
        # the colocated trainer's short way in for the call every sync makes (RayEngines)
        if self._channel is not None:  # (a restart)
            await self._channel.close()
        self._channel = ChannelServer({m: getattr(self, m) for m in SERVED})
        await self._channel.start()
        self.machine.serve()
        logger.info("engine %s up in %.1fs on %s (runner %s)", self.spec.name,
                    time.perf_counter() - t0, self.device, self.info.runner)
        return self.status()

    def status(self) -> EngineStatus:
        return EngineStatus(
            name=self.spec.name, state=self.state, version=self.version, device=self.device,
            sleep_supported=self.sleep_supported, sleep_level=self.dormancy.level,
            fenced_reason=self.machine.fenced_reason, last_sync=self.last_sync,
            model=self.spec.model, version_seen=self.version_seen, owner=self.lease.owner,
            lease_left_s=self.lease.left(), openai_url=self.openai_server.url,
        )

    async def local_channel(self, node_id: str | None = None) -> str | None:
        """The path of the Unix socket this host serves ``receive`` on (``engine.channel``),
        for a caller on this host's Ray node (``node_id``: the caller's); None before start or
        for a caller on another node (a path alone could also exist there: a shared /tmp)."""
        if self._channel is None or node_id is None or node_id != ray_node():
            return None
        return self._channel.path

    async def close_channel(self) -> None:
        """Stop serving the local channel (its calls go through Ray from then on)."""
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def shutdown(self) -> None:
        await self.close_channel()
        await self.openai_server.close()
        if self.engine is not None:
            vllm_compat.shutdown(self.engine)
            self.engine = None
        self.state = S.STOPPED

    # ---- the lease -------------------------------------------------------------------------
    def _expect(self, *states: EngineState, op: str, owner: str | None = None) -> None:
        """Refuse ``op`` unless ``owner`` may drive this step of a sync (``SyncLease.check_step``)
        and the engine is in one of ``states``."""
        self.lease.check_step(owner, op)
        self.machine.expect(*states, op=op)

    async def renew_lease(self, owner: str, lease_s: float) -> bool:
        """The owner's heartbeat; False when it no longer holds this engine's sync."""
        return self.lease.renew(owner, lease_s)

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
        if self.loads.workers is None:
            raise EngineError("engine not started", engine=self.spec.name)
        return self.loads.workers

    async def validate(self, plan: str) -> None:
        """Check a plan (a ``plan_wire.PlanMessage``) against the model before anything
        changes (raises ManifestError)."""
        await self.calls.plan_rpc("ws_validate", self.calls.plan.read(plan), reply=Ack,
                                  timeout=60)

    async def begin_sync(self, *, pause_mode: PauseMode, sleep_level: int, deadline_s: float,
                         owner: str = "", lease_s: float = 0.0, takeover: bool = False,
                         version: int = 0) -> BeginReply:
        """Pause, and make the weights resident for the transfer
        (``SleepState.make_resident``). The coordinator validates the plan on every engine
        (``validate``) before any begins.

        The sync belongs to ``owner`` for ``lease_s`` seconds, renewed by ``renew_lease``
        (``weightsync.engine.lease``). A sync still held by another owner is ended first if
        its lease lapsed or ``takeover`` says that owner is gone; otherwise this is refused."""
        stale = self.lease.stale_for(owner, takeover, self.state in (*IN_SYNC, S.FENCED))
        if stale is not None:
            await self._end_stale_sync(stale)
        self.lease.check(owner, "begin a sync")  # (asleep for another: ``wake_up`` rules)
        self.machine.expect(S.SERVING, S.FENCED, S.ASLEEP, S.WEIGHTS_AWAKE, op="begin a sync")
        if version and version <= self.version_seen:  # a coordinator that did not ask first
            raise IllegalStateError(f"version {version} was already used here (up to "
                                    f"{self.version_seen}): another sync ran since; nothing "
                                    "was touched", engine=self.spec.name)
        self._found = self.dormancy.found(self.state, self.lease.owner, self.lease.duration)
        self.loads.forget()
        self.version_seen = max(self.version_seen, version)
        self.lease.hold(owner, lease_s)
        self.gate.close()
        self._sync_started = time.perf_counter()
        seconds, skipped = await self.dormancy.make_resident(
            self.engine, sleep_level, pause_mode, deadline_s,
            asleep=self.state in (S.ASLEEP, S.WEIGHTS_AWAKE),
            memory=self.gpu_memory,
            where=f"engine {self.spec.name} runs on {self.device}")
        if self.state != S.FENCED:
            self.state = S.WEIGHTS_AWAKE if self.dormancy.asleep else S.PAUSED
        return BeginReply(seconds=seconds, skipped=tuple(skipped), group_id=self.group.group_id,
                          plan_key=self.calls.plan.key)

    async def join_group(self, backend: str, host: str, port: int, rank_offset: int,
                         world_size: int, timeout_s: float, group_id: str = "",
                         owner: str | None = None) -> JoinReply:
        """Join the trainer's transfer group (``engine.group``). It stays open across syncs
        until a failure or ``leave_group``; ``abort_sync`` ends a join in progress at once."""
        if self.state == S.SERVING:  # an adapter sync: its bytes go over the group, with no
            self.lease.check(owner, "join a transfer group")  # pause and nobody holding it
        else:
            self._expect(*IN_SYNC, S.FENCED, op="join a transfer group", owner=owner)
        with self.lease.busy():
            return await self.group.join(backend, host, port, rank_offset, world_size,
                                         timeout_s, group_id)

    async def leave_group(self, *, owner: str | None = None) -> None:
        self.lease.check(owner, "leave the transfer group")
        await self.group.leave()

    async def receive(self, plan: str, request_json: str, *,
                      owner: str | None = None) -> str:
        """Receive a plan (a ``plan_wire.PlanMessage``) through the leg ``request_json`` (a
        ``ReceiveRequest``) names; returns the ``ReceiveReport`` as JSON
        (``engine.loading.Loads.receive``). An atomic apply in a wave of this engine alone
        may commit here."""
        self._expect(*IN_SYNC, S.FENCED, op="receive weights", owner=owner)
        return await self.loads.receive(plan, request_json, self._commit)

    async def apply_staged(self, deadline_s: float, *, owner: str | None = None) -> ApplyReply:
        self._expect(S.LOADING, S.FENCED, op="apply staged weights", owner=owner)
        return await self.loads.apply_staged(deadline_s)

    async def validate_checkpoint(self, path: str | None, *, partial: bool = False,
                                  roots: Sequence[str] | None = None,
                                  deadline_s: float = 60.0) -> str:
        """Check a checkpoint against the model before anything changes (any state):
        ``ManifestError``/``ConfigError`` if it does not fit. The workers keep the files they
        checked open; returns their identity (``CheckedFiles``), for ``reload_from_path``.
        The engine's own load roots bind the path whatever ``roots`` says
        (``engine.checkpoints``)."""
        return await self.loads.checkpoints.check(path, partial, roots, deadline_s)

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
        return await self.loads.reload(path, deadline_s, partial=partial, roots=roots,
                                       check_finite=check_finite, identity=identity)

    async def finish_load(self, deadline_s: float, *, owner: str | None = None) -> FinishReply:
        """Make sure no cache holds what the old weights computed; return a fingerprint of the
        weights (``engine.loading.Loads.finish``)."""
        self.lease.check_step(owner, "verify the weights")
        return await self.loads.finish(deadline_s)

    async def run_canary(self, canary_json: str, deadline_s: float, *,
                         owner: str | None = None) -> CanaryReply:
        """Score the trainer's canary on the loaded weights before the commit
        (``engine.loading.Loads.canary``); a gap over its tolerance: ``VerificationError``."""
        self._expect(*IN_SYNC, S.FENCED, op="run the canary", owner=owner)
        return await self.loads.canary(canary_json, deadline_s)

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
            seconds.update(await self.loads.scrub_kv(deadline_s))
            await self.adapters.weights_replaced(deadline_s)
        self.loads.committed()
        self.lease.release()
        self._found = None
        self.version = version
        self.dormancy.committed()
        seconds["total"] = time.perf_counter() - self._sync_started
        self.last_sync = seconds
        self.machine.serve(unfence=True)
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
        self.loads.forget()
        dorm = self.dormancy
        if found is None:  # no sync in progress: as a sleep (or pause) left the engine
            found = dorm.found(self.state, None, 0.0)
        self.lease.release()
        if fence:
            self.machine.fence(reason)
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
            self.machine.fence(reason)
        elif asleep and restore:
            await dorm.put_back(self.engine, found, deadline_s)
            self.state = found.state
            if found.owner is not None:
                self.lease.hold(found.owner, found.lease_s)
            logger.warning("engine %s: sync aborted (%s); asleep again at level %d",
                           self.spec.name, reason, dorm.level)
        elif dorm.weights_intact:
            await dorm.wake_and_resume(self.engine, deadline_s)
            self.machine.serve()
            logger.warning("engine %s: sync aborted (%s); still serving version %d",
                           self.spec.name, reason, self.version)
        else:  # its owner is gone and its weights were discarded by sleep: keep it asleep
            self.machine.fence(f"{reason} (asleep at level {dorm.level}: no weights to serve)")
        return self.status()

    # ---- control plane ---------------------------------------------------------------------
    def fence(self, reason: str, *, owner: str | None = None) -> None:
        """Take the engine out of serving until a sync verifies it (``reason`` shown)."""
        self.lease.check(owner, "fence")
        self.machine.fence(reason)

    async def pause(self, mode: PauseMode = "abort", *,
                    owner: str | None = None) -> EngineStatus:
        """Manual pause (control plane). New requests wait until ``resume``."""
        self.lease.check(owner, "pause")
        self.machine.expect(S.SERVING, op="pause")
        self.gate.close()
        await self.gate.pause(self.engine, mode, 60.0)
        self.state = S.PAUSED
        return self.status()

    async def resume(self, *, owner: str | None = None) -> EngineStatus:
        self.lease.check(owner, "resume")
        self.machine.expect(S.PAUSED, op="resume")
        await vllm_compat.resume_generation(self.engine)
        self.machine.serve()
        return self.status()

    async def reset_caches(self, *, owner: str | None = None) -> None:
        """Drop prefix, multimodal and encoder caches (a sync makes sure of this every load)."""
        self.lease.check(owner, "reset caches")
        await self.loads.reset_caches()

    async def kernel_layout(self) -> LayoutStatus:
        """The engine's kernel layout (fast path) and whether it has been verified."""
        return merge_layouts(await self.calls.rpc("ws_kernel_layout", reply=LayoutStatus,
                                                  timeout=120), self.loads.workers)

    async def tensor_digests(self) -> TensorDigests:
        """Every tensor the engine's kernels read, each with its checksum, by name (worker
        ``w<rank>/`` before each name where there are several): compare two engines of one
        spec tensor by tensor (``engine.kernel_reads.differing``)."""
        return merge_tensor_digests(await self.calls.rpc("ws_tensor_digests",
                                                         reply=TensorDigests, timeout=300))

    async def runner_class(self) -> str:
        return self.info.runner if self.info is not None else ""

    async def gpu_memory(self) -> GpuMemory:
        """Device memory of every GPU the engine's workers use, as they see it now
        (``free``/``total`` are device-wide, so a colocated trainer counts too;
        ``workers.merge_memory``); all ``None`` on CPU."""
        return merge_memory(await self.calls.rpc("ws_gpu_memory", reply=GpuMemory,
                                                 timeout=30), self.loads.workers)

    # ---- serving ---------------------------------------------------------------------------
    async def generate(self, prompts: list[Any] | None = None, *, max_tokens: int = 16,
                       temperature: float = 0.0, logprobs: bool = False, seed: int | None = None,
                       ignore_eos: bool = False, n: int = 1, wait_s: float = 300.0,
                       sampling: dict[str, Any] | None = None,
                       messages: list[list[dict[str, Any]]] | None = None,
                       lora: str | None = None) -> list[GenerationResult]:
        """Generate for each prompt (a string, or a vLLM prompt dict with multimodal data), or
        each conversation in ``messages`` (the model's chat template); ``sampling``: any other
        field of vLLM's ``SamplingParams`` (``engine.requests``). Results are in order, the
        ``n`` samples of a prompt next to each other. Requests that arrive during a sync wait
        for it and run on the new weights; each result names the version(s) that produced it.
        ``lora``: a LoRA adapter's name (its latest version) or ``<name>@v<N>``
        (``sync_adapter``); the results name the version that served them."""
        base = dict(max_tokens=max_tokens, temperature=temperature, ignore_eos=ignore_eos,
                    logprobs=0 if logprobs else None)
        with self.adapters.use(lora) as v:
            return await requests.generate(
                self, prompts, messages, base, sampling, seed=seed, n=n, wait_s=wait_s,
                adapter=None if v is None else (v.served_as, v.request()))

    async def sync_adapter(self, manifest_json: str, buf: Any, *,
                           deadline_s: float = 120.0) -> AdapterSyncReply:
        """Load a LoRA adapter from memory as its next version, ``<name>@v<N>``, and serve it
        as ``<name>`` (``engine.adapters``): ``manifest_json`` an ``AdapterManifest``, ``buf``
        its packed bytes (``weightsync.adapters.AdapterPayload``). Refused before anything
        changes (``ManifestError``, ``ConfigError``, ``VerificationError``) if it does not fit.
        Only into a serving engine (a fleet's flip, ``stage_adapter``, also goes into sleeping
        ones)."""
        self.machine.expect(S.SERVING, op="sync an adapter")
        return await self.adapters.sync(manifest_json, buf, deadline_s)

    async def stage_adapter(self, manifest_json: str, buf: Any, version: int, *,
                            deadline_s: float = 120.0, chain_chunk: int = 0,
                            ipc: str | None = None,
                            owner: str | None = None) -> AdapterSyncReply:
        """A fleet flip's phase one: load ``<name>@v<version>``, not served yet; refused like
        ``sync_adapter``, or ``StaleVersionError`` (``Adapters.stage``). ``buf`` None: the
        workers receive the bytes from the transfer group they are in (``join_group``), by
        broadcast or, ``chain_chunk`` > 0, a chain (a failed receive leaves the group); or,
        ``ipc`` (an ``IpcBucketHandle`` as JSON), map them on their GPU, shared by the
        colocated trainer. Into a serving engine or one asleep for ``owner`` at level 1
        (``engine.adapter_gate``)."""
        return await self.adapter_gate.stage(manifest_json, buf, version, deadline_s,
                                             chain_chunk, ipc, owner)

    async def commit_adapter(self, name: str, version: int, *, deadline_s: float = 120.0,
                             settle_s: float | None = None, owner: str | None = None,
                             peers: Sequence[str] = ()) -> AdapterSyncReply:
        """A fleet flip's phase two (``Adapters.commit``; ``settle_s``: it undoes itself unless
        settled in time or by one of ``peers``, the flip's other engines). An engine asleep
        for ``owner`` wakes the rest and serves."""
        return await self.adapter_gate.commit(name, version, deadline_s, settle_s, owner,
                                              peers)

    async def settle_adapter(self, name: str, version: int) -> bool:
        """A fleet flip's phase three: every engine committed (``Adapters.settle``)."""
        return await self.adapters.settle(name, version)

    async def adapter_outcome(self, name: str, version: int, *,
                              deadline_s: float = 30.0) -> str:
        """Another engine of a flip whose settle deadline passed asks what became of
        ``<name>@v<version>`` here (``Adapters.outcome``)."""
        return await self.adapters.outcome(name, version, deadline_s)

    async def abort_adapter(self, name: str, version: int, *,
                            deadline_s: float = 120.0) -> bool:
        return await self.adapters.abort(name, version, deadline_s)

    async def adapter_state(self, *, deadline_s: float = 30.0,
                            owner: str | None = None) -> AdapterState:
        """What it holds of its adapters; ``serving``: whether it would stage one from
        ``owner`` now."""
        held = await self.adapters.state(deadline_s)
        return held.model_copy(update={"group_id": self.group.group_id,
                                       "serving": self.adapter_gate.refusal(owner) is None})

    async def serve_openai(self, token: str, *, host: str | None = None,
                           owner: str | None = None) -> str:
        """Serve vLLM's own OpenAI API for this engine (``engine.openai_server``) on a free
        port of ``host`` (default: this node's IP), every request needing ``token`` as its
        bearer token and passing the serving gate like ``generate``; returns the base URL.
        Serving already: ``token`` is accepted too, besides the few given last (several
        routers share an engine); another ``host``: served there instead."""
        self.lease.check(owner, "serve the OpenAI API")
        if self.engine is None:
            raise EngineError("engine not started", engine=self.spec.name)
        return await self.openai_server.serve(self.engine, token, host)

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
        self.dormancy.check_sleep(level, mode, self.spec.name)
        self.lease.check(owner, "sleep")
        self.machine.expect(S.SERVING, S.PAUSED, op="sleep")
        self.gate.close()
        reply = await self.dormancy.sleep_serving(
            self.engine, level, mode, deadline_s, memory=self.gpu_memory,
            where=f"engine {self.spec.name} runs on {self.device}", fence=self.machine.fence)
        self.state = S.ASLEEP
        self.lease.hold(owner, lease_s)
        return reply

    async def wake_up(self, tags: list[str] | None = None, *, owner: str | None = None,
                      deadline_s: float = 60.0) -> EngineStatus:
        """Wake what ``tags`` names (None: everything). Serving resumes once both the weights
        and the KV cache are awake. Weights that sleep discarded (level 2) are undefined until
        a sync brings new ones: waking them is allowed (a sync can follow), serving them is
        not, so the engine is fenced instead of resuming."""
        self.lease.check(owner, "wake up")
        self.machine.expect(S.ASLEEP, S.WEIGHTS_AWAKE, op="wake up")
        self.dormancy.check_tags(tags, self.spec.name)
        await self.dormancy.wake(self.engine, tags or TAGS, deadline_s)
        if not self.dormancy.asleep:
            self.lease.release()
            if not self.dormancy.weights_intact:
                self.machine.fence("woken after sleep level 2 without new weights: "
                                   "weights undefined")
                return self.status()
            await vllm_compat.resume_generation(self.engine)
            self.machine.serve()
        elif "weights" not in self.dormancy.asleep:
            self.state = S.WEIGHTS_AWAKE
        return self.status()
