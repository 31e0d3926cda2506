"""Transfer legs: how one plan's buckets get from the trainer into the engines' workers.

A leg is one module with two classes: a ``SenderLeg`` that runs on the trainer (given the
engines, a plan and a source of tensors, it moves the buckets and reports the sender's
checksums and every engine's ``ReceiveReport``) and a ``ReceiverLeg`` that runs inside each
engine worker (given the plan and the sender's ``ReceiveRequest``, it yields the buckets as they
arrive). The coordinator, the engine host and the worker know legs only by name, through this
registry; none of them branches on the kind of leg.

Adding a leg (say RDMA): write ``weightsync/transport/legs/rdma.py`` with its ``SenderLeg`` and
``ReceiverLeg`` subclasses and register it, by name and without importing it (the module is
imported on first use)::

    register_leg("rdma", "weightsync.transport.legs.rdma", "RdmaLeg", "RdmaReceiver")

``sync(..., leg="rdma")`` then uses it. The built-in legs are registered below; test legs are
registered by ``weightsync.testing.legs`` when a test imports it.

A worker resolves the receiver a request names. An engine process knows the built-in legs and
those registered by the modules its own spec names (``EngineSpec.leg_modules``, set by whoever
starts the engine, as a test fixture does for the test legs: imported once at engine start,
``import_leg_modules``); a request names a leg, never a module, so no request makes an engine
import anything.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from weightsync.errors import ConfigError

if TYPE_CHECKING:
    from weightsync.transport.legs.base import ReceiverLeg, SenderLeg


class LegEntry(NamedTuple):
    """Where a leg's two classes live, imported on first use."""

    module: str
    sender: str
    receiver: str


_LEGS: dict[str, LegEntry] = {}
_lock = threading.Lock()
_load_lock = threading.Lock()


def register_leg(name: str, module: str, sender_cls: str, receiver_cls: str) -> None:
    """Make leg ``name`` known: its ``SenderLeg`` class ``sender_cls`` and ``ReceiverLeg``
    class ``receiver_cls`` in ``module``, imported when the leg is first used. A name already
    registered is refused (``ValueError``): a leg is never replaced behind its users' backs."""
    if not name or not module or not sender_cls or not receiver_cls:
        raise ValueError("a leg needs a name, a module and both classes")
    with _lock:
        if name in _LEGS:
            raise ValueError(f"transfer leg {name!r} is already registered "
                             f"({_LEGS[name].module})")
        _LEGS[name] = LegEntry(module, sender_cls, receiver_cls)


def registered_legs() -> list[str]:
    """The names of every leg known in this process."""
    return sorted(_LEGS)


def _entry(name: str) -> LegEntry:
    entry = _LEGS.get(name)
    if entry is None:
        raise ConfigError(f"unknown transfer leg {name!r}; known: {registered_legs()}")
    return entry


def import_leg_modules(modules: Sequence[str]) -> list[str]:
    """Import ``modules`` (once each) so that their ``register_leg`` calls run in this
    process: an engine's workers, from the engine's own spec at start. Returns the legs known
    after."""
    with _load_lock:  # (not _lock: the modules' register_leg calls take that one)
        for module in modules:
            importlib.import_module(module)
    return registered_legs()


def _class(name: str, module: str, attr: str, base: type) -> type[Any]:
    cls = getattr(importlib.import_module(module), attr)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(f"transfer leg {name!r}: {module}.{attr} is not a {base.__name__}")
    return cls


def sender_leg(name: str) -> type[SenderLeg]:
    """The trainer-side class of leg ``name``."""
    from weightsync.transport.legs.base import SenderLeg

    entry = _entry(name)
    return _class(name, entry.module, entry.sender, SenderLeg)


def receiver_leg(name: str) -> type[ReceiverLeg]:
    """The worker-side class of leg ``name``: a built-in leg, one registered in this process,
    or one registered by the modules the engine's spec names (``import_leg_modules``)."""
    from weightsync.transport.legs.base import ReceiverLeg

    entry = _entry(name)
    return _class(name, entry.module, entry.receiver, ReceiverLeg)


register_leg("broadcast", "weightsync.transport.legs.broadcast", "BroadcastLeg",
             "GroupReceiver")
register_leg("ipc", "weightsync.transport.legs.ipc", "IpcLeg", "IpcReceiver")
register_leg("external", "weightsync.transport.legs.external", "ExternalLeg", "GroupReceiver")
