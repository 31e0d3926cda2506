"""Transfer legs: how one plan's buckets get from the trainer into the engines' workers.

A leg is one module with two classes: a ``SenderLeg`` that runs on the trainer (given the
engines, a plan and a source of tensors, it moves the buckets and reports the sender's
checksums and every engine's ``ReceiveReport``) and a ``ReceiverLeg`` that runs inside each
engine worker (given the plan and the sender's ``ReceiveRequest``, it yields the buckets as they
arrive). The coordinator, the engine host and the worker know legs only by name, through this
registry; none of them branches on the kind of leg.

Adding a leg (say RDMA): write ``weightsync/transport/legs/rdma.py`` with its ``SenderLeg`` and
``ReceiverLeg`` subclasses, and add one line to ``LEGS`` below. ``sync(..., leg="rdma")``
then uses it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from weightsync.errors import ConfigError

if TYPE_CHECKING:
    from weightsync.transport.legs.base import ReceiverLeg, SenderLeg

# name -> (module, sender class, receiver class); imported on first use
LEGS: dict[str, tuple[str, str, str]] = {
    "broadcast": ("weightsync.transport.legs.broadcast", "BroadcastLeg", "GroupReceiver"),
    "ipc": ("weightsync.transport.legs.ipc", "IpcLeg", "IpcReceiver"),
    "external": ("weightsync.transport.legs.external", "ExternalLeg", "GroupReceiver"),
    "loopback": ("weightsync.testing.loopback", "LoopbackLeg", "LoopbackReceiver"),
    # TEST ONLY: the broadcast leg with one worker's copy of bucket 0 corrupted
    "corrupt-one-rank": ("weightsync.testing.faulty", "CorruptOneRankLeg",
                         "CorruptOneRankReceiver"),
}


def _load(name: str, which: int):
    try:
        module, *classes = LEGS[name]
    except KeyError:
        raise ConfigError(f"unknown transfer leg {name!r}; known: {sorted(LEGS)}") from None
    return getattr(importlib.import_module(module), classes[which])


def sender_leg(name: str) -> type[SenderLeg]:
    """The trainer-side class of leg ``name``."""
    return _load(name, 0)


def receiver_leg(name: str) -> type[ReceiverLeg]:
    """The worker-side class of leg ``name``."""
    return _load(name, 1)
