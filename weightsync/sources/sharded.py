"""A trainer sharded over N ranks (FSDP2 ``fully_shard``: DTensor parameters) syncs as one.

Every rank calls ``ShardedSync.sync(module)``; together that is one sync. The sending rank runs
the coordinator (versions, validation, commit or rollback run once) and is the only one that
talks to the engines; the other ranks follow it in lockstep over a gloo control group of the
trainer's own:

    sender                                  every other rank
    PLAN  (each bucket's tensor names)  ->  builds the same feed
    BUCKET k, then full_tensor() of k's  ->  BUCKET k: the same full_tensor() calls, dropped
    ...                                      (each DTensor's all-gather needs every rank)
    OUTCOME (the SyncResult or error)   ->  returns the same result / raises the same error

A bucket's shards are gathered when the leg first packs from it, and the previous bucket's full
tensors are let go first, so a rank holds about one bucket of gathered tensors (plus, on the
sender, the leg's two packing buffers, as in any sync). A rank that dies mid-sync breaks the
gathers: the sender's feed raises a ``TransferError``, the leg fails the transfer, the fleet
rolls back, and the survivors learn the outcome; a follower that loses the sender (or waits
past ``timeout_s`` for the next message) raises a ``TransferError`` of its own. The gathers
themselves run on the module's process group, under that group's own timeout.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import torch

from weightsync.errors import (ConfigError, SyncFailedError, TransferError, WeightSyncError,
                               error_class)
from weightsync.sources.base import BucketFeed, ModuleTensors, Parts, WeightSource, order_of
from weightsync.sources.hf_names import CheckpointNames
from weightsync.transport.packing import named_tensors, spec_of
from weightsync.types import SyncResult, TensorSpec, TransferPlan

logger = logging.getLogger(__name__)

_PLAN, _BUCKET, _OUTCOME = 1, 2, 3


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (an all-gather across its mesh), or ``t`` itself."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


class _Control:
    """The sender's messages to the other ranks, on a gloo group with a deadline."""

    def __init__(self, src: int, timeout_s: float) -> None:
        import torch.distributed as dist

        self.dist, self.src = dist, src
        self.rank = dist.get_rank()
        # every rank of the default group creates it, in the same order (a collective)
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))

    def send(self, kind: int, n: int = 0, payload: bytes | None = None) -> None:
        header = torch.tensor([kind, len(payload) if payload is not None else n],
                              dtype=torch.int64)
        self.dist.broadcast(header, self.src, group=self.group)
        if payload is not None:
            self.dist.broadcast(torch.frombuffer(bytearray(payload), dtype=torch.uint8),
                                self.src, group=self.group)

    def receive(self) -> tuple[int, int, bytes | None]:
        header = torch.zeros(2, dtype=torch.int64)
        self.dist.broadcast(header, self.src, group=self.group)
        kind, n = header.tolist()
        if kind == _BUCKET:
            return kind, n, None
        buf = torch.empty(n, dtype=torch.uint8)
        self.dist.broadcast(buf, self.src, group=self.group)
        return kind, n, buf.numpy().tobytes()


class ShardedSource(WeightSource):
    """A sharded module's tensors under checkpoint names (transformers' conversion applies as
    for any module), gathered a bucket at a time in the same order on every rank. Its metadata
    is the DTensors' global shapes: nothing is gathered before the plan."""

    def __init__(self, module: torch.nn.Module, control: _Control | None = None, *,
                 convert: bool = True) -> None:
        named = dict(named_tensors(module))
        names = CheckpointNames.of(module, [spec_of(n, t) for n, t in named.items()]) \
            if convert else None
        self.producer = ModuleTensors(named, names, materialize=full_tensor)
        self.control = control

    def specs(self) -> list[TensorSpec]:
        return self.producer.specs()

    def feed(self, plan: TransferPlan, parts: Parts | None = None) -> Mapping[str, Any]:
        order = order_of(plan, parts)
        announce = None
        if self.control is not None:
            self.control.send(_PLAN, payload=json.dumps(order).encode())
            announce = lambda k: self.control.send(_BUCKET, k)  # noqa: E731
        self.producer.restart()
        return BucketFeed(order, self.producer, parts, announce=announce)

    @property
    def peak_gathered_bytes(self) -> int:
        """The most bytes of gathered full tensors this rank held at once, over its syncs."""
        return self.producer.peak_held


