"""A trainer sharded over N ranks (FSDP2 ``fully_shard``: DTensor parameters) syncs as one.

Every rank calls ``ShardedSync.sync(module)``; together that is one sync. The sending rank runs
the coordinator (versions, validation, commit or rollback run once) and is the only one that
talks to the engines; the other ranks follow it in lockstep over a gloo control group of the
trainer's own:

    sender                                  every other rank
    PLAN  (each bucket's tensor names)  ->  builds the same feed
    BUCKET k, then receives k's shards  ->  BUCKET k: sends its Shard(0) blocks of bucket k
    ...                                      (one message per rank and bucket; ShardGather)
    OUTCOME (the SyncResult or error)   ->  returns the same result / raises the same error

A bucket's shards are gathered when the leg first packs from it, and the previous bucket's are
let go first: the sender holds about one bucket of received blocks (its own block is a view, and
the leg stacks the blocks straight into its packing buffer), every other rank one message of
its own blocks (a bucket / N). A rank that dies mid-sync breaks the
gathers: the sender's feed raises a ``TransferError``, the leg fails the transfer, the fleet
rolls back, and the survivors learn the outcome; a follower that loses the sender (or waits
past ``timeout_s`` for the next message) raises a ``TransferError`` of its own. The gathers
themselves run on the module's process group, under that group's own timeout.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
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


def _rows(n: int, world: int) -> list[int]:
    """Rows of each rank's ``Shard(0)`` block of an ``n``-row tensor (``torch.chunk``'s split,
    as FSDP2 and DTensor cut it: blocks of ceil(n / world) rows, the last ones short or
    empty)."""
    size = -(-n // world)
    return [max(0, min(size, n - r * size)) for r in range(world)]


_ALIGN = 64  # bytes: every block in a rank's message starts where any dtype may view it


class ShardGather:
    """Brings a bucket's DTensors whole to the sending rank ``src``, as a ``ModuleTensors``
    gather: each other rank packs its ``Shard(0)`` blocks of the bucket into one buffer and
    sends it (one message per rank and bucket; only the sender receives — an all-gather would
    send every rank everything). The sender hands the blocks out as row views, its own block
    included, with no reassembly copy (``pack_bucket`` stacks them into the slot). A DTensor
    placed otherwise (a 2-D mesh, ``Shard(1)``, ``Replicate``) is made whole with
    ``full_tensor()``. Every rank derives the same layout from the DTensors' metadata."""

    borrowed = True  # blocks are views of buffers the next bucket reuses

    def __init__(self, src: int) -> None:
        self.src = src
        self._bufs: dict[int, torch.Tensor] = {}  # peer -> message buffer, reused (CPU)

    def _buffer(self, peer: int, nbytes: int, device: torch.device) -> torch.Tensor:
        """A message buffer for ``peer``, reused across buckets and syncs on CPU (fresh pages
        cost a page fault each). Safe: a bucket's blocks are dropped, and packed (CPU copies
        are synchronous), before the next bucket is gathered."""
        if device.type != "cpu":
            return torch.empty(nbytes, dtype=torch.uint8, device=device)
        buf = self._bufs.get(peer)
        if buf is None or buf.numel() < nbytes:
            buf = self._bufs[peer] = torch.empty(nbytes, dtype=torch.uint8)
        return buf[:nbytes]

    def __call__(self, named: Mapping[str, torch.Tensor], srcs: Sequence[str]
                 ) -> tuple[dict[str, Any], int]:
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor, Shard

        rank = dist.get_rank()
        out: dict[str, Any] = {}
        blocks: list[tuple[str, DTensor]] = []
        mesh = None
        allocated = 0
        for n in srcs:
            t = named[n]
            if not isinstance(t, DTensor):
                out[n] = t if rank == self.src else None
            elif t.device_mesh.ndim == 1 and tuple(t.placements) == (Shard(0),) and \
                    t.dim() > 0 and (mesh is None or t.device_mesh == mesh):
                mesh = t.device_mesh
                blocks.append((n, t))
            else:  # a collective on every rank, in this order
                full = t.full_tensor()
                out[n] = full if rank == self.src else None
                allocated += full.nbytes if rank == self.src else 0
        if blocks:
            allocated += self._exchange(blocks, mesh, rank, out)
        return out, allocated

    def _exchange(self, blocks, mesh, rank: int, out: dict[str, Any]) -> int:
        import torch.distributed as dist

        group = mesh.get_group()
        peers = dist.get_process_group_ranks(group)
        if self.src not in peers:
            raise ConfigError(f"the sending rank {self.src} is not in the model's mesh {peers}")
        world = len(peers)
        # every peer's message layout: (offset, nbytes, rows) of each block, from metadata
        layout = [[] for _ in peers]
        sizes = [0] * world
        for _, t in blocks:
            row_bytes = math.prod(t.shape[1:]) * t.element_size()  # metadata only: no
            # DTensor op (indexing one would be a collective)
            for i, rows in enumerate(_rows(t.shape[0], world)):
                layout[i].append((sizes[i], rows * row_bytes, rows))
                sizes[i] += -(-rows * row_bytes // _ALIGN) * _ALIGN
        me = peers.index(rank)
        for (n, t), (_, nbytes, rows) in zip(blocks, layout[me], strict=True):
            if t.to_local().shape[0] != rows:
                raise ConfigError(f"{n}: this rank holds {t.to_local().shape[0]} rows of "
                                  f"{t.shape[0]}, not the Shard(0) block of {rows}")
        if rank != self.src:
            buf = self._buffer(me, sizes[me], blocks[0][1].to_local().device)
            for (_, t), (off, nbytes, _) in zip(blocks, layout[me], strict=True):
                if nbytes:
                    buf[off:off + nbytes].copy_(t.to_local().contiguous().view(-1)
                                                .view(torch.uint8))
            if sizes[me]:  # the sender waits only for ranks that hold rows of this bucket
                dist.send(buf, dst=self.src, group=group)
            for n, _ in blocks:
                out[n] = None
            return buf.nbytes
        device = blocks[0][1].to_local().device
        bufs = {i: self._buffer(i, sizes[i], device) for i in range(world) if i != me and sizes[i]}
        works = [dist.irecv(b, src=peers[i], group=group) for i, b in bufs.items()]
        for w in works:
            w.wait()
        for k, (n, t) in enumerate(blocks):
            parts = []
            for i in range(world):
                off, nbytes, rows = layout[i][k]
                if not rows:
                    continue
                if i == me:
                    parts.append(t.to_local())
                else:
                    parts.append(bufs[i][off:off + nbytes].view(t.dtype)
                                 .view(rows, *t.shape[1:]))
            out[n] = parts[0] if len(parts) == 1 else parts
        return sum(b.nbytes for b in bufs.values())


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

    def __init__(self, module: torch.nn.Module, gather: ShardGather,
                 control: _Control | None = None, *, convert: bool = True) -> None:
        named = dict(named_tensors(module))
        names = CheckpointNames.of(module, [spec_of(n, t) for n, t in named.items()]) \
            if convert else None
        self.producer = ModuleTensors(named, names, gather=gather)
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
        """The most bytes this rank allocated to gather a bucket (received blocks on the sender,
        its outgoing message elsewhere) and held at once, over its syncs."""
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
        self.gather = ShardGather(src)  # its message buffers are kept across syncs
        self.last_source: ShardedSource | None = None

    def sync(self, module: torch.nn.Module, **kwargs: Any) -> SyncResult:
        """Sync ``module``'s weights; on the sender ``kwargs`` go to ``coordinator.sync``.
        Every rank returns the same ``SyncResult`` or raises the same error."""
        source = ShardedSource(module, self.gather,
                               self.control if self.rank == self.src else None,
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
