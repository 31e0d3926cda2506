"""The CUDA IPC leg: colocated engines map the trainer's packed buckets (no copy, no group),
or, direct, the trainer's own tensors (no packing either).

Nothing on the trainer waits for the device: packing and the sender's checksum terms are
queued, an interprocess event is recorded after them, and the handles go out at once; each
worker's stream waits on the event, so the GPU work overlaps the calls. Every worker verifies
every bucket against the sender's checksums (one host sync for all of them) before anything is
applied. A wave of one engine applies in the same call (``apply="atomic"``): all-or-nothing
holds trivially, and a round trip is saved.

Tensor-parallel engines: the trainer packs a copy on every GPU the engines' workers use (keyed
by GPU UUID in one ``IpcShare``) and each worker opens only its own GPU's copy.

The leg reads its settings from ``TransferConfig.ipc`` (``config.IpcSettings``). With
``ipc.reuse_buffers`` the trainer keeps its buckets, checksum terms and packing views across
syncs, and replays packing + checksum as one CUDA graph; the worker keeps its mappings and
replays its checksum (``transport.graphs``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from weightsync.errors import TransferError
from weightsync.messages import BeginReply, ReceiveRequest
from weightsync.transport.digest_cuda import ManyDigests
from weightsync.transport.feed import HeldFeed
from weightsync.transport.graphs import Replay
from weightsync.transport.legs.base import (
    HeldPayload,
    Incoming,
    LegOutcome,
    ReceiverLeg,
    SenderLeg,
    payload_key,
)
from weightsync.transport.packing import (
    NotDirect,
    Piece,
    bucket_sources,
    digest_terms,
    direct_pieces,
    fold_spans,
    fold_terms,
    pack_bucket,
    piece_dtypes,
    piece_views,
    span_views,
)
from weightsync.types import TransferPlan


def bucket_terms(bufs: Sequence[Any], many: ManyDigests | None = None) -> Any:
    """The sender's checksum terms of its IPC buckets, on the device (``digest_terms``, or
    ``many``: the same as one launch; direct pieces: a fourth column, whether each holds NaN
    or Inf, ``ManyDigests``' ``dtypes``). ``IpcLeg`` takes another function in its place where
    a test falsifies what the engines are told (``weightsync.testing.faulty``)."""
    return many.terms() if many is not None else digest_terms(bufs)


TermsFn = Callable[..., Any]  # (bufs, many=None) -> the checksum terms, as bucket_terms
DIRECT_TERMS = 4  # int64 per direct piece shared with the engines: 3 terms, the finite flag


class _DeviceBuckets:
    """The trainer's packed buckets on one GPU, and what is kept with them across syncs
    (``ipc.reuse_buffers``): checksum terms, packing views, the packing graph, the event."""

    def __init__(self, index: int, checksum_terms: TermsFn = bucket_terms) -> None:
        self.index = index
        self.checksum_terms = checksum_terms  # fixed for its life: not part of graph keys
        self.keepalive: list[Any] | None = None  # this sync's CUDA-IPC buckets
        self.share: Any = None  # their IpcDeviceShare, as sent (reused with them)
        self.terms: Any = None  # the sender's checksum terms, shared with the engines
        self.event: Any = None  # interprocess CUDA event recorded after packing
        self.graph = Replay(f"IPC packing cuda:{index}")  # reused buffers: one launch a sync
        self.views: list[dict[str, Any]] = []  # packing's cached destination views per bucket
        # direct: (key, the pieces' Spans, checksum terms, share) of the trainer's own
        # storages, shared as they are (the views keep the storages alive)
        self.direct: tuple[Any, ...] | None = None
        self.direct_held: tuple[Any, ...] | None = None  # the HeldFeed it was derived from, if any

    def share_direct(self, plan: TransferPlan, source: Any, reuse: bool) -> str | None:
        """Share the trainer's own storages and where every slot lies in them (no packed
        copy), queue the checksum terms of every piece and record the event after them. The
        engine copies straight from the trainer's memory. ``reuse``: the engine keeps them
        mapped across syncs (else it lets them go after the load: a trainer that frees or
        offloads its weights between syncs gets the memory back). Returns why not (then
        nothing was queued)."""
        import torch

        from weightsync.transport.ipc import (
            IpcDeviceShare,
            device_uuid,
            interprocess_event,
            share_bucket,
        )

        if getattr(source, "transient", False):
            return "the source makes its tensors per bucket (nothing to map across syncs)"
        device = torch.device("cuda", self.index)
        # what the pieces depend on: the plan and where every part lies (a module updated in
        # place keeps its addresses, so this holds from one sync to the next); a feed that
        # says its tensors stay put (HeldFeed) is not asked again
        held = (plan.buckets, source.token, reuse) if isinstance(source, HeldFeed) else None
        if held is not None and self.direct is not None and self.direct_held == held:
            key = self.direct[0]
        else:
            srcs = [t for b in plan.buckets for t in bucket_sources(b, source)]
            key = (plan.buckets, tuple(t.data_ptr() for t in srcs),
                   tuple(t.dtype for t in srcs), reuse)
        if self.direct is None or self.direct[0] != key:
            try:
                storages, pieces = direct_pieces(plan, source, device)
            except NotDirect as e:
                self.forget_direct()
                return str(e)
            self.release()  # packed buckets of an earlier sync: their memory goes back
            self.forget_direct()
            views = piece_views(storages, pieces)
            flat = span_views(views)
            n = len(flat)
            with torch.cuda.device(device):
                # per piece its three checksum terms and whether it holds NaN or Inf
                terms = torch.empty(8 * DIRECT_TERMS * n, dtype=torch.uint8, device=device)
                if self.event is None:
                    self.event = interprocess_event()
                share = IpcDeviceShare(
                    device_uuid=device_uuid(device),
                    storages=tuple(share_bucket(i, st, reusable=reuse)
                                   for i, st in enumerate(storages)),
                    pieces=tuple(tuple(tuple((p.storage, p.offset, p.nbytes) for p in slot)
                                       for slot in bucket) for bucket in pieces),
                    terms=share_bucket(-1, terms, reusable=reuse), event=self.event.ipc_handle())
                # every piece's terms in one launch (a MoE's few dozen pieces as
                # digest_terms each: a dozen small launches apiece, even replayed), and
                # from the same loads the finite check the engine would read them again for
                many = ManyDigests(flat, dtypes=piece_dtypes(plan, pieces)) if flat else None
            self.direct = (key, views, terms, share, many)
        self.direct_held = held
        _, views, terms, share, many = self.direct
        flat = many.bufs if many is not None else []
        rows = terms.view(torch.int64).view(len(flat), DIRECT_TERMS)
        with torch.cuda.device(device):
            if flat:
                self.graph.run(("direct", key, terms.data_ptr()),
                               lambda: rows.copy_(self.checksum_terms(flat, many)))
            self.event.record()
        self.share = share
        return None

    def forget_direct(self) -> None:
        self.direct_held = None
        if self.direct is not None:
            self.direct = None
            self.share = None
            self.graph.reset()

    def pack(self, plan: TransferPlan, source: Any, reuse: bool) -> None:
        """Queue packing + checksum terms on this GPU and record the event after them."""
        import torch

        from weightsync.transport.ipc import (
            IpcDeviceShare,
            device_uuid,
            interprocess_event,
            share_bucket,
        )

        self.forget_direct()
        sizes = [b.nbytes for b in plan.buckets]
        kept = self.keepalive if reuse and self.keepalive is not None and \
            [b.numel() for b in self.keepalive] == sizes else None
        if kept is None:
            self.release()  # left over, or the plan's shape changed
        device = torch.device("cuda", self.index)
        with torch.cuda.device(device):
            if kept is None or len(self.views) != len(sizes):
                self.views = [{} for _ in sizes]
            if self.terms is None or self.terms.numel() != 24 * len(sizes):
                self.terms = torch.empty(24 * len(sizes), dtype=torch.uint8, device=device)
                self.share = None
            terms = self.terms.view(torch.int64).view(len(sizes), 3)

            def pack() -> list[Any]:
                bufs = [pack_bucket(b, source, device, out=kept[i] if kept else None,
                                    views=self.views[i])
                        for i, b in enumerate(plan.buckets)]
                terms.copy_(self.checksum_terms(bufs))
                return bufs

            if kept is None or getattr(source, "transient", False):  # new buffers, or sources
                # made per bucket (weightsync.sources.BucketFeed), gone by replay: no graph
                self.graph.reset()
                bufs = pack()
            else:  # the same launches on the same memory as last sync: one graph
                key = (plan.buckets, tuple(b.data_ptr() for b in kept), terms.data_ptr(),
                       tuple((s.data_ptr(), s.shape, s.stride(), s.dtype)
                             for b in plan.buckets for s in bucket_sources(b, source)))
                self.graph.run(key, pack)
                bufs = kept
            if self.event is None:
                self.event = interprocess_event()
            self.event.record()
            if self.share is None or kept is None or not reuse:  # kept: same handles
                self.share = IpcDeviceShare(
                    device_uuid=device_uuid(device),
                    buckets=tuple(share_bucket(i, b, reusable=reuse)
                                  for i, b in enumerate(bufs)),
                    terms=share_bucket(-1, self.terms, reusable=reuse),
                    event=self.event.ipc_handle())
        self.keepalive = bufs  # staged views point at our buffers: keep them until applied

    def sums(self) -> list[int]:
        """The sender's per-bucket checksums (long done: the engines waited for them)."""
        import torch

        if self.direct is not None:  # (packing forgets it)
            _, views, terms, _, _ = self.direct
            rows = terms.view(torch.int64).view(-1, DIRECT_TERMS)[:, :3]
            return fold_spans(views, rows.tolist())
        sizes = [b.numel() for b in self.keepalive or ()]
        return fold_terms(sizes, self.terms.view(torch.int64).view(len(sizes), 3).tolist())

    def release(self) -> None:
        """Let the packed buckets go (direct shares hold no memory of their own)."""
        if self.keepalive is None:
            return
        import torch

        self.keepalive = None
        self.share = None
        self.terms = None
        self.graph.reset()  # its launches address the buffers freed here
        with torch.cuda.device(self.index):
            torch.cuda.ipc_collect()  # type: ignore[no-untyped-call]  # blocks the engines released are freed only now
            torch.cuda.empty_cache()


