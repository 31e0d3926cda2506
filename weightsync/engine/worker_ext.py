"""Runs inside vLLM's workers (``worker_extension_cls``): receive, stage, apply, fingerprint.

vLLM mixes this class into its Worker, so ``self.rank`` and ``self.device`` are the worker's
own; its model runner is reached through ``vllm_compat``. Methods are called through
``collective_rpc`` with JSON strings (parsed here, at the boundary) and return the JSON of a
``WorkerReply`` — the method's reply model, or the typed error it raised. Nothing is pickled.

How buckets arrive is a transfer leg's business (``weightsync.transport.legs``): ``ws_receive``
looks the leg's receiver up by name and consumes what it yields, whatever the leg. How they are
loaded is an applier's (``engine.appliers``, one per load format), chosen once per receive;
checking them on the way is the intake's (``engine.intake``). What the worker keeps between
calls is one ``WorkerSyncState`` (``engine.sync_state``).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from pydantic import BaseModel

from weightsync.adapters import (
    AdapterLoad,
    AdapterLoaded,
    LoadedAdapters,
    check_adapter_shapes,
    unpack_adapter,
    verify_held,
)
from weightsync.checkpoint import PinnedFiles, read_checkpoint
from weightsync.engine import vllm_compat, vllm_fp8, vllm_kernels, vllm_lora
from weightsync.engine.appliers import Load, choose
from weightsync.engine.derived import ModelStorage
from weightsync.engine.fingerprint import Fingerprinter
from weightsync.engine.finite import require_finite
from weightsync.engine.intake import Intake
from weightsync.engine.kernel_reads import tensor_digests
from weightsync.engine.layout_check import LayoutCheck
from weightsync.engine.manifest import validate_plan, validate_specs
from weightsync.engine.sync_state import WorkerSyncState
from weightsync.errors import (
    ConfigError,
    ManifestError,
    TransferError,
    VerificationError,
    WeightSyncError,
)
from weightsync.messages import (
    Ack,
    ApplyReply,
    CheckedFiles,
    Fingerprint,
    GpuMemory,
    JoinProgress,
    LayoutStatus,
    ReceiveRequest,
    ReloadReply,
    TensorDigests,
    WorkerError,
    WorkerInfo,
    WorkerReply,
)
from weightsync.transport.broadcast import BroadcastReceiver, PendingJoin
from weightsync.transport.graphs import Replay
from weightsync.transport.ipc import cuda_uuid, open_bucket
from weightsync.transport.layout import Fp8Target, KernelLayout, derive_layout, kernel_specs
from weightsync.transport.legs import receiver_leg
from weightsync.transport.packing import checksum, dtype_name, unpack_bucket
from weightsync.transport.ranks import worker_group_rank
from weightsync.types import CheckpointFiles, ReceiveReport, TensorSpec

logger = logging.getLogger(__name__)


def worker_rpc(fn: Callable[..., BaseModel]) -> Callable[..., str]:
    """A worker method's reply, or the ``WeightSyncError`` it raised, as ``WorkerReply`` JSON
    (vLLM would flatten an exception to a string; the host re-raises the same typed error)."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs) -> str:
        try:
            reply = fn(self, *args, **kwargs)
        except WeightSyncError as e:
            logger.warning("worker: %s failed: %s", fn.__name__, e)
            return WorkerReply[Any](error=WorkerError(code=e.code, message=e.message)) \
                .model_dump_json()
        return '{"reply":' + reply.model_dump_json() + "}"

    return wrapper


