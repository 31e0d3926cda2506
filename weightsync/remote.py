"""Calls to engine actors with deadlines and typed errors.

Ray wraps remote exceptions and has its own timeout type; this module turns both into the
library's error hierarchy, and waits for many calls at once without ever hanging.
"""

from __future__ import annotations

import time
from typing import Any

import ray

from weightsync.errors import EngineDeadError, EngineError, EngineUnresponsive, WeightSyncError


def unwrap(e: BaseException) -> WeightSyncError:
    """Surface our typed error from a Ray-wrapped one (or a typed stand-in)."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, WeightSyncError):
        return cause
    if isinstance(e, WeightSyncError):
        return e
    if isinstance(e, ray.exceptions.RayActorError):
        return EngineDeadError(f"engine actor died or unreachable: {type(e).__name__}")
    text = str(cause or e)
    return EngineError(f"{type(e).__name__}: {text.splitlines()[-1] if text else ''}")


def gather(refs: dict[str, Any], timeout: float) -> tuple[dict[str, Any], dict[str, WeightSyncError]]:
    """Wait for one ref per engine; returns (results, errors) — never raises, never hangs.

    An engine that does not answer in time gets ``EngineUnresponsive``; one whose actor died,
    ``EngineDeadError``; one that answered with an error keeps that error's type.
    """
    ok: dict[str, Any] = {}
    bad: dict[str, WeightSyncError] = {}
    end = time.monotonic() + timeout
    for name, ref in refs.items():
        try:
            ok[name] = ray.get(ref, timeout=max(0.0, end - time.monotonic()))
        except ray.exceptions.GetTimeoutError:
            bad[name] = EngineUnresponsive(f"no answer within {timeout:.1f}s", engine=name)
        except Exception as e:  # noqa: BLE001 - classified by unwrap
            err = unwrap(e)
            err.engine = err.engine or name
            bad[name] = err
    return ok, bad
