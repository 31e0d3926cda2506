"""Per-engine lifecycle: list, status, sleep, wake, pause, resume.

Each action runs on the named engines (all when omitted) concurrently, and holds the fleet
for its duration, so it can never interleave with a reload or sync session half-way. Every
target's state is checked first: an action applies to all the engines it names or, with a
409/422 naming the first engine that cannot take it, to none.

Sleep and wake are the coordinator's (``SyncCoordinator.sleep``/``wake``), the same calls a
colocated trainer makes: a reload or sync session goes straight into sleeping engines, and on
CPU (no sleep mode in vLLM) engines only pause and each report says why nothing was freed.

Reads (``/engines``, ``/status``) answer from the statuses last seen (``Fleet.seen``) and never
wait on an engine; every action here refreshes the statuses of its targets before it returns,
so a client reads its own change at once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Depends

from weightsync.api.deps import get_fleet, require_reader, require_token
from weightsync.api.fleet import Fleet
from weightsync.api.routes.common import READ_ERRORS, WRITE_ERRORS
from weightsync.api.schemas import (
    EngineInfo,
    EngineList,
    EngineStates,
    FleetStatus,
    PauseRequest,
    ResumeRequest,
    SleepRequest,
    WakeRequest,
)
from weightsync.types import EngineState, EngineStatus, SleepResult

S = EngineState

router = APIRouter(tags=["engines"])
read = dict(dependencies=[Depends(require_reader)], responses=READ_ERRORS)
write = dict(dependencies=[Depends(require_token)], responses=WRITE_ERRORS)


@router.get("/engines", response_model=EngineList, **read)
async def engines(fleet: Fleet = Depends(get_fleet)) -> EngineList:
    return EngineList(engines=[EngineInfo(name=s.name, model=s.model, device=s.device,
                                          sleep_supported=s.sleep_supported)
                               for s in await fleet.seen()])


@router.get("/status", response_model=FleetStatus, **read)
async def status(fleet: Fleet = Depends(get_fleet)) -> FleetStatus:
    """Per engine: state, version, last sync phases; plus recent syncs through this service.
    The engines' statuses as last seen (at most about half a second old, and current after
    any change made through this service): this never waits on an engine."""
    return await fleet.status()


async def _act(fleet: Fleet, names, what: str, call: Callable[[str], Awaitable[EngineStatus]],
               allowed: set[EngineState]) -> EngineStates:
    targets = fleet.resolve(names)
    with fleet.exclusive():
        await fleet.require_states(targets, allowed, what)
        try:
            await fleet.each(targets, call, what=what)
        finally:  # what the engines are now, for this answer and for every reader
            after = await fleet.statuses(targets)
    return EngineStates(engines=after)


@router.post("/sleep", response_model=SleepResult, **write)
async def sleep(req: SleepRequest | None = None,
                fleet: Fleet = Depends(get_fleet)) -> SleepResult:
    """Release the engines' device memory for a colocated trainer (serving or paused engines
    only, else 409 and nothing touched). The next ``/reload`` or sync session goes into the
    sleeping engines and wakes them; ``/wake`` wakes them without one. Each engine reports what
    it freed; on CPU it only pauses, and says so in ``skipped``."""
    req = req or SleepRequest()
    targets = fleet.resolve(req.engines)
    with fleet.exclusive():
        try:
            return await fleet.run(fleet.coordinator.sleep, req.level, engines=targets,
                                   pause_mode=req.mode)
        finally:
            await fleet.statuses(targets)


@router.post("/wake", response_model=EngineStates, **write)
async def wake(req: WakeRequest | None = None,
               fleet: Fleet = Depends(get_fleet)) -> EngineStates:
    """Wake sleeping engines without new weights. Weights discarded by sleep level 2 cannot be
    served: such an engine is fenced until a reload or sync."""
    req = req or WakeRequest()
    targets = fleet.resolve(req.engines)
    with fleet.exclusive():
        try:
            return EngineStates(engines=await fleet.run(fleet.coordinator.wake,
                                                        engines=targets, tags=req.tags))
        finally:
            await fleet.statuses(targets)


@router.post("/pause", response_model=EngineStates, **write)
async def pause(req: PauseRequest | None = None,
                fleet: Fleet = Depends(get_fleet)) -> EngineStates:
    req = req or PauseRequest()
    timeout = fleet.coordinator.transfer.deadlines.pause
    return await _act(fleet, req.engines, "pause",
                      lambda n: fleet.pause(n, req.mode, timeout=timeout), allowed={S.SERVING})


@router.post("/resume", response_model=EngineStates, **write)
async def resume(req: ResumeRequest | None = None,
                 fleet: Fleet = Depends(get_fleet)) -> EngineStates:
    req = req or ResumeRequest()
    timeout = fleet.coordinator.transfer.deadlines.resume
    return await _act(fleet, req.engines, "resume",
                      lambda n: fleet.resume(n, timeout=timeout), allowed={S.PAUSED})

