"""The CUDA IPC leg: colocated engines map the trainer's packed buckets (no copy, no group).

Nothing on the trainer waits for the device: packing and the sender's checksum terms are
queued, an interprocess event is recorded after them, and the handles go out at once; each
worker's stream waits on the event, so the GPU work overlaps the calls. Every worker verifies
every bucket against the sender's checksums (one host sync for all of them) before anything is
applied. A wave of one engine applies in the same call (``apply="atomic"``): all-or-nothing
holds trivially, and a round trip is saved.

With ``ipc_reuse_buffers`` the trainer keeps its buckets, checksum terms and packing views
across syncs, and replays packing + checksum as one CUDA graph; the worker keeps its mappings
and replays its checksum (``transport.graphs``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from weightsync.errors import TransferError
from weightsync.messages import BeginReply, ReceiveRequest
from weightsync.transport.graphs import Replay
from weightsync.transport.legs.base import Incoming, LegOutcome, ReceiverLeg, SenderLeg
from weightsync.transport.packing import bucket_sources, digest_terms, fold_terms, pack_bucket
from weightsync.types import TransferPlan


def bucket_terms(bufs):
    """The sender's checksum terms of its IPC buckets, on the device (``digest_terms``; a
    function of its own so a test can falsify what the engines are told)."""
    return digest_terms(bufs)


class IpcLeg(SenderLeg):
    name = "ipc"
    receiver = "ipc"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._keepalive: list[Any] | None = None  # this sync's CUDA-IPC buckets
        self._handles: str | None = None  # their IpcShare, as sent (reused with them)
        self._terms: Any = None  # the sender's checksum terms, shared with the engines
        self._event: Any = None  # interprocess CUDA event recorded after packing
        self._pack_graph = Replay("IPC packing")  # with reused buffers: one launch per sync
        self._views: list[dict] = []  # packing's cached destination views per bucket

    def send(self, names: Sequence[str], plan: TransferPlan, source: Any,
             begun: Mapping[str, BeginReply]) -> LegOutcome:
        import torch

        from weightsync.transport.ipc import IpcShare, interprocess_event, share_bucket

        reuse = self.cfg.ipc_reuse_buffers
        sizes = [b.nbytes for b in plan.buckets]
        kept = self._keepalive if reuse and self._keepalive is not None and \
            [b.numel() for b in self._keepalive] == sizes else None
        if kept is None:
            self._release()  # left over, or the plan's shape changed
        t = time.perf_counter()
        device = torch.device("cuda", torch.cuda.current_device())
        if kept is None or len(self._views) != len(sizes):
            self._views = [{} for _ in sizes]
        if self._terms is None or self._terms.numel() != 24 * len(sizes):
            self._terms = torch.empty(24 * len(sizes), dtype=torch.uint8, device=device)
            self._handles = None
        terms = self._terms.view(torch.int64).view(len(sizes), 3)

        def pack() -> list:
            bufs = [pack_bucket(b, source, device, out=kept[i] if kept else None,
                                views=self._views[i])
                    for i, b in enumerate(plan.buckets)]
            terms.copy_(bucket_terms(bufs))
            return bufs

        if kept is None or getattr(source, "transient", False):  # new buffers, or sources
            # made per bucket (weightsync.sources.BucketFeed) that are gone by replay: no graph
            self._pack_graph.reset()
            bufs = pack()
        else:  # the same launches on the same memory as last sync: one graph
            key = (plan.buckets, tuple(b.data_ptr() for b in kept), terms.data_ptr(),
                   tuple((s.data_ptr(), s.shape, s.stride(), s.dtype)
                         for b in plan.buckets for s in bucket_sources(b, source)),
                   bucket_terms)
            self._pack_graph.run(key, pack)
            bufs = kept
        if self._event is None:
            self._event = interprocess_event()
        self._event.record()
        queued = time.perf_counter() - t
        if self._handles is None or kept is None or not reuse:  # kept: same handles
            self._handles = IpcShare(
                buckets=tuple(share_bucket(i, b, reusable=reuse) for i, b in enumerate(bufs)),
                terms=share_bucket(-1, self._terms, reusable=reuse),
                event=self._event.ipc_handle()).model_dump_json()
        seconds = {"trainer_queue": queued, "trainer_share": time.perf_counter() - t - queued}
        apply = "atomic" if self.cfg.apply == "staged" and len(names) == 1 else self.cfg.apply
        t = time.perf_counter()
        ok, bad = self.receive_everywhere(names, plan.model_dump_json(),
                                          self.request(apply, self._handles))
        seconds["trainer_rpc"] = time.perf_counter() - t  # Ray call, as we saw it
        sums = fold_terms(sizes, terms.tolist())  # long done: the engines waited for it
        self._keepalive = bufs  # staged views point at our buffers: keep them until applied
        return LegOutcome(sums, ok, bad, seconds)

    def loaded(self) -> None:
        """Hand this sync's buckets back to the device once every engine applied (or dropped)
        them — before any engine wakes its KV cache into the same GPU. With
        ``ipc_reuse_buffers`` they are kept for the next sync."""
        if not self.cfg.ipc_reuse_buffers:
            self._release()

    def close(self) -> None:
        self._release()  # the handles were shared with engines that may be gone

    def _release(self) -> None:
        if self._keepalive is None:
            return
        import torch

        self._keepalive = None
        self._handles = None
        self._terms = None
        self._pack_graph.reset()  # its launches address the buffers freed here
        torch.cuda.ipc_collect()  # blocks the engines released are freed only now
        torch.cuda.empty_cache()


class IpcReceiver(ReceiverLeg):
    """Worker side: maps the shared buckets (kept mapped while the trainer reuses them), waits
    on the sender's event, and checksums every bucket before the worker applies anything."""

    def __init__(self, worker: Any) -> None:
        super().__init__(worker)
        self._mapped: dict[tuple, Any] = {}
        self._events: dict[str, Any] = {}

    def receive(self, plan: TransferPlan, request: ReceiveRequest) -> Incoming:
        import torch

        from weightsync.transport.ipc import IpcShare, open_bucket, open_event

        if request.payload is None:
            raise TransferError("an IPC receive needs the sender's IpcShare")
        share = IpcShare.model_validate_json(request.payload)
        if [h.index for h in share.buckets] != [b.index for b in plan.buckets]:
            raise TransferError("IPC handles do not match the plan's buckets")
        if share.terms.nbytes != 24 * len(plan.buckets):
            raise TransferError("the sender's checksum terms do not match the plan's buckets")
        t0 = time.perf_counter()
        handles = (*share.buckets, share.terms)
        reused = all(h.reusable for h in handles)  # the trainer keeps these buffers
        mapped = []
        for h in handles:
            hk = (h.handle, h.storage_offset, h.nbytes)
            buf = self._mapped.get(hk) if h.reusable else None
            if buf is None:
                buf = open_bucket(h)
                if h.reusable:  # the trainer reuses this allocation: keep it mapped
                    self._mapped[hk] = buf
            mapped.append(buf)
        keys = {(h.handle, h.storage_offset, h.nbytes) for h in handles if h.reusable}
        stale = [k for k in self._mapped if k not in keys]  # the trainer replaced those:
        for k in stale:  # unmap them, or their memory stays held on the trainer's GPU
            del self._mapped[k]
        if stale or not keys:
            self.worker._ws_forget_copy_plan()
        bufs, sender_terms = mapped[:-1], mapped[-1].view(torch.int64).view(-1, 3)
        if share.event not in self._events:
            self._events.clear()
            self._events[share.event] = open_event(share.event, bufs[0].device.index)
        torch.cuda.current_stream().wait_event(self._events[share.event])
        opened = time.perf_counter() - t0
        t0 = time.perf_counter()
        if reused:  # the same buffers every sync: one graph
            own = self.worker._ws_graph("IPC checksum").run(
                (tuple((b.data_ptr(), b.numel()) for b in bufs), digest_terms),
                lambda: digest_terms(bufs))
        else:
            own = digest_terms(bufs)
        rows = torch.cat([own, sender_terms]).tolist()  # the one host sync
        lengths = [b.numel() for b in bufs]
        return Incoming(zip(plan.buckets, bufs, strict=True),
                        expected=fold_terms(lengths, rows[len(bufs):]),
                        known=fold_terms(lengths, rows[: len(bufs)]),
                        seconds={"ipc_open": opened, "checksum": time.perf_counter() - t0},
                        cache_key="ipc" if reused else None)
