"""One applier per load format, behind one method: ``Applier.apply(load) -> AppliedReport``.

A worker loads weights in one of a few formats, and each is a class here, chosen once per
receive (``choose``) from the plan's format and how its buckets arrive:

- ``CheckpointApplier`` (``"checkpoint"``): checkpoint tensors through vLLM's own loaders
  (``reload_weights``), then the model's storage and derived state checked and restored
  (``engine.derived.ModelStorage``); a staged load also verifies the kernel layout
  (``LayoutCheck.calibrate``). Checkpoint files (``ws_reload_files``) load through it too.
- ``KernelApplier`` (``"kernel"``): tensors already in vLLM's layout, copied straight into its
  parameters (``engine.copy_program``), a kept program replayed as one CUDA graph; online FP8
  weights arrive as their unquantized stacks and are quantized into the parameters there.
- ``CheckedByCopyApplier`` (``"checked-by-copy"``): the sender's own memory (direct IPC pieces)
  copied into the parameters by the launch that checksums every piece as it reads it, compared
  with the sender's checksums after: what is verified is exactly what was written.

A new format (re-quantizing after a load, adapters instead of base weights) is a new
``Applier`` subclass registered under its name (``register_applier``), not a flag.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from weightsync.engine import vllm_compat
from weightsync.engine.copy_program import kernel_targets
from weightsync.engine.sync_state import WorkerSyncState
from weightsync.errors import ReloadError, TransferError
from weightsync.transport.packing import fold_spans, unpack_bucket
from weightsync.types import Bucket

logger = logging.getLogger(__name__)


@dataclass
class Load:
    """What an applier loads: a plan's buckets, all at hand (``staged``, in plan order) or as
    they arrive (``stream``), or a checkpoint's tensors (``tensors``). ``key``: stable while
    the plan and the buffers are (kept copy programs); ``expected_terms``: the sender's
    checksum terms of every direct piece (checked-by-copy), and ``sender_nonfinite`` whether
    each holds NaN or Inf by the same reads (``Incoming.sender_nonfinite``); ``check_finite``:
    refuse NaN or Inf before anything is copied (where the intake has not checked it
    already)."""

    staged: list[tuple[Bucket, Any]] | None = None
    stream: Iterable[tuple[Bucket, Any]] | None = None
    tensors: Iterable[tuple[str, torch.Tensor]] | None = None
    key: str | None = None
    expected_terms: torch.Tensor | None = None
    sender_nonfinite: torch.Tensor | None = None
    check_finite: bool = True

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every (name, tensor) to load, in order."""
        if self.tensors is not None:
            return iter(self.tensors)
        buckets = self.staged if self.staged is not None else (self.stream or ())
        return (t for b, buf in buckets for t in unpack_bucket(b, buf))


@dataclass(frozen=True)
class AppliedReport:
    """What an applier did: the load's seconds, what had to be restored or rebuilt after it
    (``engine.derived``), and, for an applier that checks what it copies, the checksums of
    what it wrote (one per bucket) and their bytes."""

    reload_s: float
    rebuilt: tuple[str, ...] = ()
    checksums: tuple[int, ...] | None = None
    nbytes: int = 0
    finite_s: float = 0.0  # of reload_s: the finite check of pieces checked inside the load


class Applier(ABC):
    """Loads one format into the worker's model. One instance per worker and format, kept
    across syncs (``WorkerSyncState.appliers``). ``worker`` is the vLLM worker.

    ``checks_copies``: the applier verifies what it writes against the sender's checksums
    (``Load.expected_terms``), so the intake does not checksum buckets on arrival; it hands
    over every bucket at once (atomic only)."""

    name: ClassVar[str]  # as registered, and as ``choose`` picks it
    layout: ClassVar[str]  # the plan format it loads (``ApplyReply.layout``)
    checks_copies: ClassVar[bool] = False

    def __init__(self, worker: Any, state: WorkerSyncState) -> None:
        self.worker = worker
        self.state = state

    @abstractmethod
    def apply(self, load: Load) -> AppliedReport:
        """Load ``load`` into the model (``ReloadError``: the weights may be half-written)."""

    def params(self) -> dict[str, torch.nn.Parameter]:
        return dict(vllm_compat.model(self.worker).named_parameters())

    def scale_mirrors(self) -> dict[str, list[torch.Tensor]]:
        """Where vLLM's kernels read the FP8 scales the layout writes besides the scale
        parameters (``vllm_fp8.scale_mirrors``)."""
        from weightsync.engine import vllm_fp8

        return vllm_fp8.scale_mirrors(self.worker, set(self.state.layout.fp8_scales().values()))

    def synchronize(self) -> None:
        """Wait for the device's copies (CUDA), so the load's seconds are the load's."""
        if getattr(self.worker, "device", torch.device("cpu")).type == "cuda":
            torch.cuda.synchronize()


_APPLIERS: dict[str, type[Applier]] = {}


def register_applier(cls: type[Applier]) -> type[Applier]:
    """Make ``cls`` the applier of ``cls.name`` (a class decorator; a name is taken once)."""
    if cls.name in _APPLIERS and _APPLIERS[cls.name] is not cls:
        raise ValueError(f"an applier is already registered as {cls.name!r}")
    _APPLIERS[cls.name] = cls
    return cls