class ShardedSync:
    """``sync(module)`` on every rank of a sharded trainer is one fleet sync.

    ``coordinator``: the ``SyncCoordinator`` on rank ``src`` (the sending rank), None on every
    other rank. Construct it on every rank of the default process group, in the same order as
    other groups (it creates the gloo control group). ``timeout_s``: the longest a follower
    waits for the sender's next message (a whole begin, or reload + verify + resume).
    """

    def __init__(self, coordinator: Any | None, *, src: int = 0, timeout_s: float = 600.0,
                 convert: bool = True) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise ConfigError("a sharded sync needs torch.distributed initialized on every rank")
        rank = dist.get_rank()
        if (coordinator is None) == (rank == src):
            raise ConfigError(f"rank {rank}: the coordinator belongs on rank {src} and only there")
        self.coordinator, self.src, self.rank, self.convert = coordinator, src, rank, convert
        self.control = _Control(src, timeout_s)
        self.last_source: ShardedSource | None = None

    def sync(self, module: torch.nn.Module, **kwargs: Any) -> SyncResult:
        """Sync ``module``'s weights; on the sender ``kwargs`` go to ``coordinator.sync``.
        Every rank returns the same ``SyncResult`` or raises the same error."""
        source = ShardedSource(module, self.control if self.rank == self.src else None,
                               convert=self.convert)
        self.last_source = source
        if self.rank == self.src:
            return self._send(source, kwargs)
        return self._follow(source)

    def _send(self, source: ShardedSource, kwargs: dict) -> SyncResult:
        outcome: dict[str, Any] = {"code": WeightSyncError.code,
                                   "message": "the sending rank failed"}
        try:
            result = self.coordinator.sync(source, **kwargs)
            outcome = {"result": result.model_dump(mode="json")}
            return result
        except SyncFailedError as e:
            outcome = {"code": e.code, "message": e.message,
                       "result": e.result.model_dump(mode="json") if e.result else None}
            raise
        except WeightSyncError as e:
            outcome = {"code": e.code, "message": e.message, "engine": e.engine}
            raise
        finally:
            try:  # a follower that died cannot hear it; the others must
                self.control.send(_OUTCOME, payload=json.dumps(outcome).encode())
            except Exception as e:  # noqa: BLE001 - the sync's own outcome goes on regardless
                logger.error("rank %d: could not tell the other ranks the outcome: %s",
                             self.rank, e)

    def _follow(self, source: ShardedSource) -> SyncResult:
        feed: BucketFeed | None = None
        while True:
            try:
                kind, n, payload = self.control.receive()
                if kind == _PLAN:
                    order = json.loads(payload)
                    source.producer.restart()
                    feed = BucketFeed(order, source.producer)
                elif kind == _BUCKET:
                    if feed is None:
                        raise TransferError("bucket before plan")
                    feed.load(n)  # the same gathers as the sender, in the same order
                elif kind == _OUTCOME:
                    break
                else:
                    raise TransferError(f"unknown control message {kind}")
            except WeightSyncError as e:
                raise TransferError(f"rank {self.rank}: {e}") from e
            except RuntimeError as e:  # gloo: the sender died, or went silent past timeout_s
                raise TransferError(f"rank {self.rank} lost the sending rank {self.src} "
                                    f"mid-sync: {e}") from e
        feed = None  # let the last bucket go
        outcome = json.loads(payload)
        result = SyncResult.model_validate(outcome["result"]) if outcome.get("result") else None
        if "code" not in outcome:
            return result
        if outcome["code"] == SyncFailedError.code:
            raise SyncFailedError(outcome["message"], result=result)
        raise error_class(outcome["code"])(outcome["message"], engine=outcome.get("engine"))
