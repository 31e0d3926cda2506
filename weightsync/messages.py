"""The sync protocol's messages between the coordinator, the engine host and its workers.

Each is a frozen model parsed once at the boundary it crosses: workers answer ``collective_rpc``
with ``WorkerReply[...]`` JSON (a reply, or the typed error it raised), hosts answer the
coordinator with these models through Ray. An unknown or missing field is a validation error,
never a default. The user-facing values (plans, results, statuses) live in ``weightsync.types``.
"""

from __future__ import annotations

import functools
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from weightsync.types import FinishReply, KernelLayout

ApplyMode = Literal["staged", "streaming", "atomic"]
"""How a worker applies what it receives. ``staged``: keep every bucket until the coordinator
says apply (fleet all-or-nothing). ``streaming``: feed buckets into the loader as they arrive.
``atomic``: verify every bucket against the sender's checksums, then load, in one call (a leg
that knows the sender's checksums up front, for a wave of one engine)."""


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# ---- worker -> host ----------------------------------------------------------------------------
class WorkerError(_Message):
    """A ``WeightSyncError`` raised in a worker, as data (vLLM would flatten it to a string)."""

    code: str
    message: str


R = TypeVar("R")


class WorkerReply(_Message, Generic[R]):
    """What every worker RPC returns: exactly one of its reply and the error it raised."""

    reply: R | None = None
    error: WorkerError | None = None

    @model_validator(mode="after")
    def _one(self) -> WorkerReply[R]:
        if (self.reply is None) == (self.error is None):
            raise ValueError("a worker reply carries a reply or an error, not both or neither")
        return self


@functools.cache
def reply_of(model: type[BaseModel]) -> type[WorkerReply[Any]]:
    """``WorkerReply[model]``, built once and kept (pydantic keeps parametrized generics only
    weakly: rebuilt after a garbage collection, each costs a schema build on the sync's path)."""
    return WorkerReply[model]  # type: ignore[valid-type]  # (a generic built at run time)


class Ack(_Message):
    ok: Literal[True] = True


class WorkerInfo(_Message):
    runner: str
    rank: int  # the worker's rank in its engine (vLLM's parallel_config.rank)
    device: str
    dtype: str
    model: str
    workers: int = 1  # the engine's workers (tensor x pipeline parallel)
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    device_uuid: str | None = None  # the worker's GPU (CUDA IPC opens only its own buckets)


class JoinReply(_Message):
    rank: int


class ApplyReply(_Message):
    """Staged buckets applied: the load's seconds, the format they were in, and the worker's
    fingerprint of the weights it loaded (``fingerprint``, taken in the same call). The engine's
    reply carries ``finish`` where that completes the verify step (``FinishReply``)."""

    reload: float
    layout: Literal["checkpoint", "kernel"]
    fingerprint: str | None = None
    rebuilt: tuple[str, ...] = ()
    seconds: dict[str, float] = Field(default_factory=dict)
    finish: FinishReply | None = None


class ReloadReply(_Message):
    reload: float
    rebuilt: tuple[str, ...] = ()  # what the worker restored or rebuilt after loading
    nbytes: int = Field(0, ge=0)  # tensor bytes of the checkpoint it loaded


class JoinProgress(_Message):
    """A worker's answer to ``ws_join_group``/``ws_join_wait``: its rank in the group, and
    whether it has joined yet (a failed or cancelled join is the worker's typed error)."""

    rank: int
    joined: bool


class CheckedFiles(_Message):
    """A checkpoint's files, opened, checked and kept open by a worker until it loads them:
    ``identity`` is what it checked (every file's size, modification time and header), equal
    on every engine that read the same files."""

    identity: str


class Fingerprint(_Message):
    digest: str
    rebuilt: tuple[str, ...] = ()  # what the worker restored or rebuilt after its last load


