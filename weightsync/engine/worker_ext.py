"""Runs inside vLLM's workers (``worker_extension_cls``): receive, stage, apply, fingerprint.

vLLM mixes this class into its Worker, so ``self.rank`` and ``self.device`` are the worker's
own; its model runner is reached through ``vllm_compat``. Methods are called through
``collective_rpc`` with JSON strings (parsed here, at the boundary) and return the JSON of a
``WorkerReply`` — the method's reply model, or the typed error it raised. Nothing is pickled.

How buckets arrive is a transfer leg's business (``weightsync.transport.legs``): ``ws_receive``
looks the leg's receiver up by name and consumes what it yields, whatever the leg.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from pydantic import BaseModel

from weightsync.checkpoint import PinnedFiles, read_checkpoint
from weightsync.engine import vllm_compat
from weightsync.engine.derived import ModelStorage
from weightsync.engine.fingerprint import Fingerprinter
from weightsync.engine.finite import require_finite, typed_pieces
from weightsync.engine.kept_checkpoint import KeptCheckpoint
from weightsync.engine.manifest import validate_plan, validate_specs
from weightsync.errors import (ConfigError, ManifestError, ReloadError, TransferError,
                               VerificationError, WeightSyncError)
from weightsync.messages import (Ack, ApplyMode, ApplyReply, CheckedFiles, Fingerprint,
                                 GpuMemory, JoinProgress, LayoutStatus, ReceiveRequest, ReloadReply,
                                 WorkerError, WorkerInfo, WorkerReply)
from weightsync.transport.broadcast import BroadcastReceiver, PendingJoin
from weightsync.transport.ipc import cuda_uuid
from weightsync.transport.digest_cuda import ManyDigests
from weightsync.transport.graphs import Replay
from weightsync.transport.legs import receiver_leg
from weightsync.transport.ranks import worker_group_rank
from weightsync.transport.layout import first_mismatch
from weightsync.transport.packing import (Spans, checksum, copy_split, copy_tensors,
                                          dtype_name, fold_spans, packed_only, span_targets,
                                          unpack_bucket)
from weightsync.types import (Bucket, CheckpointFiles, HeldPlan, ReceiveReport, TensorSpec,
                              TransferPlan)

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

    def _ws_state(self) -> dict:
        if not hasattr(self, "_ws"):
            self._ws = {"group": None, "staged": [], "staged_format": "checkpoint",
                        "expected": None, "layout": None, "layout_status": None,
                        "legs": {}, "plan": None, "held_plan": HeldPlan()}
        return self._ws

    # ---- introspection -------------------------------------------------------------------
    @worker_rpc
    def ws_info(self) -> WorkerInfo:
        """Called once at start: also records the model's tensors as loaded now, which every
        later update is validated against (vLLM repoints ``model_config.model`` at each path
        it loads from, so reading it later would validate against the last update)."""
        mc = vllm_compat.model_config(self)
        st = self._ws_state()
        if st["expected"] is None and st.get("expected_error") is None:
            try:
                st["expected"] = read_checkpoint(str(mc.model)).specs
            except WeightSyncError as e:
                st["expected_error"] = f"the model's own checkpoint is unreadable: {e}"
        if st.get("storage") is None:  # what the model computes with, as vLLM left it
            st["storage"] = ModelStorage(vllm_compat.model(self), vllm_compat.post_load,
                                         graphs=vllm_compat.cuda_graphs(self))
        par = vllm_compat.worker_parallel(self)
        device = getattr(self, "device", torch.device("cpu"))
        return WorkerInfo(runner=vllm_compat.model_runner_class(self), rank=par.rank,
                          device=str(device), dtype=dtype_name(mc.dtype), model=str(mc.model),
                          workers=par.workers, tensor_parallel=par.tensor_parallel,
                          pipeline_parallel=par.pipeline_parallel,
                          device_uuid=cuda_uuid(device))

    @worker_rpc
    def ws_gpu_memory(self) -> GpuMemory:
        """``torch.cuda.mem_get_info`` (device-wide) plus this process's allocator counters."""
        if getattr(self, "device", torch.device("cpu")).type != "cuda":
            return GpuMemory()
        free, total = torch.cuda.mem_get_info(self.device)
        return GpuMemory(free=int(free), total=int(total),
                         allocated=int(torch.cuda.memory_allocated(self.device)),
                         reserved=int(torch.cuda.memory_reserved(self.device)))

    def _expected(self) -> dict[str, TensorSpec]:
        """The model's checkpoint tensors as recorded at start (``ws_info``)."""
        st = self._ws_state()
        if st["expected"] is None:
            raise ManifestError(st.get("expected_error")
                                or "the engine has not recorded its model's tensors yet")
        return st["expected"]

    def _params(self) -> dict[str, torch.nn.Parameter]:
        return dict(vllm_compat.model(self).named_parameters())

    def _vllm_specs(self) -> dict[str, TensorSpec]:
        return {n: TensorSpec(name=n, dtype=dtype_name(p.dtype), shape=tuple(p.shape))
                for n, p in self._params().items()}

    def _tied(self) -> set[str]:
        hf = vllm_compat.hf_text_config(self)
        return {"lm_head.weight"} if getattr(hf, "tie_word_embeddings", False) else set()

    @worker_rpc
    def ws_validate(self, plan_json: str) -> Ack:
        plan = TransferPlan.model_validate_json(self._ws_state()["held_plan"].text(plan_json))
        if plan.format == "kernel":
            live = self._vllm_specs()
            validate_plan(plan, live, "", set())
            bad = [s.name for s in plan.specs if s.dtype != live[s.name].dtype]
            if bad:
                raise ManifestError(f"kernel-layout dtypes differ from the engine's: {bad[:5]}")
            return Ack()
        validate_plan(plan, self._expected(), dtype_name(vllm_compat.model_config(self).dtype),
                      self._tied())
        return Ack()

    @worker_rpc
    def ws_fingerprint(self) -> Fingerprint:
        return Fingerprint(digest=self._fingerprint(), rebuilt=self._ws_state().get("rebuilt", ()))

    @worker_rpc
    def ws_scrub_kv(self) -> Ack:
        """Zero the KV cache: what a served version wrote there reaches no later version."""
        vllm_compat.scrub_kv_cache(self)
        return Ack()

    def _fingerprint(self) -> str:
        """Digest of every parameter as loaded (vLLM layout): ``engine.fingerprint``."""
        st = self._ws_state()
        if "fingerprinter" not in st:
            st["fingerprinter"] = Fingerprinter(self._ws_graph("fingerprint").run)
        return st["fingerprinter"].digest(self._params())

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
        self._ws_state()["joining"] = PendingJoin(backend, host, port, rank, world_size,
                                                  timeout_s)
        return self._join_progress(wait_s)

    @worker_rpc
    def ws_join_wait(self, wait_s: float) -> JoinProgress:
        """The join ``ws_join_group`` started, after waiting up to ``wait_s`` more for it."""
        return self._join_progress(wait_s)

    def _join_progress(self, wait_s: float) -> JoinProgress:
        st = self._ws_state()
        pending: PendingJoin | None = st.get("joining")
        if pending is None:
            raise TransferError("not joining a transfer group (the join was cancelled: "
                                "ws_leave_group)")
        try:
            group = pending.wait(wait_s)
        except WeightSyncError:
            if st.get("joining") is pending:
                st["joining"] = None
            raise
        if group is None:
            return JoinProgress(rank=pending.rank, joined=False)
        if st.get("joining") is pending:
            st["joining"] = None
        st["group"] = BroadcastReceiver(group)
        return JoinProgress(rank=pending.rank, joined=True)

    @worker_rpc
    def ws_leave_group(self) -> Ack:
        self._leave_group()
        return Ack()

    def _leave_group(self) -> None:
        """Close the group, and cancel a join in progress (its group, should the rendezvous
        still complete, is destroyed)."""
        st = self._ws_state()
        pending = st.get("joining")
        if pending is not None:
            st["joining"] = None
            pending.cancel()
        if st["group"] is not None:
            st["group"].close()
            st["group"] = None

    # what receiver legs may use of the worker (weightsync.transport.legs) ------------------
    def _ws_group(self) -> BroadcastReceiver | None:
        """The transfer group this worker joined, if any."""
        return self._ws_state()["group"]

    def _ws_holds(self, bufs: list[torch.Tensor]) -> bool:
        """Whether the model holds the memory of any of ``bufs`` (a loader may keep a
        received tensor as a parameter rather than copy it)."""
        ours = {b.untyped_storage().data_ptr() for b in bufs}
        model = vllm_compat.model(self)
        return any(t.untyped_storage().data_ptr() in ours
                   for t in (*model.parameters(), *model.buffers()))

    def _ws_graph(self, name: str) -> Replay:
        """This worker's ``Replay`` called ``name`` (CUDA only)."""
        graphs = self._ws_state().setdefault("graphs", {})
        if name not in graphs:
            graphs[name] = Replay(name)
        return graphs[name]

    def _ws_forget_copy_plan(self) -> None:
        """The buffers the kept kernel-layout copy plan points into are gone."""
        self._ws_state()["kernel_program"] = None

    @worker_rpc
    def ws_receive(self, plan_json: str, request_json: str) -> ReceiveReport:
        """Receive a plan through the leg the request names; stage it, stream it into the
        loader, or (``atomic``) verify every bucket against the sender's checksums and load."""
        t_call = time.perf_counter()
        request = ReceiveRequest.model_validate_json(request_json)
        st = self._ws_state()
        held = st["held_plan"]
        text = held.text(plan_json)  # the JSON, or a PlanRef to the plan held here
        if st["plan"] is None or st["plan"][0] != held.key:  # parse once per plan, not per sync
            st["plan"] = (held.key, TransferPlan.model_validate_json(text))
        plan = st["plan"][1]
        leg = st["legs"].get(request.leg)
        if leg is None:
            leg = st["legs"][request.leg] = receiver_leg(request.leg)(self)
        st["active_leg"] = leg
        setup = time.perf_counter() - t_call
        try:
            incoming = leg.receive(plan, request)
            st["staged_key"] = f"{held.key}:{incoming.cache_key}" if incoming.cache_key \
                else None
            if incoming.checked_by_copy:
                report = self._consume_checked_by_copy(plan, incoming.buckets, request.apply,
                                                       incoming.expected_terms,
                                                       request.check_finite)
            else:
                report = self._consume(plan, incoming.buckets, request.apply,
                                       incoming.expected, incoming.known, request.check_finite)
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

    def _consume(self, plan: TransferPlan, stream: Iterator[tuple[Bucket, torch.Tensor]],
                 apply: ApplyMode, expected: list[int] | None = None,
                 known: list[int] | None = None, check_finite: bool = True) -> ReceiveReport:
        """Check every bucket of ``stream`` against ``expected`` (the sender's checksums) and
        stage or apply it. ``known``: the buckets' checksums, already computed by the leg."""
        if apply == "atomic" and expected is None:
            raise TransferError("atomic apply needs the sender's checksums")
        sums: list[int] = []
        seconds: dict[str, float] = {}
        nbytes = 0

        def checked() -> Iterator[tuple[Bucket, torch.Tensor]]:
            nonlocal nbytes
            for bucket, buf in stream:
                if known is not None:
                    sums.append(known[bucket.index])
                else:
                    t = time.perf_counter()
                    sums.append(checksum(buf))
                    seconds["checksum"] = seconds.get("checksum", 0.0) + time.perf_counter() - t
                if expected is not None and sums[-1] != expected[bucket.index]:
                    raise VerificationError(f"bucket {bucket.index}: checksum differs from the "
                                            "sender's; nothing applied from it")
                if check_finite and apply == "streaming":  # (staged: all at once, below)
                    t = time.perf_counter()
                    require_finite(unpack_bucket(bucket, buf), f"bucket {bucket.index}")
                    seconds["finite"] = seconds.get("finite", 0.0) + time.perf_counter() - t
                nbytes += buf.numel()
                yield bucket, buf

        st = self._ws_state()
        st["staged"] = []
        kernel = plan.format == "kernel"
        applied = False
        stream = packed_only(stream)  # (direct: _consume_checked_by_copy)
        if apply == "streaming":
            self._reload((t for b, buf in checked() for t in unpack_bucket(b, buf)), kernel)
            applied = True
        else:
            st["staged"] = list(checked())
            st["staged_format"] = plan.format
        if len(sums) != len(plan.buckets):
            st["staged"] = []
            raise TransferError(f"received {len(sums)} of {len(plan.buckets)} buckets")
        if check_finite and apply != "streaming":  # every staged tensor, one read-back
            t = time.perf_counter()
            try:
                require_finite((nt for b, buf in st["staged"] for nt in unpack_bucket(b, buf)),
                               "the update")
            except VerificationError:
                st["staged"] = []
                raise
            seconds["finite"] = time.perf_counter() - t
        if apply == "atomic":  # every bucket is here and verified: load in this call
            seconds["reload"] = self._apply_staged()
            applied = True
        fingerprint = self._timed_fingerprint(seconds) if applied else None
        return ReceiveReport(nbytes=nbytes, checksums=tuple(sums), applied=applied,
                             fingerprint=fingerprint, seconds=seconds,
                             rebuilt=st.get("rebuilt", ()) if applied else ())

    def _consume_checked_by_copy(self, plan: TransferPlan,
                                 stream: Iterator[tuple[Bucket, Spans]], apply: ApplyMode,
                                 expected_terms: torch.Tensor | None,
                                 check_finite: bool = True) -> ReceiveReport:
        """Load direct buckets (``Spans``: the sender's own memory) into the parameters by one
        launch that checksums every piece as it reads it (``digest_cuda.ManyDigests`` with
        ``copy_to``), then compare with the sender's checksums (its ``expected_terms`` per
        piece, on the device, read back with ours in one host sync): what is verified is
        exactly what was written. A mismatch comes after the parameters were overwritten:
        ``ReloadError`` (the host fences the engine until a sync succeeds)."""
        if apply != "atomic" or plan.format != "kernel" or expected_terms is None:
            raise TransferError("a direct share (the sender's own storages) is for a kernel-"
                                "layout plan applied atomically, with the sender's checksums")
        st = self._ws_state()
        st["staged"] = []
        staged = list(stream)
        if len(staged) != len(plan.buckets):
            raise TransferError(f"received {len(staged)} of {len(plan.buckets)} buckets")
        t0 = time.perf_counter()
        program = self._kernel_program(staged, st.get("staged_key"))
        graph_key = self._copy_graph_key(program)
        many = program[2]
        if check_finite:  # the sender's pieces, before anything is copied from them
            self._require_finite_pieces(program)
        with torch.no_grad():
            if graph_key is not None:  # the same pieces and parameters as last sync
                terms = self._ws_graph("kernel-layout copy").run(graph_key, many.terms)
            else:
                terms = many.terms()
            spans = [buf for _, buf in staged]
            rows = torch.cat([terms, expected_terms]).tolist()  # (the one host sync)
            sums = fold_spans(spans, rows[:len(terms)])
            expected = fold_spans(spans, rows[len(terms):])
        seconds = {"reload": time.perf_counter() - t0}
        bad = [i for i, (a, b) in enumerate(zip(sums, expected, strict=True)) if a != b]
        if bad:
            raise ReloadError(f"bucket {bad[0]}: the bytes copied from the sender's tensors "
                              "differ from its checksum (did it write them during the sync?); "
                              "the engine's weights are not the sender's")
        st["rebuilt"] = ()
        fingerprint = self._timed_fingerprint(seconds)
        return ReceiveReport(nbytes=sum(buf.numel() for _, buf in staged), checksums=tuple(sums),
                             applied=True, fingerprint=fingerprint, seconds=seconds)

    def _require_finite_pieces(self, program: tuple) -> None:
        """Refuse direct pieces holding NaN or Inf before any is copied (``typed_pieces``)."""
        st = self._ws_state()
        kept = st.get("finite_views")
        if kept is None or kept[0] is not program:
            kept = st["finite_views"] = (program, typed_pieces(self._params(), program[0],
                                                               program[1]))
        require_finite(kept[1], "the sender's tensors")

    def _timed_fingerprint(self, seconds: dict[str, float]) -> str:
        """The weights just loaded, fingerprinted in the same call (the sync's verify step
        needs no call of its own); its seconds go to ``seconds["fingerprint"]``."""
        t = time.perf_counter()
        digest = self._fingerprint()
        seconds["fingerprint"] = time.perf_counter() - t
        return digest

    def _leg_done(self) -> None:
        leg = self._ws_state().get("active_leg")
        if leg is not None:
            leg.done()

    @worker_rpc
    def ws_apply_staged(self) -> ApplyReply:
        reload_s = self._apply_staged()
        self._leg_done()
        seconds: dict[str, float] = {}
        digest = self._timed_fingerprint(seconds)
        st = self._ws_state()
        return ApplyReply(reload=reload_s, layout=st["staged_format"], fingerprint=digest,
                          seconds=seconds, rebuilt=st.get("rebuilt", ()))

    @worker_rpc
    def ws_drop_staged(self) -> Ack:
        self._ws_state()["staged"] = []
        self._kept_checkpoint().drop()  # (a reload that will not happen: its files close)
        self._leg_done()
        return Ack()

    def _apply_staged(self) -> float:
        st = self._ws_state()
        staged, st["staged"] = st["staged"], []
        if not staged:
            raise ReloadError("nothing staged to apply")
        kernel = st["staged_format"] == "kernel"
        t0 = time.perf_counter()
        program = self._kernel_program(staged, st.get("staged_key")) if kernel else None
        graph_key = None if program is None else self._copy_graph_key(program)
        self._reload((t for b, buf in staged for t in unpack_bucket(b, buf)), kernel, program,
                     graph_key)
        reload_s = time.perf_counter() - t0
        if not kernel:
            self._calibrate_layout(staged)
        return reload_s

    def _reload(self, weights: Iterator[tuple[str, torch.Tensor]], kernel: bool = False,
                program: tuple | None = None, graph_key: tuple | None = None) -> None:
        """Load ``weights``: checkpoint format through vLLM's loaders, kernel layout by copying
        into the parameters (``program``: ``_kernel_program``'s targets, when already known;
        ``graph_key``: what they depend on, when kept across syncs — replayed as one graph)."""
        st = self._ws_state()
        storage: ModelStorage | None = st.get("storage")
        st["rebuilt"] = ()
        with torch.no_grad():
            if kernel and program is not None and graph_key is not None:
                self._ws_graph("kernel-layout copy").run(graph_key,
                                                         lambda: copy_tensors(*program))
            elif kernel:
                copy_tensors(*(program or self._kernel_targets(weights)))
            else:
                marks = storage.marks() if storage is not None else {}
                vllm_compat.reload_weights(self, weights, is_checkpoint_format=True)
                if storage is not None:  # nothing derived left behind (engine.derived)
                    st["rebuilt"] = tuple(storage.after_load(marks))
                    for note in st["rebuilt"]:
                        logger.info("worker %s: %s", getattr(self, "rank", 0), note)
        if getattr(self, "device", torch.device("cpu")).type == "cuda":
            torch.cuda.synchronize()

    # ---- kernel layout (fast path) ----------------------------------------------------------
    @worker_rpc
    def ws_kernel_layout(self) -> LayoutStatus:
        """The derived kernel layout and whether a checkpoint-format load has verified it."""
        status, layout = self._layout_status()
        if layout is not None and status.verified:
            return status.model_copy(update={"layout": layout, "signature": layout.signature})
        return status

    def _layout_status(self):
        from weightsync.transport.layout import LayoutUnavailable, derive_layout

        st = self._ws_state()
        if st["layout_status"] is None:
            packed = vllm_compat.packed_modules(self)
            try:
                st["layout"] = derive_layout(self._vllm_specs(), self._expected(), packed,
                                             self._tied(), vllm_compat.expert_mapping(self))
                st["layout_status"] = LayoutStatus(
                    candidate=True, verified=False,
                    reason="not yet verified by a checkpoint-format load")
            except LayoutUnavailable as e:
                st["layout_status"] = LayoutStatus(candidate=False, verified=False,
                                                   reason=str(e))
        return st["layout_status"], st["layout"]

    def _calibrate_layout(self, staged: list[tuple[Bucket, torch.Tensor]]) -> None:
        """Compare vLLM's own load of ``staged`` with our stacking of it, bit for bit."""
        st = self._ws_state()
        status, layout = self._layout_status()
        if not status.candidate or status.verified or layout is None:
            return
        sent = {n: t for b, buf in staged for n, t in unpack_bucket(b, buf)}
        if any(name not in sent for p in layout.params for name, _ in p.parts):
            return  # a partial sync cannot verify every parameter; wait for a full one
        mismatch = first_mismatch(layout, sent, self._params())
        st["layout_status"] = LayoutStatus(candidate=True, verified=True, reason="verified") \
            if mismatch is None else LayoutStatus(
                candidate=False, verified=False,
                reason=f"{mismatch}: vLLM's loader does not produce a plain row stack of the "
                       "checkpoint tensors")

    def _kernel_targets(self, weights: Iterator[tuple[str, torch.Tensor]]
                        ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(parameters, tensors) for kernel-layout tensors copied straight into vLLM's
        parameters: what ``reload_weights(is_checkpoint_format=False)`` does (``param.copy_``
        per tensor), done as batched copies (``copy_tensors``). Only used once a
        checkpoint-format load verified the layout bit for bit (``_calibrate_layout``), and
        every plan was checked against the live parameters' names, shapes and dtypes
        (``ws_validate``). Measured on an H100 (0.5B shape, 170 parameters): 0.9 ms batched
        vs 1.2 ms one ``copy_`` each."""
        live = self._params()
        dsts, srcs = [], []
        for name, t in weights:
            p = live.get(name)
            if p is None or p.shape != t.shape or p.dtype != t.dtype:
                raise ReloadError(f"kernel-layout tensor {name} {tuple(t.shape)} {t.dtype} does "
                                  "not match the engine's parameter")
            dsts.append(p.data)
            srcs.append(t)
        return dsts, srcs

    def _copy_graph_key(self, program: tuple) -> tuple | None:
        """What a kept ``_kernel_program``'s copy graph depends on (its key, and where the
        parameters are); None when the program is not kept (nothing to replay)."""
        kept = self._ws_state().get("kernel_program")
        return None if kept is None else (kept[0], tuple(d.data_ptr() for d in program[0]))

    def _kernel_program(self, staged: list[tuple[Bucket, torch.Tensor]], key: str | None
                        ) -> tuple[list[torch.Tensor], list[torch.Tensor], tuple]:
        """``_kernel_targets`` for staged buckets, kept while the plan and the (reused, still
        mapped) buffers stay the same: resolving ~300 names and views each sync costs more
        than the copy itself. vLLM keeps its parameter tensors across sleep/wake and reloads
        (it copies into them), so the kept targets stay valid; any checkpoint reload drops
        them anyway."""
        st = self._ws_state()
        ck = (key, tuple(buf.data_ptr() for _, buf in staged)) if key is not None else None
        prog = st.get("kernel_program")
        if ck is not None and prog is not None and prog[0] == ck:
            return prog[1]
        if any(isinstance(buf, Spans) for _, buf in staged):  # direct: from the trainer's
            live = {n: p.data for n, p in self._params().items()}  # memory, piece by piece
            dsts, srcs = [], []
            try:
                for b, spans in staged:
                    d, s = span_targets(b, spans, live)
                    dsts += d
                    srcs += s
            except ConfigError as e:
                raise TransferError(str(e)) from e  # (nothing copied yet)
            # copied by the launch that checksums them (_consume_checked_by_copy)
            program = (dsts, srcs, ManyDigests(srcs, copy_to=dsts))
        else:
            dsts, srcs = self._kernel_targets(t for b, buf in staged
                                              for t in unpack_bucket(b, buf))
            program = (dsts, srcs, copy_split(dsts, srcs))
        st["kernel_program"] = (ck, program) if ck is not None else None
        return program

    # ---- checkpoints ------------------------------------------------------------------------
    def _check_files(self, ckpt: CheckpointFiles, files: PinnedFiles) -> int:
        """Check the open files' headers against the model; returns their tensor bytes."""
        specs = files.specs()
        validate_specs(list(specs.values()), self._expected(),
                       dtype_name(vllm_compat.model_config(self).dtype), self._tied(),
                       partial=ckpt.partial)
        return sum(s.nbytes for s in specs.values())

    @worker_rpc
    def ws_check_files(self, checkpoint_json: str) -> CheckedFiles:
        """Check a checkpoint's headers against the model; keep its files open for
        ``ws_reload_files`` (``KeptCheckpoint``)."""
        ckpt = CheckpointFiles.model_validate_json(checkpoint_json)
        return CheckedFiles(identity=self._kept_checkpoint().check(
            ckpt, lambda files: self._check_files(ckpt, files)))

    def _kept_checkpoint(self) -> KeptCheckpoint:
        return self._ws_state().setdefault("checkpoint", KeptCheckpoint())

    @worker_rpc
    def ws_reload_files(self, checkpoint_json: str) -> ReloadReply:
        """Load the files ``ws_check_files`` kept (``KeptCheckpoint``), checked again: every
        refusal comes before the first tensor is applied."""
        ckpt = CheckpointFiles.model_validate_json(checkpoint_json)
        with self._kept_checkpoint().take(ckpt) as files:
            nbytes = self._check_files(ckpt, files)
            if ckpt.check_finite:  # before any tensor is loaded: a refusal changes nothing
                require_finite(files.tensors(), "the checkpoint")
            t0 = time.perf_counter()
            self._reload(files.tensors())
        st = self._ws_state()
        st["layout"] = st["layout_status"] = None  # re-derive and re-verify on the next sync
        st["kernel_program"] = st["plan"] = None
        return ReloadReply(reload=time.perf_counter() - t0, rebuilt=st.get("rebuilt", ()),
                           nbytes=nbytes)

