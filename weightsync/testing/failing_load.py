"""TEST ONLY: a real vLLM engine whose checkpoint-format load fails part-way, once.

``failing_load_engine(load=N, after=K)`` is a ``make_engine`` (``start_engines(...,
make_engine=...)``): vLLM's ``AsyncLLM`` with ``FailingLoadWorkerExtension`` as its workers'
extension instead of weightsync's own. That extension is weightsync's, except that its
checkpoint applier (``engine.appliers.CheckpointApplier``) hands vLLM's loader K tensors of the
N-th load it is given and then raises: vLLM has written those K tensors (and, with online
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
from weightsync.engine.appliers import AppliedReport, CheckpointApplier, Load
from weightsync.engine.sync_state import WorkerSyncState
from weightsync.engine.worker_ext import WeightSyncWorkerExtension

FAIL_ENV = "WEIGHTSYNC_TEST_FAIL_LOAD"  # "<N>:<K>": the N-th load fails after K tensors
EXTENSION = f"{__name__}.FailingLoadWorkerExtension"


class InjectedLoadFailure(RuntimeError):
    """The failure this module injects (its message says so)."""


class FailingCheckpointApplier(CheckpointApplier):
    """``CheckpointApplier`` whose ``load``-th apply stops after ``after`` tensors (at the
    load's end if it has fewer: that load fails either way)."""

    def __init__(self, worker: Any, state: WorkerSyncState, load: int, after: int) -> None:
        super().__init__(worker, state)
        self.fail_load, self.after, self.loads = load, after, 0

    def apply(self, load: Load) -> AppliedReport:
        self.loads += 1
        if self.loads != self.fail_load:
            return super().apply(load)
        return super().apply(Load(tensors=self._failing(load.weights()),
                                  check_finite=load.check_finite))

    def _failing(self, weights: Iterator[tuple[str, torch.Tensor]]
                 ) -> Iterator[tuple[str, torch.Tensor]]:
        yield from itertools.islice(weights, self.after)
        raise InjectedLoadFailure(f"injected: load {self.fail_load} failed after "
                                  f"{self.after} tensors (weightsync.testing.failing_load)")


class FailingLoadWorkerExtension(WeightSyncWorkerExtension):
    """weightsync's worker extension with ``FailingCheckpointApplier`` as its checkpoint
    applier (``FAIL_ENV`` gives N and K)."""

    def _ws_state(self) -> WorkerSyncState:
        fresh = getattr(self, "_ws", None) is None
        st = super()._ws_state()
        if fresh:
            load, after = (int(x) for x in os.environ[FAIL_ENV].split(":"))
            st.appliers[CheckpointApplier.name] = FailingCheckpointApplier(self, st, load,
                                                                           after)
        return st


def _make(load: int, after: int, **engine_args: Any) -> Any:
    os.environ[FAIL_ENV] = f"{load}:{after}"  # this engine's actor process: its workers inherit it
    return vllm_compat.make_async_engine(**{**engine_args, "worker_extension_cls": EXTENSION})


def failing_load_engine(*, load: int, after: int) -> Any:
    """``make_engine`` for vLLM's engine whose ``load``-th checkpoint-format load fails after
    ``after`` tensors were loaded (picklable: it crosses into the engine's actor)."""
    return functools.partial(_make, load, after)
