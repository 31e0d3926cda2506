"""A trainer sharded over N ranks (FSDP2 ``fully_shard``: DTensor parameters) syncs as one.

Every rank calls ``ShardedSync.sync(module)``; together that is one sync. The sending rank runs
the coordinator (versions, validation, commit or rollback run once) and is the only one that
talks to the engines; the other ranks follow it in lockstep, each over its own link to the
sender (a 2-rank gloo group that ``ShardedSync`` creates):

    sender                                  every other rank
    PLAN  (each bucket's tensor names)  ->  builds the same feed
    BUCKET k, then receives k's shards  ->  BUCKET k: sends its Shard(0) blocks of bucket k
    ...                                      (one message per rank and bucket; ShardGather)
    OUTCOME (the SyncResult or error)   ->  returns the same result / raises the same error

A bucket's shards are gathered when the leg first packs from it, and the previous bucket's are
let go first: the sender holds about one bucket of received blocks (its own block is a view, and
the leg stacks the blocks straight into its packing buffer), every other rank one message of
its own blocks (a bucket / N).

Failures. Every wait of the sender's is bounded by the per-bucket deadline (``gather_timeout_s``,
by default the coordinator's ``TransferConfig.deadlines.transfer``), by gloo's
``Work.wait(timeout)``: each follower's shards of a bucket, and each follower taking a control
message. Both go over the links, not the module's group (whose timeout is the trainer's, often
tens of minutes). A follower that dies breaks its connection at once; one that hangs (alive but
stuck: SIGSTOPped, in a long call) is given up on at the deadline. Either way the sender's feed
raises a ``TransferError`` naming the rank(s) and the sync fails like any transfer failure:
mid-transfer the fleet rolls back (old version, unchanged output) and the sender's
``SyncFailedError`` names the rank(s); a follower that never took the plan fails the sync before
any engine is touched. The healthy followers learn the outcome and raise the same error. A
follower that loses the sender (or waits past ``timeout_s`` for the next message), or whose
shards the sender does not take within the deadline, raises a ``TransferError`` of its own.

After a rank went silent or was lost, the ``ShardedSync`` is broken, on purpose, on every rank
that knows it: the sender, the followers told in the outcome, and the hung rank when it wakes
(gloo closes every connection of a group in which a wait timed out, so the hung rank's link is
closed: its late shards or its next receive fail on its side, and nothing it sends late can land
in a later sync). ``sync`` then raises at once: build a new ``ShardedSync`` on every rank (new
links, created on the default group, which no sync message used) once the hung rank is back; if
it stays stuck, the trainer has to be restarted. Not bounded: ``full_tensor()`` of a DTensor
placed otherwise than ``Shard(0)`` on a 1-D mesh, and blocks off the CPU (NCCL meshes): those
run on the mesh's group, under its own timeout; and a follower needs to reach ``sync`` within
the deadline of the sender's (the plan waits no longer).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

import torch

from weightsync.errors import (
    ConfigError,
    SyncFailedError,
    TransferError,
    WeightSyncError,
    error_class,
)
from weightsync.sources.base import BucketFeed, ModuleTensors, Parts, WeightSource, order_of
from weightsync.sources.hf_names import CheckpointNames
from weightsync.transport.packing import named_tensors, spec_of
from weightsync.types import SyncResult, TensorSpec, TransferPlan

logger = logging.getLogger(__name__)

_PLAN, _BUCKET, _OUTCOME = 1, 2, 3
_CONTROL_TAG, _SHARDS_TAG = 0, 1  # a link carries both, each in its own order


def _rows(n: int, world: int) -> list[int]:
    """Rows of each rank's ``Shard(0)`` block of an ``n``-row tensor (``torch.chunk``'s split,
    as FSDP2 and DTensor cut it: blocks of ceil(n / world) rows, the last ones short or
    empty)."""
    size = -(-n // world)
    return [max(0, min(size, n - r * size)) for r in range(world)]


_ALIGN = 64  # bytes: every block in a rank's message starts where any dtype may view it


class SilentRanks(RuntimeError):
    """Ranks that did not complete their part of a message within the deadline (``silent``:
    alive but stuck, or too slow) or whose connection broke (``lost``: rank -> gloo's error).
    Not a ``WeightSyncError``: a bucket's feed wraps it as its ``TransferError``."""

    def __init__(self, what: str, deadline_s: float, silent: list[int],
                 lost: dict[int, str]) -> None:
        parts = []
        if silent:
            parts.append(f"rank(s) {silent} went silent: no {what} within {deadline_s:.1f} s "
                         f"(alive but stuck, or too slow)")
        if lost:
            parts.append(f"rank(s) {sorted(lost)} lost: " +
                         "; ".join(f"{r}: {e}" for r, e in sorted(lost.items())))
        super().__init__("; ".join(parts))
        self.silent, self.lost = silent, lost


def _wait_each(works: Mapping[int, list], deadline_s: float, what: str) -> None:
    """Wait for every rank's operations, all within one deadline (gloo's ``Work.wait(timeout)``:
    it raises on a timeout and on a broken connection); raise ``SilentRanks`` naming the ranks
    that did not finish. gloo closes every connection of a group in which a wait timed out: a
    late message of that rank's can never land in a later receive (it fails on its side)."""
    end = time.monotonic() + deadline_s
    silent: list[int] = []
    lost: dict[int, str] = {}
    for rank, ws in works.items():
        try:
            for w in ws:
                if w.wait(timedelta(seconds=max(end - time.monotonic(), 0.001))) is False:
                    raise RuntimeError("timed out")
        except RuntimeError as e:
            if "timed out" in str(e).lower() or "timeout" in str(e).lower():
                silent.append(rank)
            else:
                lost[rank] = str(e).splitlines()[0][:200]
    if silent or lost:
        raise SilentRanks(what, deadline_s, silent, lost)


class ShardGather:
    """Brings a bucket's DTensors whole to the sending rank ``src``, as a ``ModuleTensors``
    gather: each other rank packs its ``Shard(0)`` blocks of the bucket into one buffer and
    sends it (one message per rank and bucket; only the sender receives — an all-gather would
    send every rank everything). The sender hands the blocks out as row views, its own block
    included, with no reassembly copy (``pack_bucket`` stacks them into the slot). A DTensor
    placed otherwise (a 2-D mesh, ``Shard(1)``, ``Replicate``) is made whole with
    ``full_tensor()``. Every rank derives the same layout from the DTensors' metadata.

    ``links``: follower rank -> a 2-rank gloo group (the sender and that follower) that carries
    its CPU blocks, and ``deadline_s`` the longest either end waits for a bucket's message: a
    rank that sends nothing by then is named in the ``SilentRanks`` error, and its link is no
    longer usable (see the module docstring). Without links (or for blocks off the CPU) the
    blocks go over the mesh's own group, under its own timeout."""

    borrowed = True  # blocks are views of buffers the next bucket reuses

    def __init__(self, src: int, links: Mapping[int, Any] | None = None,
                 deadline_s: float = 600.0) -> None:
        self.src, self.links, self.deadline_s = src, links, deadline_s
        self._bufs: dict[int, torch.Tensor] = {}  # peer -> message buffer, reused (CPU)
        self.failure: SilentRanks | None = None  # the last gather that timed out or broke

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
        device = blocks[0][1].to_local().device
        bounded = self.links is not None and device.type == "cpu"
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
        for (n, t), (_, _nbytes, rows) in zip(blocks, layout[me], strict=True):
            if t.to_local().shape[0] != rows:
                raise ConfigError(f"{n}: this rank holds {t.to_local().shape[0]} rows of "
                                  f"{t.shape[0]}, not the Shard(0) block of {rows}")
        if rank != self.src:
            buf = self._buffer(me, sizes[me], device)
            for (_, t), (off, nbytes, _) in zip(blocks, layout[me], strict=True):
                if nbytes:
                    buf[off:off + nbytes].copy_(t.to_local().contiguous().view(-1)
                                                .view(torch.uint8))
            if sizes[me] and bounded:  # the sender waits only for ranks that hold rows
                send = dist.isend(buf, dst=self.src, group=self.links[rank], tag=_SHARDS_TAG)
                self._wait({self.src: [send]}, "receipt of this rank's shards by the sender "
                           "(which gives up on a silent rank after the same deadline)")
            elif sizes[me]:
                dist.send(buf, dst=self.src, group=group)
            for n, _ in blocks:
                out[n] = None
            return buf.nbytes
        bufs = {i: self._buffer(i, sizes[i], device) for i in range(world) if i != me and sizes[i]}
        works = {peers[i]: [dist.irecv(b, src=peers[i], group=self.links[peers[i]],
                                       tag=_SHARDS_TAG) if bounded else
                            dist.irecv(b, src=peers[i], group=group)]
                 for i, b in bufs.items()}
        if bounded:
            self._wait(works, "shards of this bucket")
        else:
            for ws in works.values():
                ws[0].wait()
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

    def _wait(self, works: Mapping[int, list], what: str) -> None:
        try:
            _wait_each(works, self.deadline_s, what)
        except SilentRanks as e:
            self.failure = e
            raise


class _Control:
    """The sender's messages to the other ranks, each follower's copy on its own link: a 2-rank
    gloo group of the sender and that follower (point to point, not a broadcast, so that a
    follower that does not take it within ``deadline_s`` is named; one link per follower, as
    gloo closes every connection of a group when a wait in it times out). A follower waits up
    to ``timeout_s`` for the next message."""

    def __init__(self, src: int, timeout_s: float) -> None:
        import torch.distributed as dist

        self.dist, self.src = dist, src
        self.rank = dist.get_rank()
        self.peers = [r for r in range(dist.get_world_size()) if r != src]
        self.links: dict[int, Any] = {}  # follower -> its link, on the ranks of that link
        for r in self.peers:  # every rank of the default group creates each, in this order
            link = dist.new_group([src, r], backend="gloo",
                                  timeout=timedelta(seconds=timeout_s))
            if self.rank in (src, r):
                self.links[r] = link
        self.deadline_s = timeout_s
        self.silent: set[int] = set()  # followers given up on in this sync
        self.failure: SilentRanks | None = None

    def send(self, kind: int, n: int = 0, payload: bytes | None = None) -> None:
        """Send every follower the message, but those given up on earlier in this sync (their
        link is closed)."""
        tensors = [torch.tensor([kind, len(payload) if payload is not None else n],
                                dtype=torch.int64)]
        if payload is not None:
            tensors.append(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
        works: dict[int, list] = {}
        for r in self.peers:
            if r in self.silent:
                continue
            try:
                ws = [self.dist.isend(t, dst=r, group=self.links[r], tag=_CONTROL_TAG)
                      for t in tensors]
            except RuntimeError as e:  # a dead follower, or a link closed by a timeout
                ws = [_Failed(e)]
            works[r] = ws
        try:
            _wait_each(works, self.deadline_s, "receipt of the sender's control message")
        except SilentRanks as e:
            self.silent.update(e.silent, e.lost)
            self.failure = e
            raise

    def receive(self) -> tuple[int, int, bytes | None]:
        header = torch.zeros(2, dtype=torch.int64)
        link = self.links[self.rank]
        self.dist.recv(header, src=self.src, group=link, tag=_CONTROL_TAG)
        kind, n = header.tolist()
        if kind == _BUCKET:
            return kind, n, None
        buf = torch.empty(n, dtype=torch.uint8)
        self.dist.recv(buf, src=self.src, group=link, tag=_CONTROL_TAG)
        return kind, n, buf.numpy().tobytes()


class _Failed:
    """A send that could not start, as a work whose wait raises its error."""

    def __init__(self, error: RuntimeError) -> None:
        self.error = error

    def wait(self, timeout: timedelta | None = None) -> bool:
        raise self.error


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
            try:  # the followers wait for each bucket's messages as long as the sender does
                self.control.send(_PLAN, payload=json.dumps(
                    {"order": order, "deadline_s": self.control.deadline_s}).encode())
            except SilentRanks as e:
                raise TransferError(f"the plan did not reach every rank: {e}") from e
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
    other groups (it creates a 2-rank gloo group per follower: its link to the sender).
    ``timeout_s``: the longest a follower waits for the sender's next message (a whole begin,
    or reload + verify + resume).
    ``gather_timeout_s``: the longest the sender waits for a rank's part of one bucket (its
    shards, or taking a control message) before it fails the sync naming the silent rank(s);
    None: the coordinator's per-bucket deadline (``TransferConfig.deadlines.transfer``). The
    followers learn it with each sync's plan.

    ``broken``: why this object may not sync again (a rank went silent or was lost in a sync);
    then ``sync`` raises ``TransferError`` at once on that rank: build a new ``ShardedSync`` on
    every rank (the module docstring says why).
    """

    def __init__(self, coordinator: Any | None, *, src: int = 0, timeout_s: float = 600.0,
                 gather_timeout_s: float | None = None, convert: bool = True) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise ConfigError("a sharded sync needs torch.distributed initialized on every rank")
        rank = dist.get_rank()
        if (coordinator is None) == (rank == src):
            raise ConfigError(f"rank {rank}: the coordinator belongs on rank {src} and only there")
        if gather_timeout_s is not None and gather_timeout_s <= 0:
            raise ConfigError(f"gather_timeout_s must be positive, not {gather_timeout_s}")
        self.coordinator, self.src, self.rank, self.convert = coordinator, src, rank, convert
        self.control = _Control(src, timeout_s)
        if rank == src:
            transfer = getattr(coordinator, "transfer", None)
            self.control.deadline_s = gather_timeout_s if gather_timeout_s is not None else \
                transfer.deadlines.transfer if transfer is not None else timeout_s
        # the shards go over the control links too: a wait that times out closes the silent
        # rank's link, not the trainer's groups (the mesh's), which stay usable. Its message
        # buffers are kept across syncs; a follower's deadline comes with the plan.
        self.gather = ShardGather(src, self.control.links, self.control.deadline_s)
        self.last_source: ShardedSource | None = None
        self.broken: str | None = None

    def sync(self, module: torch.nn.Module, **kwargs: Any) -> SyncResult:
        """Sync ``module``'s weights; on the sender ``kwargs`` go to ``coordinator.sync``.
        Every rank returns the same ``SyncResult`` or raises the same error (a rank that went
        silent raises its own ``TransferError`` when it wakes)."""
        if self.broken is not None:
            raise TransferError(f"rank {self.rank}: this ShardedSync is broken since a sync in "
                                f"which {self.broken}; build a new ShardedSync on every rank")
        source = ShardedSource(module, self.gather,
                               self.control if self.rank == self.src else None,
                               convert=self.convert)
        self.last_source = source
        if self.rank == self.src:
            return self._send(source, kwargs)
        try:
            return self._follow(source)
        except TransferError as e:  # this rank lost the sender, or was given up on
            self.broken = self.broken or str(e)
            raise

    def _silence(self) -> str | None:
        """The ranks that went silent or were lost in this sync, if any (then this object's
        groups can no longer be trusted)."""
        fails = [f for f in (self.gather.failure, self.control.failure) if f is not None]
        return "; ".join(str(f) for f in fails) or None

    def _send(self, source: ShardedSource, kwargs: dict) -> SyncResult:
        self.gather.failure = self.control.failure = None
        self.control.silent.clear()
        outcome: dict[str, Any] = {"code": WeightSyncError.code,
                                   "message": "the sending rank failed"}
        try:
            result = self.coordinator.sync(source, **kwargs)
            outcome = {"result": result.model_dump(mode="json")}
            return result
        except SyncFailedError as e:
            why = self._silence()
            err = SyncFailedError(f"{e.message}: {why}", engine=e.engine, result=e.result) \
                if why else e
            outcome = {"code": err.code, "message": err.message,
                       "result": err.result.model_dump(mode="json") if err.result else None}
            if err is e:
                raise
            raise err from e
        except WeightSyncError as e:
            outcome = {"code": e.code, "message": e.message, "engine": e.engine}
            raise
        finally:
            why = self._silence()
            if why is not None:
                self.broken = outcome["broken"] = why
            if self.gather.failure is not None:  # given up on: their links are closed
                self.control.silent.update(self.gather.failure.silent, self.gather.failure.lost)
            try:  # a follower that died or went silent cannot hear it; the others must
                self.control.send(_OUTCOME, payload=json.dumps(outcome).encode())
            except Exception as e:  # noqa: BLE001 - the sync's own outcome goes on regardless
                logger.error("rank %d: could not tell the other ranks the outcome: %s",
                             self.rank, e)
                self.broken = self.broken or f"the outcome did not reach every rank: {e}"

    def _follow(self, source: ShardedSource) -> SyncResult:
        feed: BucketFeed | None = None
        while True:
            try:
                kind, n, payload = self.control.receive()
                if kind == _PLAN:
                    plan = json.loads(payload)
                    self.gather.deadline_s = plan["deadline_s"]  # as long as the sender waits
                    source.producer.restart()
                    feed = BucketFeed(plan["order"], source.producer)
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
        if outcome.get("broken"):  # a rank went silent or was lost: the groups are spent
            self.broken = outcome["broken"]
        result = SyncResult.model_validate(outcome["result"]) if outcome.get("result") else None
        if "code" not in outcome:
            return result
        if outcome["code"] == SyncFailedError.code:
            raise SyncFailedError(outcome["message"], result=result)
        raise error_class(outcome["code"])(outcome["message"], engine=outcome.get("engine"))