def choose(worker: Any, state: WorkerSyncState, plan_format: str,
           checked_by_copy: bool = False) -> Applier:
    """The worker's applier for a plan of ``plan_format`` (``checked_by_copy``: arriving as
    the sender's own memory, ``Incoming.checked_by_copy``), made on first use."""
    name = CheckedByCopyApplier.name if checked_by_copy else plan_format
    applier = state.appliers.get(name)
    if applier is None:
        cls = _APPLIERS.get(name)
        if cls is None:
            raise TransferError(f"no applier loads {name!r} plans")
        applier = state.appliers[name] = cls(worker, state)
    return applier


@register_applier
class CheckpointApplier(Applier):
    """Checkpoint-format tensors through vLLM's loaders, with nothing derived left behind."""

    name = layout = "checkpoint"

    def apply(self, load: Load) -> AppliedReport:
        st = self.state
        storage = st.storage
        st.rebuilt = ()
        t0 = time.perf_counter()
        with torch.no_grad():
            marks = storage.marks() if storage is not None else {}
            vllm_compat.reload_weights(self.worker, load.weights(), is_checkpoint_format=True)
            if st.layout.fp8_scales():  # vLLM re-quantized: its MoE kernels now read this
                st.programs.forget()  # reload's scale tensors (vllm_fp8.scale_mirrors)
            if storage is not None:  # nothing derived left behind (engine.derived)
                st.rebuilt = tuple(storage.after_load(marks))
                for note in st.rebuilt:
                    logger.info("worker %s: %s", getattr(self.worker, "rank", 0), note)
        self.synchronize()
        reload_s = time.perf_counter() - t0
        if load.staged is not None:  # every bucket at hand: may verify the kernel layout
            st.layout.calibrate(load.staged, self.params)
        return AppliedReport(reload_s=reload_s, rebuilt=st.rebuilt)


@register_applier
class KernelApplier(Applier):
    """Kernel-layout tensors copied straight into vLLM's parameters (``engine.copy_program``):
    staged buckets by a kept program, replayed as one graph while it stays the same. Weights
    vLLM's online FP8 quantized on load are quantized from their stacks into the parameters,
    in the same program (``copy_program.Fp8Write``)."""

    name = layout = "kernel"

    def apply(self, load: Load) -> AppliedReport:
        st = self.state
        t0 = time.perf_counter()
        program = graph_key = None
        fp8 = st.layout.fp8_scales()
        if load.staged is not None:
            program = st.programs.program(load.staged, load.key, self.params, fp8,
                                          self.scale_mirrors)
            graph_key = st.programs.graph_key(program)
        st.rebuilt = ()
        with torch.no_grad():
            if program is not None and graph_key is not None:  # the same as last sync
                st.graph("kernel-layout copy").run(graph_key, program.run)
            elif program is not None:
                program.run()
            else:  # streaming: resolved as the buckets arrive
                kernel_targets(self.params(), load.weights(), fp8,
                               self.scale_mirrors() if fp8 else None).run()
        self.synchronize()
        return AppliedReport(reload_s=time.perf_counter() - t0)


@register_applier
class CheckedByCopyApplier(Applier):
    """Direct buckets (``packing.Spans``: the sender's own memory) loaded into the parameters
    by one launch that checksums every piece as it reads it (``digest_cuda.ManyDigests`` with
    ``copy_to``), then compared with the sender's checksums (``Load.expected_terms`` per piece,
    on the device, read back with ours in one host sync). A mismatch comes after the
    parameters were overwritten: ``ReloadError`` (the host fences the engine until a sync
    succeeds)."""

    name = "checked-by-copy"
    layout = "kernel"
    checks_copies = True

    def apply(self, load: Load) -> AppliedReport:
        st = self.state
        staged, sender_terms = load.staged or [], load.expected_terms
        if sender_terms is None:  # (the intake makes sure: nothing is copied unchecked)
            raise TransferError("checked-by-copy needs the sender's checksum terms")
        t0 = time.perf_counter()
        program = st.programs.program(staged, load.key, self.params)
        graph_key = st.programs.graph_key(program)
        many = program.launch
        finite_s = 0.0
        if load.check_finite:  # the sender's pieces, before anything is copied from them
            t = time.perf_counter()
            st.programs.require_finite(program, self.params, load.sender_nonfinite)
            finite_s = time.perf_counter() - t
        with torch.no_grad():
            if graph_key is not None:  # the same pieces and parameters as last sync
                terms = st.graph("kernel-layout copy").run(graph_key, many.terms)
            else:
                terms = many.terms()
            spans = [buf for _, buf in staged]
            rows = torch.cat([terms, sender_terms]).tolist()  # (the one host sync)
            sums = fold_spans(spans, rows[:len(terms)])
            expected = fold_spans(spans, rows[len(terms):])
        reload_s = time.perf_counter() - t0
        bad = [i for i, (a, b) in enumerate(zip(sums, expected, strict=True)) if a != b]
        if bad:
            raise ReloadError(f"bucket {bad[0]}: the bytes copied from the sender's tensors "
                              "differ from its checksum (did it write them during the sync?); "
                              "the engine's weights are not the sender's")
        st.rebuilt = ()
        return AppliedReport(reload_s=reload_s, checksums=tuple(sums),
                             nbytes=sum(buf.numel() for _, buf in staged), finite_s=finite_s)
