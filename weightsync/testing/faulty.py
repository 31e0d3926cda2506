"""TEST ONLY: legs that lie, on real engines (registered by ``weightsync.testing.legs``).

``corrupt-one-rank``: a broadcast leg that corrupts one worker's copy of one bucket. The
sender is the broadcast leg's, over a real gloo group with every worker of every engine; the
receiver is the group receiver, which flips one byte of bucket 0 after it arrived on the one
group rank the request names (the last worker of the first engine), before the worker
checksums it. The other workers, and every other engine, receive intact bytes: what a worker
with bad memory or a broken receive path looks like from the outside.

``ipc-false-checksums``: the IPC leg telling the engines checksum terms that differ from the
bytes it shared (its checksum function, passed at construction, flips a bit of every term);
the engines' receiver is the IPC leg's own.
"""

from __future__ import annotations

import json
from typing import Any

from weightsync.messages import ReceiveRequest
from weightsync.transport.legs.base import Incoming
from weightsync.transport.legs.broadcast import BroadcastLeg, GroupReceiver
from weightsync.transport.legs.ipc import IpcLeg, IpcReceiver, bucket_terms
from weightsync.types import TransferPlan

__all__ = ["CorruptOneRankLeg", "CorruptOneRankReceiver", "FalseChecksumsIpcLeg", "IpcReceiver"]


class CorruptOneRankLeg(BroadcastLeg):
    name = "corrupt-one-rank"
    receiver = "corrupt-one-rank"

    def request(self, apply: Any = None, payload: str | None = None) -> ReceiveRequest:
        first = self.ranks.offsets[0][0] if self.ranks is not None else None
        target = self.ranks.ranks(first)[-1] if first is not None else -1
        return super().request(apply, json.dumps({"rank": target, "bucket": 0}))


class CorruptOneRankReceiver(GroupReceiver):
    def receive(self, plan: TransferPlan, request: ReceiveRequest) -> Incoming:
        incoming = super().receive(plan, request)
        target = json.loads(request.payload or "{}")
        group = self.worker._ws_group()
        if group is None or group.group.rank != target.get("rank"):
            return incoming

        arriving = incoming.buckets

        def buckets():
            for bucket, buf in arriving:
                if bucket.index == target.get("bucket") and buf.numel():
                    buf[0] ^= 0xFF  # arrived intact; corrupted here, on this worker only
                yield bucket, buf

        incoming.buckets = buckets()
        return incoming


def _false_terms(bufs: Any, many: Any = None) -> Any:
    terms = bucket_terms(bufs, many).clone()
    terms[:, :3] ^= 1  # what the engines are told: not what was shared (flags left true)
    return terms


class FalseChecksumsIpcLeg(IpcLeg):
    name = "ipc-false-checksums"
    receiver = "ipc"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, checksum_terms=_false_terms, **kwargs)
