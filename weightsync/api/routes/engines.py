"""Per-engine lifecycle: list, status, sleep, wake, pause, resume.

Each action runs on the named engines (all when omitted) concurrently, and holds the fleet
for its duration, so it can never interleave with a reload or sync session half-way. Every
target's state is checked first: an action applies to all the engines it names or, with a
409/422 naming the first engine that cannot take it, to none.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends

from weightsync.api.deps import get_fleet, require_reader, require_token
from weightsync.api.fleet import Fleet
from weightsync.api.routes.common import READ_ERRORS, WRITE_ERRORS
from weightsync.api.schemas import (EngineInfo, EngineList, EngineStates, FleetStatus,
                                    PauseRequest, ResumeRequest, SleepRequest, WakeRequest)
from weightsync.errors import UnsupportedError
from weightsync.types import EngineState

S = EngineState

router = APIRouter(tags=["engines"])
read = dict(dependencies=[Depends(require_reader)], responses=READ_ERRORS)
write = dict(dependencies=[Depends(require_token)], responses=WRITE_ERRORS)


@router.get("/engines", response_model=EngineList, **read)
async def engines(fleet: Fleet = Depends(get_fleet)) -> EngineList:
    return EngineList(engines=[EngineInfo(name=s.name, model=s.model, device=s.device,
                                          sleep_supported=s.sleep_supported)
                               for s in await fleet.statuses()])


@router.get("/status", response_model=FleetStatus, **read)
async def status(fleet: Fleet = Depends(get_fleet)) -> FleetStatus:
    """Per engine: state, version, last sync phases; plus recent syncs through this service."""
    return FleetStatus(version=fleet.coordinator.version, busy=fleet.busy,
                       engines=await fleet.statuses(), recent=list(fleet.recent))


async def _act(fleet: Fleet, names, method: str, *args, allowed: set[EngineState],
               timeout: float) -> EngineStates:
    targets = fleet.resolve(names)
    with fleet.exclusive():
        if method == "sleep":
            for st in await fleet.statuses(targets):
                if not st.sleep_supported:
                    raise UnsupportedError(f"sleep mode is CUDA-only; engine runs on "
                                           f"{st.device}", engine=st.name)
        await fleet.require_states(targets, allowed, method)
        await fleet.each(targets, method, *args, timeout=timeout)
    return EngineStates(engines=await fleet.statuses(targets))


@router.post("/sleep", response_model=EngineStates, **write)
async def sleep(req: SleepRequest | None = None,
                fleet: Fleet = Depends(get_fleet)) -> EngineStates:
    """Sleep mode (CUDA only): on a CPU engine this is a 422 ``unsupported``."""
    req = req or SleepRequest()
    return await _act(fleet, req.engines, "sleep", req.level, allowed={S.SERVING, S.PAUSED},
                      timeout=fleet.coordinator.transfer.deadlines.sleep)


@router.post("/wake", response_model=EngineStates, **write)
async def wake(req: WakeRequest | None = None,
               fleet: Fleet = Depends(get_fleet)) -> EngineStates:
    req = req or WakeRequest()
    return await _act(fleet, req.engines, "wake_up", req.tags,
                      allowed={S.ASLEEP, S.WEIGHTS_AWAKE},
                      timeout=fleet.coordinator.transfer.deadlines.wake)


@router.post("/pause", response_model=EngineStates, **write)
async def pause(req: PauseRequest | None = None,
                fleet: Fleet = Depends(get_fleet)) -> EngineStates:
    req = req or PauseRequest()
    return await _act(fleet, req.engines, "pause", req.mode, allowed={S.SERVING},
                      timeout=fleet.coordinator.transfer.deadlines.pause)


@router.post("/resume", response_model=EngineStates, **write)
async def resume(req: ResumeRequest | None = None,
                 fleet: Fleet = Depends(get_fleet)) -> EngineStates:
    req = req or ResumeRequest()
    return await _act(fleet, req.engines, "resume", allowed={S.PAUSED},
                      timeout=fleet.coordinator.transfer.deadlines.resume)

