"""Moves one plan's buckets from the trainer to a set of engine actors.

Three legs, one contract — each returns the sender's per-bucket checksums, every engine's
``ReceiveReport``, and the engines that failed (typed errors), and none of them hangs:

- ``broadcast``: rank 0 of a gloo/NCCL group with the engines' workers. The group stays open
  across syncs while its members are unchanged and report it; any failure tears it down.
  With ``broadcast="chain"`` (gloo) the sender feeds the first engine and each engine forwards.
- ``ipc``: colocated engines map the trainer's CUDA buckets (no copy, no group).
- ``external``: a sender outside this process (a trainer reaching the fleet through the
  control plane) hosts the group; the engines join it.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any, Protocol

from weightsync.config import TransferConfig
from weightsync.errors import TransferError, WeightSyncError
from weightsync.remote import gather
from weightsync.transport.broadcast import BroadcastSender, free_port, open_group
from weightsync.transport.graphs import Replay
from weightsync.transport.packing import bucket_sources, digest_terms, fold_terms, pack_bucket
from weightsync.types import ReceiveReport, TransferPlan

logger = logging.getLogger(__name__)

Outcome = tuple[list[int], dict[str, ReceiveReport], dict[str, WeightSyncError]]


def bucket_terms(bufs):
    """The sender's checksum terms of its IPC buckets, on the device (``digest_terms``; a
    function of its own so a test can falsify what the engines are told)."""
    return digest_terms(bufs)


class ExternalSender(Protocol):
    """The far end of ``SyncCoordinator.sync_external``: a sender in another process (a trainer
    outside the Ray cluster) that hosts the group as rank 0 and broadcasts the plan."""

    address: tuple[str, int]  # where rank 0 hosts the group's store

    def ready(self, plan: TransferPlan, world_size: int) -> None:
        """The engines are joining ``address``: the sender may open the group and send."""

    def wait_checksums(self, timeout: float) -> list[int]:
        """The sender's per-bucket checksums once it sent everything; raises a
        ``WeightSyncError`` if it failed, aborted, or did not finish within ``timeout``."""


class FleetTransfer:
    """The trainer's side of every transfer leg; owns the open group and IPC buffers."""

    def __init__(self, cfg: TransferConfig, on_bucket: Callable[[int], None]) -> None:
        self.cfg = cfg
        self.on_bucket = on_bucket
        self._group: tuple[tuple[str, ...], str, BroadcastSender] | None = None
        self._ipc_keepalive: list[Any] | None = None  # this sync's CUDA-IPC buckets
        self._ipc_handles: str | None = None  # their IpcShare, as sent (reused with them)
        self._ipc_terms: Any = None  # the sender's checksum terms, shared with the engines
        self._ipc_event: Any = None  # interprocess CUDA event recorded after packing
        self._pack_graph = Replay("IPC packing")  # with reused buffers: one launch per sync
        self._ipc_views: list[dict] = []  # packing's cached destination views per bucket
        self.trainer_seconds: dict[str, float] = {}  # the trainer's share of the last transfer

    # ---- broadcast -------------------------------------------------------------------------
    def broadcast(self, actors: dict[str, Any], group_ids: dict[str, str | None],
                  plan: TransferPlan, plan_json: str, tensors) -> Outcome:
        dl = self.cfg.deadlines
        sender, bad = self._group_for(actors, group_ids)
        if sender is None:
            return [], {}, bad
        if self.cfg.broadcast == "chain":  # engines forward in join (rank) order
            plan = plan.model_copy(update={"chain_chunk": self.cfg.chain_chunk_bytes})
            plan_json = plan.model_dump_json()
        recvs = {n: a.receive.remote(plan_json, self.cfg.apply, dl.transfer)
                 for n, a in actors.items()}
        sums: list[int] = []
        send_error: WeightSyncError | None = None
        try:
            sums = sender.send(plan, tensors, dl.transfer, on_bucket=self.on_bucket)
        except WeightSyncError as e:
            send_error = e
            self.close_group()  # break the group so receivers fail fast instead of waiting
        ok, bad = gather(recvs, dl.transfer * 1.6)
        if bad:
            self.close_group()  # never reuse a group that failed anyone
        if send_error is not None:
            logger.error("broadcast of version %d failed: %s; engines at fault: %s",
                         plan.version, send_error, sorted(bad) or "unknown")
            if not bad:  # nobody else failed: the sender itself is at fault
                bad = {n: TransferError(f"sender failed: {send_error}", engine=n) for n in actors}
        return sums, ok, bad

    def _group_for(self, actors, group_ids) -> tuple[BroadcastSender | None, dict]:
        """The open group when every member still reports it (saves a rendezvous, and NCCL
        communicator setup, per sync), else a new one."""
        dl = self.cfg.deadlines
        members = tuple(actors)
        cached = self._group
        if cached and cached[0] == members and all(group_ids.get(n) == cached[1] for n in actors):
            return cached[2], {}
        self.close_group()
        group_id = uuid.uuid4().hex
        world = 1 + len(actors)
        port = free_port(self.cfg.host, self.cfg.port)
        joins = {n: a.join_group.remote(self.cfg.backend, self.cfg.host, port, 1 + i, world,
                                        dl.rendezvous, group_id)
                 for i, (n, a) in enumerate(actors.items())}
        try:
            sender = BroadcastSender(open_group(self.cfg.backend, self.cfg.host, port, 0, world,
                                                dl.rendezvous))
        except WeightSyncError as e:
            _, bad = gather(joins, dl.rendezvous * 0.5)
            return None, bad or {n: TransferError(f"rendezvous failed: {e}", engine=n)
                                 for n in actors}
        _, bad = gather(joins, dl.rendezvous)
        if bad:
            sender.close()
            return None, bad
        self._group = (members, group_id, sender)
        return sender, {}

    def close_group(self) -> None:
        """Tear down the open broadcast group (engines leave theirs on their next join)."""
        if self._group is not None:
            self._group[2].close()
            self._group = None

    # ---- colocated CUDA IPC -----------------------------------------------------------------
    def ipc(self, actors: dict[str, Any], plan: TransferPlan, plan_json: str, tensors) -> Outcome:
        """Pack, checksum and share the buckets; every engine maps and verifies them.

        Nothing here waits for the device: packing and the sender's checksum terms are queued,
        an interprocess event is recorded after them, and the handles go out at once; each
        worker's stream waits on the event, so the GPU work overlaps the calls. Every engine
        refuses a bucket whose checksum differs from the sender's before anything is applied.
        A wave of one engine also applies in the same call (``apply="atomic"``):
        all-or-nothing holds trivially, and a round trip is saved.
        """
        import torch

        from weightsync.transport.ipc import IpcShare, interprocess_event, share_bucket

        reuse = self.cfg.ipc_reuse_buffers
        sizes = [b.nbytes for b in plan.buckets]
        kept = self._ipc_keepalive if reuse and self._ipc_keepalive is not None and \
            [b.numel() for b in self._ipc_keepalive] == sizes else None
        if kept is None:
            self.release_ipc_buffers(force=True)  # left over, or the plan's shape changed
        t = time.perf_counter()
        device = torch.device("cuda", torch.cuda.current_device())
        if kept is None or len(self._ipc_views) != len(sizes):
            self._ipc_views = [{} for _ in sizes]
        if self._ipc_terms is None or self._ipc_terms.numel() != 24 * len(sizes):
            self._ipc_terms = torch.empty(24 * len(sizes), dtype=torch.uint8, device=device)
            self._ipc_handles = None
        terms = self._ipc_terms.view(torch.int64).view(len(sizes), 3)

        def pack() -> list:
            bufs = [pack_bucket(b, tensors, device, out=kept[i] if kept else None,
                                views=self._ipc_views[i])
                    for i, b in enumerate(plan.buckets)]
            terms.copy_(bucket_terms(bufs))
            return bufs

        if kept is None:  # new buffers: nothing to replay
            self._pack_graph.reset()
            bufs = pack()
        else:  # the same launches on the same memory as last sync: one graph
            key = (plan.buckets, tuple(b.data_ptr() for b in kept), terms.data_ptr(),
                   tuple((s.data_ptr(), s.shape, s.stride(), s.dtype)
                         for b in plan.buckets for s in bucket_sources(b, tensors)),
                   bucket_terms)
            self._pack_graph.run(key, pack)
            bufs = kept
        if self._ipc_event is None:
            self._ipc_event = interprocess_event()
        self._ipc_event.record()
        queued = time.perf_counter() - t
        if self._ipc_handles is None or kept is None or not reuse:  # kept: same handles
            self._ipc_handles = IpcShare(
                buckets=tuple(share_bucket(i, b, reusable=reuse) for i, b in enumerate(bufs)),
                terms=share_bucket(-1, self._ipc_terms, reusable=reuse),
                event=self._ipc_event.ipc_handle()).model_dump_json()
        self.trainer_seconds = {"trainer_queue": queued,
                                "trainer_share": time.perf_counter() - t - queued}
        apply = "atomic" if self.cfg.apply == "staged" and len(actors) == 1 else self.cfg.apply
        t = time.perf_counter()
        refs = {n: a.receive.remote(plan_json, apply, self.cfg.deadlines.transfer,
                                    self._ipc_handles)
                for n, a in actors.items()}
        ok, bad = gather(refs, self.cfg.deadlines.transfer * 1.6)
        self.trainer_seconds["trainer_rpc"] = time.perf_counter() - t  # Ray call, as we saw it
        sums = fold_terms(sizes, terms.tolist())  # long done: the engines waited for it
        # staged IPC views point at our buffers: keep them alive until applied or dropped
        self._ipc_keepalive = bufs
        return sums, ok, bad

    def release_ipc_buffers(self, force: bool = False) -> None:
        """Hand this sync's IPC buckets back to the device once every engine applied (or
        dropped) them — before any engine wakes its KV cache into the same GPU. With
        ``ipc_reuse_buffers`` they are kept for the next sync unless ``force``."""
        if self._ipc_keepalive is None or (self.cfg.ipc_reuse_buffers and not force):
            return
        import torch

        self._ipc_keepalive = None
        self._ipc_handles = None
        self._ipc_terms = None
        self._pack_graph.reset()  # its launches address the buffers freed here
        torch.cuda.ipc_collect()  # blocks the engines released are freed only now
        torch.cuda.empty_cache()

    # ---- a sender outside this process -------------------------------------------------------
    def external(self, actors: dict[str, Any], plan: TransferPlan, plan_json: str,
                 sender: ExternalSender) -> Outcome:
        """Engines join the group an outside sender hosts; its checksums come back by call."""
        dl = self.cfg.deadlines
        world = 1 + len(actors)
        host, port = sender.address
        joins = {n: a.join_group.remote(self.cfg.backend, host, port, 1 + i, world,
                                        dl.rendezvous)
                 for i, (n, a) in enumerate(actors.items())}
        sender.ready(plan, world)
        _, bad = gather(joins, dl.rendezvous * 1.2)
        if bad:  # the sync fails whatever the sender says: do not wait for it
            return [], {}, bad
        recvs = {n: a.receive.remote(plan_json, self.cfg.apply, dl.transfer)
                 for n, a in actors.items()}
        ok, bad = gather(recvs, dl.transfer * 1.6)
        if bad:
            return [], ok, bad
        try:
            return sender.wait_checksums(dl.transfer), ok, bad
        except WeightSyncError as e:
            logger.error("external sender of version %d failed: %s", plan.version, e)
            return [], ok, {n: TransferError(f"sender failed: {e}", engine=n) for n in actors}
