"""What a worker keeps between weightsync's calls: one typed object, one owner per field.

vLLM mixes the worker extension into its own Worker, whose constructor is not ours, so the
state is created on first use (``WeightSyncWorkerExtension._ws_state``) and lives in one
attribute (``_ws``) that never collides with vLLM's. Each field says who writes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from weightsync.engine.copy_program import CopyPrograms
from weightsync.engine.derived import ModelStorage
from weightsync.engine.fingerprint import Fingerprinter
from weightsync.engine.kept_checkpoint import KeptCheckpoint
from weightsync.engine.layout_check import LayoutCheck
from weightsync.plan_wire import HeldPlan
from weightsync.transport.broadcast import BroadcastReceiver, PendingJoin
from weightsync.transport.graphs import Replay
from weightsync.types import Bucket, TensorSpec

if TYPE_CHECKING:
    from weightsync.engine.appliers import Applier
    from weightsync.transport.legs.base import ReceiverLeg


@dataclass
class Staged:
    """Buckets received and verified, waiting for ``ws_apply_staged`` (written by the intake):
    the applier chosen for their plan, and the key their copy program is kept under."""

    buckets: list[tuple[Bucket, Any]]
    applier: Applier
    key: str | None = None


@dataclass
class WorkerSyncState:
    """One worker's weightsync state. ``layout`` derives through the worker's model, so the
    worker builds it (``LayoutCheck(derive)``)."""

    layout: LayoutCheck  # kernel layout and whether it is verified (the checkpoint applier)
    # the model as loaded at start (ws_info): every update is validated against it
    expected: dict[str, TensorSpec] | None = None
    expected_error: str | None = None  # why ``expected`` could not be read
    storage: ModelStorage | None = None  # storage/ties/derived state at start (ws_info)
    # the plan body last sent whole (named by key later), parsed once (ws_validate, ws_receive)
    held_plan: HeldPlan = field(default_factory=HeldPlan)
    # transfer group (ws_join_group / ws_join_wait / ws_leave_group)
    group: BroadcastReceiver | None = None
    joining: PendingJoin | None = None
    # receiver legs by name, kept across syncs, and the one of the last receive (ws_receive)
    legs: dict[str, ReceiverLeg] = field(default_factory=dict)
    active_leg: ReceiverLeg | None = None
    staged: Staged | None = None  # (the intake)
    appliers: dict[str, Applier] = field(default_factory=dict)  # by name (appliers.choose)
    rebuilt: tuple[str, ...] = ()  # the last load's notes (engine.derived; the appliers)
    programs: CopyPrograms = field(default_factory=CopyPrograms)  # (kernel-layout appliers)
    checkpoint: KeptCheckpoint = field(default_factory=KeptCheckpoint)  # (ws_check_files)
    graphs: dict[str, Replay] = field(default_factory=dict)  # CUDA graphs by name
    fingerprinter: Fingerprinter | None = None  # (ws_fingerprint and every apply)

    def graph(self, name: str) -> Replay:
        """This worker's ``Replay`` called ``name`` (CUDA only)."""
        if name not in self.graphs:
            self.graphs[name] = Replay(name)
        return self.graphs[name]

    def take_staged(self) -> Staged | None:
        staged, self.staged = self.staged, None
        return staged

    def reloaded_from_files(self) -> None:
        """A checkpoint reload: re-derive and re-verify the layout on the next sync, and
        drop the copy program kept for the plan before (the plan's body stays held: it
        describes no weights)."""
        self.layout.forget()
        self.programs.forget()

