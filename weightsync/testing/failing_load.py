"""TEST ONLY: a real vLLM engine whose load fails part-way, once.

``failing_load_engine(load=N, after=K)`` is a ``make_engine`` (``start_engines(...,
make_engine=...)``): vLLM's ``AsyncLLM`` with ``FailingLoadWorkerExtension`` as its workers'
extension instead of weightsync's own. That extension is weightsync's, except that the N-th
load it is given, checkpoint format (``engine.appliers.CheckpointApplier``: vLLM's loader gets
K tensors) or kernel layout (``KernelApplier``: K tensors are copied in), stops after K tensors
and raises: vLLM has written those K tensors (and, with online
quantization, processed whatever layers they completed) when the error reaches the host, so
the engine's weights are half-written, as after a device fault or a loader bug mid-load. Every
other load is the applier's own. The setting reaches the workers, which vLLM starts in their
own processes, through their environment (``FAIL_ENV``), set in the engine's actor process
before vLLM starts them.
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Iterator
from typing import Any

import torch

from weightsync.engine import vllm_compat
from weightsync.engine.appliers import AppliedReport, CheckpointApplier, KernelApplier, Load
from weightsync.engine.copy_program import kernel_targets
from weightsync.engine.sync_state import WorkerSyncState
from weightsync.engine.worker_ext import WeightSyncWorkerExtension

FAIL_ENV = "WEIGHTSYNC_TEST_FAIL_LOAD"  # "<N>:<K>": the N-th load fails after K tensors
EXTENSION = f"{__name__}.FailingLoadWorkerExtension"


class InjectedLoadFailure(RuntimeError):
    """The failure this module injects (its message says so)."""


class Injector:
    """Counts a worker's loads, whatever their format, and fails the ``load``-th after
    ``after`` tensors (at the load's end if it has fewer: that load fails either way)."""

    def __init__(self, load: int, after: int) -> None:
        self.fail_load, self.after, self.loads = load, after, 0

    def fails_now(self) -> bool:
        self.loads += 1
        return self.loads == self.fail_load

    def failing(self, weights: Iterator[tuple[str, torch.Tensor]]
                ) -> Iterator[tuple[str, torch.Tensor]]:
        yield from itertools.islice(weights, self.after)
        raise self.error()

    def error(self) -> InjectedLoadFailure:
        return InjectedLoadFailure(f"injected: load {self.fail_load} failed after "
                                   f"{self.after} tensors (weightsync.testing.failing_load)")


class FailingCheckpointApplier(CheckpointApplier):
    """``CheckpointApplier`` whose injected load hands vLLM's loader ``after`` tensors, then
    raises (``injector`` set by the extension)."""

    injector: Injector

    def apply(self, load: Load) -> AppliedReport:
        if not self.injector.fails_now():
            return super().apply(load)
        return super().apply(Load(tensors=self.injector.failing(load.weights()),
                                  check_finite=load.check_finite))


class FailingKernelApplier(KernelApplier):
    """``KernelApplier`` whose injected load writes ``after`` tensors into the parameters
    (quantizing online-FP8 weights as the real one does), then raises."""

    injector: Injector

    def apply(self, load: Load) -> AppliedReport:
        if not self.injector.fails_now():
            return super().apply(load)
        with torch.no_grad():
            fp8 = self.state.layout.fp8_scales()
            kernel_targets(self.params(), itertools.islice(load.weights(), self.injector.after),
                           fp8, self.scale_mirrors() if fp8 else None).run()
        self.synchronize()
        raise self.injector.error()


class FailingLoadWorkerExtension(WeightSyncWorkerExtension):
    """weightsync's worker extension with failing checkpoint and kernel appliers, sharing one
    count of loads (``FAIL_ENV`` gives N and K)."""

    def _ws_state(self) -> WorkerSyncState:
        fresh = getattr(self, "_ws", None) is None
        st = super()._ws_state()
        if fresh:
            injector = Injector(*(int(x) for x in os.environ[FAIL_ENV].split(":")))
            for applier in (FailingCheckpointApplier(self, st), FailingKernelApplier(self, st)):
                applier.injector = injector
                st.appliers[applier.name] = applier
        return st


def _make(load: int, after: int, **engine_args: Any) -> Any:
    os.environ[FAIL_ENV] = f"{load}:{after}"  # this engine's actor process: its workers inherit it
    return vllm_compat.make_async_engine(**{**engine_args, "worker_extension_cls": EXTENSION})


def failing_load_engine(*, load: int, after: int) -> Any:
    """``make_engine`` for vLLM's engine whose ``load``-th load (any format) fails after
    ``after`` tensors were loaded (picklable: it crosses into the engine's actor)."""
    return functools.partial(_make, load, after)
