"""What every part of a coordinator reaches engines with."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from weightsync.config import Deadlines, TransferConfig
from weightsync.errors import ConfigError, ManifestError, WeightSyncError
from weightsync.remote import Engines

PhaseHook = Callable[[str, str | None], None]  # (phase, engine or None)


@dataclass(frozen=True)
class Reach:
    """The coordinator's signed engine calls, its transfer settings (deadlines) and how to
    say that a phase begins (the coordinator's ``on_phase``, which may change between
    syncs)."""

    engines: Engines
    transfer: TransferConfig
    phase: PhaseHook

    @property
    def deadlines(self) -> Deadlines:
        return self.transfer.deadlines


def raise_refusal(bad: dict[str, WeightSyncError]) -> None:
    """Raise the most specific error of a check that ran everywhere before anything changed."""
    if bad:
        specific = [e for e in bad.values() if isinstance(e, (ManifestError, ConfigError))]
        raise specific[0] if specific else next(iter(bad.values()))