class WeightSyncWorkerExtension:
    """Mixed into vLLM's Worker. State lives in ``_ws`` so it never collides with vLLM's."""

    def _ws_state(self) -> WorkerSyncState:
        st = getattr(self, "_ws", None)
        if st is None:  # (vLLM's Worker constructor is not ours: made on first use)
            st = self._ws = WorkerSyncState(layout=LayoutCheck(self._derive_layout,
                                                               vllm_fp8.fp8_quantize))
        return st

    # ---- introspection -------------------------------------------------------------------
    @worker_rpc
    def ws_info(self) -> WorkerInfo:
        """Called once at start: also records the model's tensors as loaded now, which every
        later update is validated against (vLLM repoints ``model_config.model`` at each path
        it loads from, so reading it later would validate against the last update)."""
        mc = vllm_compat.model_config(self)
        st = self._ws_state()
        if st.expected is None and st.expected_error is None:
            try:
                st.expected = read_checkpoint(str(mc.model)).specs
            except WeightSyncError as e:
                st.expected_error = f"the model's own checkpoint is unreadable: {e}"
        if st.storage is None:  # what the model computes with, as vLLM left it
            st.storage = ModelStorage(vllm_compat.model(self), vllm_compat.post_load,
                                      graphs=vllm_compat.cuda_graphs(self))
        par = vllm_compat.worker_parallel(self)
        device = self.device
        return WorkerInfo(runner=vllm_compat.model_runner_class(self), rank=par.rank,
                          device=str(device), dtype=dtype_name(mc.dtype), model=str(mc.model),
                          workers=par.workers, tensor_parallel=par.tensor_parallel,
                          pipeline_parallel=par.pipeline_parallel,
                          device_uuid=cuda_uuid(device))

    @worker_rpc
    def ws_gpu_memory(self) -> GpuMemory:
        """``torch.cuda.mem_get_info`` (device-wide) plus this process's allocator counters;
        the allocator's peak is reset after it is read (the next reading's peak is since now)."""
        if self.device.type != "cuda":
            return GpuMemory()
        free, total = torch.cuda.mem_get_info(self.device)
        reading = GpuMemory(free=int(free), total=int(total),
                            allocated=int(torch.cuda.memory_allocated(self.device)),
                            reserved=int(torch.cuda.memory_reserved(self.device)),
                            peak_allocated=int(torch.cuda.max_memory_allocated(self.device)))
        torch.cuda.reset_peak_memory_stats(self.device)
        return reading

    def _expected(self) -> dict[str, TensorSpec]:
        """The model's checkpoint tensors as recorded at start (``ws_info``)."""
        st = self._ws_state()
        if st.expected is None:
            raise ManifestError(st.expected_error
                                or "the engine has not recorded its model's tensors yet")
        return st.expected

    def _params(self) -> dict[str, torch.nn.Parameter]:
        return dict(vllm_compat.model(self).named_parameters())

    def _vllm_specs(self) -> dict[str, TensorSpec]:
        return {n: TensorSpec(name=n, dtype=dtype_name(p.dtype), shape=tuple(p.shape))
                for n, p in self._params().items()}

    def _fp8(self) -> dict[str, Fp8Target]:
        """The weights vLLM's online FP8 quantized on load (``vllm_fp8.fp8_targets``)."""
        dtype = dtype_name(vllm_compat.model_config(self).dtype)
        return {n: Fp8Target(scale, TensorSpec(name=n, dtype=dtype, shape=shape))
                for n, (scale, shape) in vllm_fp8.fp8_targets(self).items()}

    def _kernel_specs(self) -> dict[str, TensorSpec]:
        """The parameters as kernel-layout plans carry them (``layout.kernel_specs``)."""
        return kernel_specs(self._vllm_specs(), self._fp8())

    def _tied(self) -> set[str]:
        hf = vllm_compat.hf_text_config(self)
        return {"lm_head.weight"} if getattr(hf, "tie_word_embeddings", False) else set()

    @worker_rpc
    def ws_validate(self, message: str) -> Ack:
        """Check the plan a ``PlanMessage`` carries or names against the model (and that
        vLLM can load weights into it in place: ``vllm_compat.reload_refusal``)."""
        plan = self._ws_state().held_plan.plan(message)
        self._refuse_unreloadable()
        if plan.format == "kernel":
            live = self._kernel_specs()
            validate_plan(plan, live, "", set())
            bad = [s.name for s in plan.specs if s.dtype != live[s.name].dtype]
            if bad:
                raise ManifestError(f"kernel-layout dtypes differ from the engine's: {bad[:5]}")
            return Ack()
        validate_plan(plan, self._expected(), dtype_name(vllm_compat.model_config(self).dtype),
                      self._tied(), vllm_compat.packed_modules(self))
        return Ack()

    @worker_rpc
    def ws_fingerprint(self) -> Fingerprint:
        return Fingerprint(digest=self._fingerprint(), rebuilt=self._ws_state().rebuilt)

    @worker_rpc
    def ws_tensor_digests(self) -> TensorDigests:
        """Every tensor this worker's kernels read, each with its checksum
        (``engine.kernel_reads``)."""
        return tensor_digests(vllm_compat.model(self), vllm_kernels.kernel_objects(self),
                              vllm_kernels.kernel_handles())

    @worker_rpc
    def ws_import_legs(self, modules: list[str]) -> Ack:
        """Import the leg modules the engine's own spec names (``EngineSpec.leg_modules``)."""
        from weightsync.transport.legs import import_leg_modules

        import_leg_modules(modules)
        return Ack()

    @worker_rpc
    def ws_scrub_kv(self) -> Ack:
        """Zero the KV cache: what a served version wrote there reaches no later version."""
        vllm_compat.scrub_kv_cache(self)
        return Ack()

    def _fingerprint(self) -> str:
        """Digest of every parameter as loaded (vLLM layout): ``engine.fingerprint``."""
        st = self._ws_state()
        if st.fingerprinter is None:
            st.fingerprinter = Fingerprinter(st.graph("fingerprint").run)
        return st.fingerprinter.digest(self._params())

    # ---- transport -----------------------------------------------------------------------
    @worker_rpc
    def ws_join_group(self, backend: str, host: str, port: int, rank_offset: int,
                      world_size: int, timeout_s: float, wait_s: float) -> JoinProgress:
        """Start joining the trainer's group (leaving any other first) and wait up to
        ``wait_s`` for it; ``ws_join_wait`` waits more. The rendezvous runs in a thread of its
        own (``PendingJoin``), so that this worker answers ``ws_leave_group`` meanwhile, which
        cancels it: vLLM runs a worker's RPCs one at a time."""
        self._leave_group()
        par = vllm_compat.worker_parallel(self)
        rank = worker_group_rank(rank_offset, par.rank, par.workers, world_size)
        self._ws_state().joining = PendingJoin(backend, host, port, rank, world_size, timeout_s)
        return self._join_progress(wait_s)

    @worker_rpc
    def ws_join_wait(self, wait_s: float) -> JoinProgress:
        """The join ``ws_join_group`` started, after waiting up to ``wait_s`` more for it."""
        return self._join_progress(wait_s)

    def _join_progress(self, wait_s: float) -> JoinProgress:
        st = self._ws_state()
        pending = st.joining
        if pending is None:
            if st.group is not None:  # joined at an earlier poll, while another worker of
                # this engine (tensor parallel) had not: the host asks all of them again
                return JoinProgress(rank=st.group.group.rank, joined=True)
            raise TransferError("not joining a transfer group (the join was cancelled: "
                                "ws_leave_group)")
        try:
            group = pending.wait(wait_s)
        except WeightSyncError:
            if st.joining is pending:
                st.joining = None
            raise
        if group is None:
            return JoinProgress(rank=pending.rank, joined=False)
        if st.joining is pending:
            st.joining = None
        st.group = BroadcastReceiver(group)
        return JoinProgress(rank=pending.rank, joined=True)

    @worker_rpc
    def ws_leave_group(self) -> Ack:
        self._leave_group()
        return Ack()

    def _leave_group(self) -> None:
        """Close the group, and cancel a join in progress (its group, should the rendezvous
        still complete, is destroyed)."""
        st = self._ws_state()
        pending = st.joining
        if pending is not None:
            st.joining = None
            pending.cancel()
        if st.group is not None:
            st.group.close()
            st.group = None

    # what receiver legs may use of the worker (weightsync.transport.legs) ------------------
    def _ws_group(self) -> BroadcastReceiver | None:
        """The transfer group this worker joined, if any."""
        return self._ws_state().group

    def _ws_holds(self, bufs: list[torch.Tensor]) -> bool:
        """Whether the model holds the memory of any of ``bufs`` (a loader may keep a
        received tensor as a parameter rather than copy it)."""
        ours = {b.untyped_storage().data_ptr() for b in bufs}
        model = vllm_compat.model(self)
        return any(t.untyped_storage().data_ptr() in ours
                   for t in (*model.parameters(), *model.buffers()))

    def _ws_graph(self, name: str) -> Replay:
        """This worker's ``Replay`` called ``name`` (CUDA only)."""
        return self._ws_state().graph(name)

    def _ws_forget_copy_plan(self) -> None:
        """The buffers the kept kernel-layout copy plan points into are gone."""
        self._ws_state().programs.forget()

    @worker_rpc
    def ws_receive(self, message: str, request_json: str) -> ReceiveReport:
        """Receive the plan a ``PlanMessage`` carries or names (the body held here: parsed
        once per body) through the leg the request names; stage it, stream it into the
        loader, or (``atomic``) verify every bucket against the sender's checksums and load.
        The applier is chosen once, from the plan's format and how its buckets arrive."""
        t_call = time.perf_counter()
        request = ReceiveRequest.model_validate_json(request_json)
        st = self._ws_state()
        held = st.held_plan
        plan = held.plan(message)
        leg = st.legs.get(request.leg)
        if leg is None:
            leg = st.legs[request.leg] = receiver_leg(request.leg)(self)
        st.active_leg = leg
        setup = time.perf_counter() - t_call
        try:
            incoming = leg.receive(plan, request)
            key = f"{held.key}:{incoming.cache_key}" if incoming.cache_key else None
            applier = choose(self, st, plan.format, incoming.checked_by_copy)
            report = self._intake().receive(plan, incoming, request, applier, key)
        except BaseException:
            leg.failed()
            raise
        if report.applied:
            leg.done()
        t_end = time.perf_counter()
        seconds = {**incoming.seconds, **report.seconds, "worker_setup": setup,
                   "worker": t_end - t_call,  # this whole call
                   "at_worker_enter": t_call, "at_worker_exit": t_end}  # (for the host's hops)
        return report.model_copy(update={"seconds": seconds})

    def _intake(self) -> Intake:
        return Intake(self._ws_state(), self._fingerprint)

    def _leg_done(self) -> None:
        leg = self._ws_state().active_leg
        if leg is not None:
            leg.done()

    @worker_rpc
    def ws_apply_staged(self) -> ApplyReply:
        intake = self._intake()
        report, layout = intake.apply_staged()
        self._leg_done()
        seconds: dict[str, float] = {}
        digest = intake.timed_fingerprint(seconds)
        return ApplyReply(reload=report.reload_s, layout=layout, fingerprint=digest,
                          seconds=seconds, rebuilt=self._ws_state().rebuilt)

    @worker_rpc
    def ws_drop_staged(self) -> Ack:
        st = self._ws_state()
        st.staged = None
        st.checkpoint.drop()  # (a reload that will not happen: its files close)
        self._leg_done()
        return Ack()

    # ---- kernel layout (fast path) ----------------------------------------------------------
    @worker_rpc
    def ws_kernel_layout(self) -> LayoutStatus:
        """The derived kernel layout and whether a checkpoint-format load has verified it."""
        status, layout = self._ws_state().layout.status()
        if layout is not None and status.verified:
            return status.model_copy(update={"layout": layout, "signature": layout.signature})
        return status

    def _derive_layout(self) -> KernelLayout:
        """The kernel layout of the model as loaded (``LayoutUnavailable`` if unexplained)."""
        packed = vllm_compat.packed_modules(self)
        return derive_layout(self._vllm_specs(), self._expected(), packed, self._tied(),
                             vllm_compat.expert_mapping(self), self._fp8())

    # ---- checkpoints ------------------------------------------------------------------------
    def _refuse_unreloadable(self) -> None:
        why = vllm_compat.reload_refusal(self)
        if why is not None:
            raise ConfigError(why)

    def _check_files(self, ckpt: CheckpointFiles, files: PinnedFiles) -> int:
        """Check the open files' headers against the model; returns their tensor bytes."""
        self._refuse_unreloadable()
        specs = files.specs()
        validate_specs(list(specs.values()), self._expected(),
                       dtype_name(vllm_compat.model_config(self).dtype), self._tied(),
                       partial=ckpt.partial, packed=vllm_compat.packed_modules(self))
        return sum(s.nbytes for s in specs.values())

    @worker_rpc
    def ws_check_files(self, checkpoint_json: str) -> CheckedFiles:
        """Check a checkpoint's headers against the model; keep its files open for
        ``ws_reload_files`` (``KeptCheckpoint``)."""
        ckpt = CheckpointFiles.model_validate_json(checkpoint_json)
        return CheckedFiles(identity=self._ws_state().checkpoint.check(
            ckpt, lambda files: self._check_files(ckpt, files)))

    @worker_rpc
    def ws_reload_files(self, checkpoint_json: str) -> ReloadReply:
        """Load the files ``ws_check_files`` kept (``KeptCheckpoint``), checked again: every
        refusal comes before the first tensor is applied. They load as checkpoint format."""
        ckpt = CheckpointFiles.model_validate_json(checkpoint_json)
        st = self._ws_state()
        with st.checkpoint.take(ckpt) as files:
            nbytes = self._check_files(ckpt, files)
            if ckpt.check_finite:  # before any tensor is loaded: a refusal changes nothing
                require_finite(files.tensors(), "the checkpoint")
            t0 = time.perf_counter()
            choose(self, st, "checkpoint").apply(Load(tensors=files.tensors()))
        st.reloaded_from_files()  # re-derive and re-verify the layout on the next sync
        return ReloadReply(reload=time.perf_counter() - t0, rebuilt=st.rebuilt, nbytes=nbytes)

    # ---- LoRA adapters (weightsync.adapters; engine.adapters keeps their versions) -----------
    @worker_rpc
    def ws_load_adapter(self, load_json: str, data: bytes | None) -> AdapterLoaded:
        """Load an adapter from memory: its bytes (``data``: vLLM's RPC carries bytes as they
        are, a tensor as a list; None: received from the transfer group, ``load.over_group``)
        checked against the sender's checksum, its tensors against the model
        (``check_adapter_shapes``) and vLLM's rules (``vllm_lora.add_adapter``), all before
        anything is loaded; then added and pinned under the load's id, and what vLLM then
        holds compared with what was sent (``verify_held``: unloaded again if it differs)."""
        load = AdapterLoad.model_validate_json(load_json)
        m = load.manifest
        marks = [time.perf_counter()]
        if load.over_group is not None:
            buf = self._receive_adapter(load)
        elif load.over_ipc is not None:  # on this GPU, shared by the colocated trainer: to
            buf = open_bucket(load.over_ipc).cpu()  # the CPU (vLLM builds from there)
        elif not isinstance(data, (bytes, bytearray)) or len(data) != m.bucket.nbytes:
            raise TransferError(f"adapter {load.versioned}: expected {m.bucket.nbytes} bytes, "
                                f"got {type(data).__name__} of {len(data or b'')}")
        else:
            buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        marks.append(time.perf_counter())
        got = checksum(buf)
        if got != m.checksum:
            raise VerificationError(f"adapter {load.versioned}: checksum {got:#x} of the bytes "
                                    f"received, {m.checksum:#x} as sent: nothing loaded")
        marks.append(time.perf_counter())
        check_adapter_shapes(list(m.bucket.slots), self._expected(), m.config)
        tensors = unpack_adapter(load, buf)
        require_finite(tensors.items(), f"adapter {load.versioned}")  # a diverged trainer's
        marks.append(time.perf_counter())
        modules = vllm_lora.add_adapter(self, load.lora_int_id, tensors, m.config.peft_dict())
        marks.append(time.perf_counter())
        try:  # after vLLM's load: what it holds is what was sent, alpha/r applied once
            verify_held(tensors, vllm_lora.adapter_held(self, load.lora_int_id),
                        functools.partial(vllm_lora.adapter_module, self), m.config,
                        f"adapter {load.versioned}")
        except BaseException:
            vllm_lora.remove_adapter(self, load.lora_int_id)
            raise
        marks.append(time.perf_counter())
        steps = ("receive", "checksum", "check", "add", "verify")
        return AdapterLoaded(lora_int_id=load.lora_int_id, modules=modules, seconds={
            k: b - a for k, a, b in zip(steps, marks[:-1], marks[1:], strict=True)})

    @worker_rpc
    def ws_drain_adapter(self, load_json: str) -> Ack:
        """Take an adapter's bytes from the group and drop them: the host refused the load,
        but every rank of a collective must take part, or its sender waits out its
        deadline."""
        self._receive_adapter(AdapterLoad.model_validate_json(load_json))
        return Ack()

    def _receive_adapter(self, load: AdapterLoad) -> torch.Tensor:
        """An adapter's bytes from the trainer's group (``wire_plan``: one bucket), on the
        CPU; a failed receive leaves the group (a broken group is never reused)."""
        group = self._ws_group()
        if group is None:
            raise TransferError(f"adapter {load.versioned}: this worker is in no transfer "
                                "group")
        assert load.over_group is not None
        plan = load.wire_plan()
        try:
            (bucket, buf), = group.receive(plan, load.over_group.deadline_s)
        except BaseException:
            self._leave_group()
            raise
        (_, tensor), = unpack_bucket(bucket, buf)
        return tensor.cpu()

    @worker_rpc
    def ws_remove_adapter(self, lora_int_id: int) -> Ack:
        """Unpin and unload an adapter (loaded or not: nothing to do then)."""
        vllm_lora.remove_adapter(self, lora_int_id)
        return Ack()

    @worker_rpc
    def ws_loaded_adapters(self) -> LoadedAdapters:
        return LoadedAdapters(ids=tuple(sorted(vllm_lora.loaded_adapters(self))))

