"""Liveness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST

from weightsync.api.deps import require_reader
from weightsync.api.routes.common import PAGE_ERRORS
from weightsync.api.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
async def healthz(request: Request) -> Health:
    """The service is up (no token: for load balancers and probes). Does not call engines."""
    fleet = getattr(request.app.state, "fleet", None)
    return Health(engines=len(fleet.names) if fleet is not None else 0)


@router.get("/metrics", response_model=str, response_class=PlainTextResponse,
            dependencies=[Depends(require_reader)], responses=PAGE_ERRORS)
async def metrics(request: Request) -> PlainTextResponse:
    """Prometheus text: per-phase durations, bytes, outcomes, versions, fencing."""
    return PlainTextResponse(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