class TensorDigests(_Message):
    """Every tensor an engine's kernels read, by name, as ``dtype[shape]:checksum``
    (``engine.kernel_reads``); ``unregistered``: those held by kernel objects whose storage is
    no parameter's or buffer's; ``opaque``: objects the kernels hold whose state cannot be
    read (C++ handles), named and not compared."""

    digests: dict[str, str]
    unregistered: tuple[str, ...] = ()
    opaque: tuple[str, ...] = ()


class EngineWorkers(_Message):
    """An engine's workers as vLLM started them: how many join a transfer group, and the
    parallel shape that decides which slice of every parameter each holds."""

    workers: int = Field(ge=1)
    tensor_parallel: int = Field(ge=1)
    pipeline_parallel: int = Field(ge=1)
    device_uuids: tuple[str | None, ...] = ()  # per worker (CUDA), in rank order

    @property
    def shape(self) -> str:
        """Engines of the same shape hold the same slices: their per-rank fingerprints are
        comparable."""
        return f"tp{self.tensor_parallel}xpp{self.pipeline_parallel}x{self.workers}"


class GpuMemory(_Message):
    """``torch.cuda.mem_get_info`` (device-wide) and the worker's allocator counters; all
    ``None`` on CPU. ``peak_allocated``: the most the worker's allocator held at once since
    the previous reading (or the engine's start): a sync's extra device memory is that less
    ``allocated`` before it."""

    free: int | None = None
    total: int | None = None
    allocated: int | None = None
    reserved: int | None = None
    peak_allocated: int | None = None


class LayoutStatus(_Message):
    """The engine's kernel layout (fast path): whether one exists and a checkpoint-format load
    verified it bit for bit; the layout itself once verified."""

    candidate: bool
    verified: bool
    reason: str
    layout: KernelLayout | None = None
    signature: str | None = None


# ---- host -> worker ----------------------------------------------------------------------------
class ReceiveRequest(_Message):
    """What a sender leg asks every worker to do with a plan: which receiver to use, how to
    apply, the deadline per bucket, and the leg's own data (e.g. an ``IpcShare``), which only
    that leg's receiver parses."""

    leg: str = Field(min_length=1)
    apply: ApplyMode
    deadline_s: float = Field(gt=0)
    payload: str | None = None
    # instead of ``payload``: the payload this receiver was sent whole before, by its key
    # (``transport.legs.base.payload_key``; an IPC share kept across syncs is ~23 KB for a MoE)
    payload_key: str | None = None
    # a wave of one engine applying atomically: commit this version in the same call once
    # the load verified (``EngineHost.receive``)
    commit_version: int | None = Field(None, ge=1)
    # refuse non-finite tensors before applying them (``TransferConfig.check_finite``)
    check_finite: bool = True

    @model_validator(mode="after")
    def _payload_or_key(self) -> ReceiveRequest:
        if self.payload is not None and self.payload_key is not None:
            raise ValueError("a request carries its payload or names one by key, not both")
        return self


# ---- host -> coordinator -----------------------------------------------------------------------
class BeginReply(_Message):
    """The engine paused (and slept and woke its weights where asked): each phase's seconds,
    what was skipped and why, the transfer group it is still in, if any, and the key of the
    plan body it holds (``plan_wire.plan_message`` names it instead of sending it again)."""

    seconds: dict[str, float]
    skipped: tuple[str, ...] = ()
    group_id: str | None = None
    plan_key: str | None = None


class CommitReply(_Message):
    """The engine serves the new version: the seconds of its last phases and of the whole
    sync as it saw it."""

    seconds: dict[str, float]


class SleepReply(_Message):
    """An engine went to sleep for a colocated trainer: the level, how much device memory that
    freed (device-wide free memory after minus before; ``None`` where nothing can be
    measured), each phase's seconds, and what was skipped and why (on CPU: everything but
    the pause, since vLLM's sleep mode is CUDA-only)."""

    level: int
    freed_bytes: int | None = None
    free_after: int | None = None
    seconds: dict[str, float]
    skipped: tuple[str, ...] = ()
