"""When an engine takes a fleet flip's LoRA adapter, and what the flip does to its state (#31).

A serving engine stages and commits an adapter while it serves (nothing pauses). One asleep
for the flip's coordinator (its ``sleep``, level 1: the weights in host memory) wakes its
weights for the stage, since vLLM's adapter slots live in their memory, and serves from the
commit on, as after a full sync into a sleeping engine. Anything else refuses before
anything changes: an engine paused, mid-sync or fenced, asleep for another coordinator, or
asleep at level 2 (its base weights discarded: an adapter needs them).

``AdapterGate`` is composed into ``weightsync.engine.host.EngineHost``, which keeps the Ray
methods; ``engine.adapters.Adapters`` keeps the versions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from weightsync.adapters import AdapterSyncReply, OverGroup
from weightsync.engine.adapters import Adapters
from weightsync.engine.dormancy import SleepState
from weightsync.engine.group import TransferGroup
from weightsync.engine.lease import SyncLease
from weightsync.engine.machine import EngineMachine
from weightsync.engine.worker_calls import WorkerCalls
from weightsync.errors import IllegalStateError, TransferError
from weightsync.transport.ipc import IpcBucketHandle
from weightsync.types import EngineState as S


class AdapterGate:
    def __init__(self, name: str, machine: EngineMachine, lease: SyncLease,
                 dormancy: SleepState, group: TransferGroup, calls: WorkerCalls,
                 adapters: Adapters) -> None:
        self.name = name
        self.machine, self.lease, self.dormancy = machine, lease, dormancy
        self.group, self.calls, self.adapters = group, calls, adapters

    def refusal(self, owner: str | None) -> str | None:
        """Why this engine would not stage an adapter from ``owner`` now (None: it would)."""
        state = self.machine.state
        if state == S.SERVING:
            return None
        if state not in (S.ASLEEP, S.WEIGHTS_AWAKE):
            return f"it is {state.value} (not serving, nor asleep for this coordinator)"
        if not self.lease.is_holder(owner):
            return f"it sleeps for {self.lease.owner or 'nobody'}, not {owner or 'anonymous'}"
        if not self.dormancy.weights_intact:
            return ("sleep level 2 discarded its base weights: sync the model first (an "
                    "adapter needs its base)")
        return None

    async def stage(self, manifest_json: str, buf: Any, version: int, deadline_s: float,
                    chain_chunk: int, ipc: str | None, owner: str | None) -> AdapterSyncReply:
        """``EngineHost.stage_adapter``: the bytes in ``buf``, over the transfer group
        (``buf`` None) or over CUDA IPC (``ipc``)."""
        why = self.refusal(owner)
        if why is not None:
            raise IllegalStateError(f"cannot stage an adapter: {why}", engine=self.name)
        if "weights" in self.dormancy.asleep:  # the adapter's slots live in their memory
            with self.lease.busy():
                await self.dormancy.wake(self.calls.engine, ["weights"], deadline_s)
            self.machine.state = S.WEIGHTS_AWAKE
        if buf is not None:
            return await self.adapters.stage(manifest_json, buf, version, deadline_s)
        if ipc is not None:
            return await self.adapters.stage(manifest_json, None, version, deadline_s,
                                             over_ipc=IpcBucketHandle.model_validate_json(ipc))
        if self.group.group_id is None:
            raise TransferError("an adapter over the transfer group: this engine is in none "
                                "(join_group first)", engine=self.name)
        over = OverGroup(deadline_s=deadline_s, chain_chunk=chain_chunk)
        try:
            return await self.adapters.stage(manifest_json, None, version, deadline_s * 1.2,
                                             over)
        except BaseException:
            await self.group.leave()  # every worker out: a broken group is never reused
            raise

    async def commit(self, name: str, version: int, deadline_s: float,
                     settle_s: float | None, owner: str | None,
                     peers: Sequence[str] = ()) -> AdapterSyncReply:
        """``EngineHost.commit_adapter``; an engine asleep for ``owner`` then wakes the rest
        and serves."""
        reply = await self.adapters.commit(name, version, deadline_s, settle_s, peers)
        if self.machine.state in (S.ASLEEP, S.WEIGHTS_AWAKE) and self.lease.is_holder(owner):
            with self.lease.busy():
                await self.dormancy.wake_and_resume(self.calls.engine, deadline_s)
            self.lease.release()
            self.machine.serve()
        return reply
