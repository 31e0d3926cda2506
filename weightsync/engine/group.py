"""The trainer's transfer group an engine's workers are in (broadcast legs).

It stays open across syncs (rebuilding NCCL communicators every sync is expensive) until a
failure or ``leave``. The workers join in a thread of their own and are asked every
``JOIN_POLL_S`` how far they got: a worker answers RPCs one at a time, and one held in the
rendezvous would make an abort wait for the whole deadline behind it. ``cancel`` ends a join in
progress at once (the workers' ``ws_leave_group`` cancels theirs).
"""

from __future__ import annotations

import time

from weightsync.engine.worker_calls import WorkerCalls
from weightsync.errors import DeadlineExceeded, TransferError
from weightsync.messages import Ack, JoinProgress, JoinReply

JOIN_POLL_S = 0.1  # how long one RPC of a join waits for the workers' rendezvous


class TransferGroup:
    """Invariant: ``group_id`` names a group only while every worker of the engine is in it
    (None during a join, after a failure and after ``leave``)."""

    def __init__(self, calls: WorkerCalls) -> None:
        self._calls = calls
        self.group_id: str | None = None  # the broadcast group this engine is in, if any
        self._join: object | None = None  # the join in progress; ``cancel`` ends it

    async def join(self, backend: str, host: str, port: int, rank_offset: int,
                   world_size: int, timeout_s: float, group_id: str = "") -> JoinReply:
        name = self._calls.name
        self.group_id = None
        token = self._join = object()
        end = time.monotonic() + timeout_s * 1.5
        out = await self._calls.rpc("ws_join_group", backend, host, port, rank_offset,
                                    world_size, timeout_s, JOIN_POLL_S, reply=JoinProgress,
                                    timeout=timeout_s * 1.5)
        while not all(p.joined for p in out):
            left = end - time.monotonic()
            if self._join is not token:
                raise TransferError("the join was cancelled (the sync was aborted)", engine=name)
            if left <= 0:
                await self._calls.rpc("ws_leave_group", reply=Ack, timeout=60)
                raise DeadlineExceeded(f"ws_join_group exceeded {timeout_s * 1.5}s", engine=name)
            out = await self._calls.rpc("ws_join_wait", min(JOIN_POLL_S, left),
                                        reply=JoinProgress, timeout=left + JOIN_POLL_S)
        if self._join is token:
            self._join = None
        joined = [r.rank for r in out]
        if joined != list(range(rank_offset, rank_offset + len(out))):
            raise TransferError(f"workers joined at ranks {joined}, not {len(out)} ranks from "
                                f"{rank_offset}", engine=name)
        self.group_id = group_id or None
        return JoinReply(rank=out[0].rank)

    def cancel(self) -> None:
        """A join in progress stops asking its workers (who leave when told to)."""
        self._join = None

    def failed(self) -> None:
        """A transfer in it failed: a worker leaves a group that failed it, and a failed sync
        never reuses its group."""
        self.group_id = None

    async def leave(self, deadline_s: float = 60.0) -> None:
        self.group_id = None
        await self._calls.rpc("ws_leave_group", reply=Ack, timeout=deadline_s)
