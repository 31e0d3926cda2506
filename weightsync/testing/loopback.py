"""The loopback leg: buckets handed from the trainer to engines in the same process.

A real leg like any other (one module, registered by ``weightsync.testing.legs``), for
engines that live in the trainer's process — the in-process fleet of ``weightsync.testing.fleet``
that drives the real coordinator in protocol tests. The sender packs and checksums every bucket
as the broadcast leg does; each receiver gets its own copy, so a fault injected into one engine's
copy (``Faults.corrupt_bucket``) reaches that engine only.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from weightsync.errors import TransferError
from weightsync.messages import BeginReply, ReceiveRequest
from weightsync.transport.digest_cuda import ManyDigests
from weightsync.transport.legs.base import Incoming, LegOutcome, ReceiverLeg, SenderLeg
from weightsync.transport.packing import (
    NotDirect,
    Spans,
    checksum,
    direct_pieces,
    fold_spans,
    named_tensors,
    pack_bucket,
    piece_dtypes,
    piece_views,
    span_views,
)
from weightsync.types import TransferPlan

_MAILBOX: dict[str, tuple] = {}  # one send's (buckets, checksums, direct terms), by token
_LOCK = threading.Lock()


class LoopbackLeg(SenderLeg):
    name = "loopback"
    receiver = "loopback"
    direct = False  # the last sync shared the trainer's tensors (as the IPC leg's direct mode)

    def send(self, names: Sequence[str], plan: TransferPlan, source: Any,
             begun: Mapping[str, BeginReply], *,
             one_phase: bool = False) -> LegOutcome:
        tensors = source if isinstance(source, Mapping) else dict(named_tensors(source))
        # as the IPC leg: a wave of one single-worker engine verifies and loads in its
        # receive call, and commits there too (one_phase)
        atomic = one_phase and self.cfg.apply == "staged" and self._one_worker(names)
        direct, terms = None, None
        if atomic and plan.format == "kernel" and self.cfg.ipc.direct:
            try:  # as the IPC leg: the engine copies from the trainer's own tensors
                direct = direct_pieces(plan, tensors, torch.device("cpu"))
            except NotDirect:
                direct = None
        if direct is not None:
            bufs = piece_views(*direct)  # each piece digested where it lies, and checked
            # for NaN or Inf by the same reads (as the IPC leg's sender)
            terms = ManyDigests(span_views(bufs), dtypes=piece_dtypes(plan, direct[1])).terms()
            sums = fold_spans(bufs, terms[:, :3].tolist())
        else:
            bufs, sums = [], []
            for bucket in plan.buckets:
                self.on_bucket(bucket.index)
                buf = pack_bucket(bucket, tensors, torch.device("cpu"))
                bufs.append(buf)
                sums.append(checksum(buf))
        self.direct = direct is not None
        token = uuid.uuid4().hex
        with _LOCK:
            _MAILBOX[token] = (bufs, sums, terms)
        try:
            ok, bad = self.receive_everywhere(
                names, plan, begun,
                self.request("atomic" if atomic else None, token,
                             plan.version if atomic else None))
        finally:
            with _LOCK:
                _MAILBOX.pop(token, None)
        return LegOutcome(sums, ok, bad)

    def _one_worker(self, names: Sequence[str]) -> bool:
        ok, _ = self.engines.each(names, self.engines.engine_workers, self.cfg.deadlines.verify)
        return len(names) == 1 and len(ok) == 1 and next(iter(ok.values())).workers == 1


class LoopbackReceiver(ReceiverLeg):
    def receive(self, plan: TransferPlan, request: ReceiveRequest) -> Incoming:
        with _LOCK:
            bufs, sums, terms = _MAILBOX.get(request.payload or "", (None, None, None))
        if bufs is None or len(bufs) != len(plan.buckets):
            raise TransferError("no loopback buckets for this receive")
        faults = getattr(self.worker, "faults", None)
        corrupt = getattr(faults, "corrupt_bucket", None)
        if getattr(faults, "corrupt_rank", None) not in (None, getattr(self.worker, "rank", 0)):
            corrupt = None  # another worker's copy is the corrupted one

        if bufs and isinstance(bufs[0], Spans):  # direct: the trainer's own memory, read
            # in place and checked as it is copied; the fault: the trainer writes a byte of
            # it after its checksum, during the sync
            if corrupt is not None and corrupt < len(bufs) and bufs[corrupt].views:
                with torch.no_grad():
                    bufs[corrupt].views[0][0] ^= 0xFF
            return Incoming(zip(plan.buckets, bufs, strict=True), expected_terms=terms[:, :3],
                            sender_nonfinite=terms[:, 3], checked_by_copy=True)

        def buckets():
            for bucket, buf in zip(plan.buckets, bufs, strict=True):
                own = buf.clone()
                if corrupt == bucket.index and own.numel():
                    own[0] ^= 0xFF  # a flipped byte on the way
                yield bucket, own

        # an atomic apply verifies every bucket before it loads: the sender's checksums
        # come with the buckets then (otherwise the coordinator compares them afterwards)
        return Incoming(buckets(), expected=sums if request.apply == "atomic" else None)