class IpcLeg(SenderLeg):
    """Packs a copy of the buckets on every GPU the engines' workers use (a tensor-parallel
    engine's workers each sit on a GPU of their own), each visible to this process; every
    worker maps the copy on its own GPU. A worker on a GPU this process cannot see fails the
    sync before anything is packed (``TransferError``: not colocated).

    Direct (``ipc.direct``): one single-worker engine, kernel layout, every tensor on its GPU
    in the dtype it serves — nothing is packed; the trainer shares its own storages and the
    engine copies each slot from them (``direct_note`` says why a sync packed instead).

    ``checksum_terms``: how the sender's checksum terms are computed (``bucket_terms``; a
    test leg passes one that lies)."""

    name = "ipc"
    receiver = "ipc"

    def __init__(self, *args: Any, checksum_terms: TermsFn = bucket_terms,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._checksum_terms = checksum_terms
        self._devices: dict[int, _DeviceBuckets] = {}  # local GPU index -> its buckets
        self._placement: tuple[tuple[str, ...], tuple[int, ...]] | None = None
        self._workers: dict[str, int] = {}  # engine -> its worker count, with the placement
        # (the shares, their JSON as sent, its payload_key)
        self._handles: tuple[tuple[Any, ...], str, str] | None = None
        self._held_by: dict[str, str] = {}  # engine -> the key of the share it holds
        self.direct_note: str | None = None  # why the last sync packed (None: it did not)

    def send(self, names: Sequence[str], plan: TransferPlan, source: Any,
             begun: Mapping[str, BeginReply], *,
             one_phase: bool = False) -> LegOutcome:
        from weightsync.transport.ipc import IpcShare

        gpus, bad = self._gpus_for(names)
        if bad:
            return LegOutcome([], {}, bad)
        for stale in set(self._devices) - set(gpus):
            self._devices.pop(stale).release()
        # one single-worker engine: verify and load in one call. Not for a tensor-parallel
        # engine: a worker whose copy failed its check while another loaded would leave the
        # engine half-applied; staged, every worker is verified before any loads
        apply = "atomic" if self.cfg.apply == "staged" and len(names) == 1 and \
            self._workers.get(names[0]) == 1 else self.cfg.apply
        t = time.perf_counter()
        self.direct_note = self._why_packed(plan, apply, gpus)
        for i in gpus:
            device = self._devices.setdefault(i, _DeviceBuckets(i, self._checksum_terms))
            if self.direct_note is None:
                self.direct_note = device.share_direct(plan, source,
                                                       self.cfg.ipc.reuse_buffers)
            if self.direct_note is not None:
                device.pack(plan, source, self.cfg.ipc.reuse_buffers)
        queued = time.perf_counter() - t
        shares = tuple(self._devices[i].share for i in gpus)
        kept = self._handles is not None and len(self._handles[0]) == len(shares) and \
            all(a is b for a, b in zip(self._handles[0], shares))
        if not kept or self._handles is None:  # kept shares (held here, so never a new
            text = IpcShare(devices=shares).model_dump_json()  # object at an old address)
            self._handles = (shares, text, payload_key(text))
        _, handles, key = self._handles
        seconds = {"trainer_queue": queued, "trainer_share": time.perf_counter() - t - queued}
        # and commit in that call too when the coordinator allows it (one_phase) and nothing
        # here waits to be freed after the load: the engine's KV cache wakes in that call
        commit = plan.version if one_phase and apply == "atomic" and \
            (self.cfg.ipc.reuse_buffers or self.direct_note is None) else None
        t = time.perf_counter()
        ok, bad = self.receive_held(names, plan, begun, self.request(apply, handles, commit),
                                    self._held_by, key=key, same_machine=True)  # kept: by key
        seconds["trainer_rpc"] = time.perf_counter() - t  # the call, channel or Ray
        return LegOutcome(self._devices[gpus[0]].sums(), ok, bad, seconds)

    def _why_packed(self, plan: TransferPlan, apply: str, gpus: list[int]) -> str | None:
        """Why this sync packs its buckets instead of sharing the trainer's storages (None:
        it may share them, if the tensors allow: ``_DeviceBuckets.share_direct``)."""
        if not self.cfg.ipc.direct:
            return "ipc.direct is off"
        if plan.format != "kernel":
            return "checkpoint format (vLLM's loaders take whole tensors)"
        if apply != "atomic" or len(gpus) != 1:
            return "more than one engine or worker: buckets are staged on every one"
        return None

    def _gpus_for(self, names: Sequence[str]) -> tuple[list[int], dict[str, Any]]:
        """Local indices of the GPUs the engines' workers use (this process's current GPU
        first when a worker uses it: the first GPU's checksums are the ones reported), asked
        once per set of engines."""
        import torch

        from weightsync.transport.ipc import device_uuid

        if self._placement is not None and self._placement[0] == tuple(names):
            return list(self._placement[1]), {}
        ok, bad = self.engines.each(names, self.engines.engine_workers, self.cfg.deadlines.verify)
        if bad:
            return [], bad
        self._workers = {n: ok[n].workers for n in names}
        local = {device_uuid(i): i for i in range(torch.cuda.device_count())}
        current = torch.cuda.current_device()
        gpus: list[int] = []
        for n in names:
            for rank, uuid in enumerate(ok[n].device_uuids):
                if uuid is None:
                    continue
                if uuid not in local:
                    bad[n] = TransferError(
                        f"worker rank {rank} is on GPU {uuid}, which the trainer cannot see: "
                        "CUDA IPC needs the trainer colocated with every worker", engine=n)
                elif local[uuid] not in gpus:
                    gpus.append(local[uuid])
        # no worker named its GPU (a stand-in): the current one, as a one-GPU trainer would
        gpus = sorted(gpus, key=lambda i: i != current) or [current]
        if not bad:
            self._placement = (tuple(names), tuple(gpus))
        return gpus, bad

    def loaded(self) -> None:
        """Hand this sync's buckets back to the devices once every engine applied (or dropped)
        them — before any engine wakes its KV cache into the same GPU. With
        ``ipc.reuse_buffers`` they are kept for the next sync."""
        if not self.cfg.ipc.reuse_buffers:
            for d in self._devices.values():
                d.release()

    def close(self) -> None:
        for d in self._devices.values():  # the handles were shared with engines that may
            d.release()  # be gone
            d.forget_direct()
        self._devices.clear()
        self._placement = None
        self._workers = {}
        self._handles = None
        self._held_by.clear()


class IpcReceiver(ReceiverLeg):
    """Worker side: maps the shared buckets (kept mapped while the trainer reuses them) or,
    direct, the trainer's own storages, waits on the sender's event, and checksums every
    bucket before the worker applies anything (direct: every piece as the worker copies it,
    ``Incoming.checked_by_copy``)."""

    def __init__(self, worker: Any) -> None:
        super().__init__(worker)
        self._mapped: dict[tuple[Any, ...], Any] = {}
        self._events: dict[str, Any] = {}
        self._spans: tuple[Any, ...] | None = None  # direct: (what they depend on, Spans, their views)
        self._digests: tuple[Any, ...] | None = None  # (the buffers' addresses, their ManyDigests)
        # the sender's share, parsed once while it keeps it (then it names it by key)
        self._share = HeldPayload(self._parse)
        self._opened: tuple[Any, ...] | None = None  # (a kept share, its mapped buffers)

    def _parse(self, payload: str) -> Any:
        from weightsync.transport.ipc import IpcShare, device_uuid

        # this worker's GPU: the copy it opens
        return IpcShare.model_validate_json(payload).on(device_uuid(self.worker.device))

    def receive(self, plan: TransferPlan, request: ReceiveRequest) -> Incoming:
        import torch

        from weightsync.transport.ipc import open_event

        t0 = time.perf_counter()
        share = self._share.get(request)  # (or PayloadNotHeld: nothing was touched)
        if share.buckets and [h.index for h in share.buckets] != [b.index for b in plan.buckets]:
            raise TransferError("IPC handles do not match the plan's buckets")
        if share.storages:
            if len(share.pieces) != len(plan.buckets) or any(
                    len(b) != len(bucket.slots) for b, bucket in zip(share.pieces, plan.buckets)):
                raise TransferError("the shared pieces do not match the plan's buckets")
            if share.terms.nbytes != 8 * DIRECT_TERMS * sum(len(s) for b in share.pieces
                                                            for s in b):
                raise TransferError("the sender's checksum terms do not match its pieces")
        elif share.terms.nbytes != 24 * len(plan.buckets):
            raise TransferError("the sender's checksum terms do not match the plan's buckets")
        handles = (*(share.storages or share.buckets), share.terms)
        reused = all(h.reusable for h in handles)  # the trainer keeps these buffers
        if self._opened is not None and self._opened[0] is share:  # kept, and mapped
            mapped = self._opened[1]
        else:
            mapped = self._open(handles)
            self._opened = (share, mapped) if reused else None
        if share.storages:  # direct: slots are pieces of the trainer's own storages
            key = (share.pieces, tuple(id(m) for m in mapped[:-1]))
            if self._spans is None or self._spans[0] != key:
                spans = piece_views(mapped[:-1], [[[Piece(*p) for p in slot] for slot in b]
                                                  for b in share.pieces])
                self._spans = (key, spans, span_views(spans))
            _, spans, bufs = self._spans
            if not reused:  # they hold mappings that go with this sync
                self._spans = None
        else:
            self._spans = None
            bufs = spans = mapped[:-1]
        sender_terms = mapped[-1].view(torch.int64).view(
            -1, DIRECT_TERMS if share.storages else 3)
        if sender_terms.shape[0] != len(bufs):
            raise TransferError("the sender's checksum terms do not match what it shared")
        if share.event not in self._events:
            self._events.clear()
            self._events[share.event] = open_event(share.event, bufs[0].device.index)
        torch.cuda.current_stream().wait_event(self._events[share.event])
        opened = time.perf_counter() - t0
        if share.storages:  # direct: checked as the engine copies it (Incoming)
            return Incoming(zip(plan.buckets, spans, strict=True),
                            expected_terms=sender_terms[:, :3],
                            sender_nonfinite=sender_terms[:, 3], seconds={"ipc_open": opened},
                            cache_key="ipc" if reused else None, checked_by_copy=True)
        t0 = time.perf_counter()
        where = tuple((b.data_ptr(), b.numel()) for b in bufs)
        if self._digests is None or self._digests[0] != where:  # every buffer: one launch
            self._digests = (where, ManyDigests(bufs))
        many = self._digests[1]
        if reused:  # the same buffers every sync: one graph
            own = self.worker._ws_graph("IPC checksum").run((where, many), many.terms)
        else:
            own = many.terms()
            self._digests = None  # (its buffers go with this sync)
        rows = torch.cat([own, sender_terms]).tolist()  # the one host sync
        n = len(bufs)
        lengths = [b.numel() for b in bufs]
        expected, known = fold_terms(lengths, rows[n:]), fold_terms(lengths, rows[:n])
        return Incoming(zip(plan.buckets, spans, strict=True), expected=expected, known=known,
                        seconds={"ipc_open": opened, "checksum": time.perf_counter() - t0},
                        cache_key="ipc" if reused else None)

    def _open(self, handles: Any) -> list[Any]:
        """Map every handle (those the trainer reuses: once, kept mapped) and unmap the kept
        mappings it no longer shares."""
        from weightsync.transport.ipc import open_bucket

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
        return mapped
