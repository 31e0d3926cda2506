"""One exception hierarchy for the whole library.

Every error carries the engine it concerns (when there is one) and a stable ``code`` so the
HTTP layer maps it exactly once (see ``weightsync.api.errors``) and callers can branch on type.
"""

from __future__ import annotations


class WeightSyncError(Exception):
    """Base class. ``code`` is stable and machine-readable; ``engine`` names the engine."""

    code = "weightsync_error"

    def __init__(self, message: str, *, engine: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.engine = engine

    def __str__(self) -> str:
        return f"[{self.engine}] {self.message}" if self.engine else self.message

    def __reduce__(self):  # keep type, message and engine across Ray's serialisation
        return (_rebuild, (type(self), self.message, self.engine))


def _rebuild(cls, message, engine):
    return cls(message, engine=engine)


class ConfigError(WeightSyncError):
    """Bad configuration or bad user input (HTTP 422)."""

    code = "config_error"


class ManifestError(ConfigError):
    """The weights offered do not fit the engine's model: unknown names, shapes or dtypes.

    Raised before any byte moves; the engine is untouched and keeps serving.
    """

    code = "manifest_error"


class EngineError(WeightSyncError):
    """The engine is unavailable or failed an operation (HTTP 503)."""

    code = "engine_error"


class EngineDeadError(EngineError):
    """The engine's actor or process is gone."""

    code = "engine_dead"


class UnsupportedError(EngineError):
    """The engine's platform cannot do this (e.g. sleep mode on CPU)."""

    code = "unsupported"


class IllegalStateError(WeightSyncError):
    """The operation is not allowed in the engine's current state (HTTP 409)."""

    code = "illegal_state"


class SyncInProgressError(IllegalStateError):
    """Another sync holds the fleet (HTTP 409)."""

    code = "sync_in_progress"


class StaleVersionError(IllegalStateError):
    """A version number not above the latest the engine holds (a coordinator behind another
    one, or a replayed step): refused, nothing changed."""

    code = "stale_version"


class FencedError(IllegalStateError):
    """The engine is fenced: it failed a sync and must be resynced before it serves again."""

    code = "fenced"


class TransferError(WeightSyncError):
    """Moving bytes failed: broken group, dead peer, checksum mismatch."""

    code = "transfer_error"


class PlanNotHeld(TransferError):
    """A receiver was sent a plan whose body was named by key (``plan_wire.PlanMessage``)
    that it does not hold: nothing was received; send the body's JSON."""

    code = "plan_not_held"


class PayloadNotHeld(TransferError):
    """A receiver was sent its leg's payload by key (``ReceiveRequest.payload_key``) that it
    does not hold: nothing was received; send the payload itself."""

    code = "payload_not_held"


class VerificationError(TransferError):
    """Bytes arrived but do not match what was sent, or engines disagree after loading."""

    code = "verification_error"


class ReloadError(EngineError):
    """vLLM's reload_weights failed; the engine's weights are undefined until resynced."""

    code = "reload_error"


class DeadlineExceeded(WeightSyncError):
    """A phase did not finish within its deadline (HTTP 504)."""

    code = "deadline_exceeded"


class EngineUnresponsive(DeadlineExceeded):
    """The engine did not answer a call within its deadline (stuck, or its host is gone)."""

    code = "engine_unresponsive"


class SyncFailedError(WeightSyncError):
    """A fleet sync failed. ``result`` holds the per-engine outcome (who failed, who is fenced)."""

    code = "sync_failed"

    def __init__(self, message: str, *, engine: str | None = None, result=None) -> None:
        super().__init__(message, engine=engine)
        self.result = result

    def __reduce__(self):  # (subclasses too: rebuilt as their own class)
        return (_rebuild_failed, (type(self), self.message, self.engine, self.result))


def _rebuild_failed(cls, message, engine, result):
    return cls(message, engine=engine, result=result)


class AdapterSyncFailedError(SyncFailedError):
    """A fleet-wide adapter sync failed; ``result`` is its ``AdapterFleetResult`` (which
    engines failed and why, on which it was undone, any fenced because they could not be asked)."""

    code = "adapter_sync_failed"


def error_class(code: str) -> type[WeightSyncError]:
    """The error class for a ``code`` (for errors that crossed a process boundary as data)."""
    todo, seen = [WeightSyncError], {}
    while todo:
        cls = todo.pop()
        if cls.__module__ == __name__:  # not Ray's dynamic RayTaskError(X) subclasses
            seen[cls.code] = cls
        todo.extend(cls.__subclasses__())
    return seen.get(code, WeightSyncError)
