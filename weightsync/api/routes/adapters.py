"""LoRA adapters across the fleet: what each engine serves, and a peft adapter directory
loaded as the next version of a name on every engine, all or nothing (#31).

The directory is read here, by the control plane, under the same rules as a checkpoint a
client names (``weightsync.checkpoint.read_adapter``: inside the load roots, regular files,
bounded, the header checked before any tensor is read), then moved to the engines as an
adapter sync from memory (``SyncCoordinator.sync_adapter``). An adapter the engines refuse
(another base's shapes, a rank above their ``max_lora_rank``, no LoRA) is a 422 and no engine
changed; any other failure a 503 naming each engine's (``AdapterSyncFailedError``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request

from weightsync.adapters import NAME, AdapterFleetResult, AdapterPayload, AdapterState
from weightsync.api.deps import get_fleet, get_settings, require_token
from weightsync.api.errors import ClientGoneError
from weightsync.api.fleet import Fleet
from weightsync.api.routes.common import WRITE_ERRORS
from weightsync.api.schemas import AdapterReloadRequest
from weightsync.config import Settings

logger = logging.getLogger(__name__)

AdapterName = Annotated[str, Path(min_length=1, max_length=64, pattern=NAME,
                                  description="The adapter's name; each load makes "
                                              "<name>@v<N>, and <name> serves the latest")]

router = APIRouter(tags=["adapters"], dependencies=[Depends(require_token)],
                   responses=WRITE_ERRORS)


@router.get("/adapters", response_model=dict[str, AdapterState])
async def adapters(fleet: Fleet = Depends(get_fleet)) -> dict[str, AdapterState]:
    """Each engine's LoRA adapters: which version each name serves, the versions kept, any
    staged, and the vLLM ids its workers hold."""
    return await fleet.run(fleet.coordinator.adapter_states)


@router.post("/adapters/{name}/reload", response_model=AdapterFleetResult)
async def reload_adapter(request: Request, name: AdapterName, req: AdapterReloadRequest,
                         fleet: Fleet = Depends(get_fleet),
                         settings: Settings = Depends(get_settings)) -> AdapterFleetResult:
    """Load a peft adapter directory (inside a load root) as ``<name>``'s next version on
    every target engine, all or nothing: each engine stages it (checked, loaded, not yet
    served), then all commit; if any refuses or fails, all abort and ``<name>`` stays on its
    version everywhere (422 for an adapter the engines refuse, 503 otherwise)."""
    targets = fleet.resolve(req.engines)
    with fleet.exclusive():
        payload = await asyncio.to_thread(AdapterPayload.from_directory, name, req.path,
                                          settings.load_roots)
        if await request.is_disconnected():  # nobody would learn the outcome: change nothing
            raise ClientGoneError("the client went away before the adapter load began; "
                                  "nothing was changed")
        result = await fleet.run(fleet.coordinator.sync_adapter, payload, engines=targets)
    logger.info("adapter %s@v%d loaded from %s on %s", name, result.version, req.path,
                list(result.committed))
    return result
