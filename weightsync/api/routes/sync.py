"""Fleet-wide weight changes: reload from a checkpoint, and sync sessions for outside trainers.

A reload that cannot start (the fleet is busy) is a 409 before it takes a thread or asks an
engine anything. Each change refreshes the engines' statuses before it answers (``Fleet.
statuses``), so ``/status`` shows it to the client at once; the coordinator's blocking calls
run in the fleet's own thread (``Fleet.run``), never on the event loop.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request

from weightsync.api.deps import get_fleet, get_sessions, get_settings, require_token
from weightsync.api.errors import ClientGoneError
from weightsync.api.fleet import SYNCABLE, Fleet
from weightsync.api.routes.common import WRITE_ERRORS
from weightsync.api.schemas import (
    AbortRequest,
    CommitRequest,
    ReloadRequest,
    SessionClosed,
    SessionInfo,
    SessionRequest,
)
from weightsync.api.sessions import SessionRegistry
from weightsync.config import Settings
from weightsync.errors import SyncFailedError, WeightSyncError
from weightsync.types import SyncResult

logger = logging.getLogger(__name__)

SessionPath = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[a-f0-9]+$",
                                  description="The id POST /sessions returned")]

router = APIRouter(tags=["sync"], dependencies=[Depends(require_token)], responses=WRITE_ERRORS)


@router.post("/reload", response_model=SyncResult)
async def reload(request: Request, req: ReloadRequest | None = None,
                 fleet: Fleet = Depends(get_fleet),
                 settings: Settings = Depends(get_settings)) -> SyncResult:
    """Reload weights from a safetensors directory on the engine hosts (or the original model),
    reset caches, verify fingerprints agree, and publish a new version.

    Checked before any engine is touched: every target must be serving or fenced (else 409);
    every engine resolves the directory's files one by one inside the load roots and checks
    their headers against the model it started with — a checkpoint that does not fit, or that
    lacks any of the model's tensors without ``partial``, is a 422 and the fleet keeps serving.
    """
    req = req or ReloadRequest()
    targets = fleet.resolve(req.engines)
    coord = fleet.coordinator
    roots = settings.load_roots
    with fleet.exclusive():
        await fleet.require_states(targets, SYNCABLE, "reload")
        if await request.is_disconnected():  # nobody would learn the outcome: change nothing
            raise ClientGoneError("the client went away before the reload began; "
                                  "nothing was changed")
        try:
            result = await fleet.run(coord.reload_checkpoint, req.path,
                                     pause_mode=req.pause_mode, engines=targets,
                                     partial=req.partial, roots=roots)
        except SyncFailedError as e:
            if e.result is not None:
                fleet.record(e.result)
            raise
        finally:  # refused, failed or done: what the engines are now, for every reader
            await fleet.statuses(targets)
    fleet.record(result)
    logger.info("reloaded %s from %s%s: version %d", targets, req.path or "the original model",
                " (partial)" if req.partial else "", result.version)
    return result


SESSION_LINKS = {  # OpenAPI links: what a client (or schemathesis) does with a new session
    "CommitSession": {"operationId": "commit_session",
                      "parameters": {"session": "$response.body#/session"}},
    "AbortSession": {"operationId": "abort_session",
                     "parameters": {"session": "$response.body#/session"}},
}


@router.post("/sessions", response_model=SessionInfo, status_code=201,
             operation_id="open_session",
             responses={201: {"description": "The session is open: the engines are paused and "
                                             "dialling the trainer", "links": SESSION_LINKS}})
async def open_session(req: SessionRequest, fleet: Fleet = Depends(get_fleet),
                       sessions: SessionRegistry = Depends(get_sessions)) -> SessionInfo:
    """Open a sync for a trainer outside the Ray cluster.

    The engines are validated against ``tensors``, paused, and dialling ``host:port`` when this
    returns; the trainer then hosts the group as rank 0 (``world_size`` ranks), broadcasts
    ``plan`` bucket by bucket, and commits its checksums. ``WeightSyncClient.push_weights`` is
    that whole trainer side in one call.
    """
    info = await sessions.open(fleet, req)
    await fleet.statuses(info.engines)  # paused and dialling: readers see it now
    return info


@router.post("/sessions/{session}/commit", response_model=SyncResult,
             operation_id="commit_session")
async def commit_session(session: SessionPath, req: CommitRequest,
                         fleet: Fleet = Depends(get_fleet),
                         sessions: SessionRegistry = Depends(get_sessions)) -> SyncResult:
    """The trainer sent every bucket: verify, apply everywhere, publish. Returns the result."""
    out = await _close(sessions, session, fleet, checksums=req.checksums)
    if isinstance(out, BaseException):
        raise out
    return out


@router.post("/sessions/{session}/abort", response_model=SessionClosed,
             operation_id="abort_session")
async def abort_session(session: SessionPath, req: AbortRequest | None = None,
                        fleet: Fleet = Depends(get_fleet),
                        sessions: SessionRegistry = Depends(get_sessions)) -> SessionClosed:
    """The trainer gave up: the fleet rolls back to (and keeps serving) its old version."""
    req = req or AbortRequest()
    out = await _close(sessions, session, fleet, reason=req.reason)
    if isinstance(out, BaseException):
        return SessionClosed(session=session, ok=False, message=str(out),
                             result=getattr(out, "result", None))
    return SessionClosed(session=session, ok=out.ok, message="the sync completed", result=out)


async def _close(sessions: SessionRegistry, sid: str, fleet: Fleet,
                 **how: Any) -> SyncResult | WeightSyncError:
    """``sessions.close``, then its engines' statuses asked again for every reader."""
    engines = sessions.get(sid).engines  # an unknown session is a 404 before anything
    try:
        return await sessions.close(sid, fleet, **how)
    finally:
        await fleet.statuses(engines)
