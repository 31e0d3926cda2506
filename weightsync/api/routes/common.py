"""What every router shares: the documented error responses."""

from __future__ import annotations

from typing import Any

from weightsync.api.schemas import ErrorBody

_WHY = {
    400: "Malformed HTTP (answered by the server before the app); on the rollout routes, "
         "also vLLM's own refusal of a request",
    401: "No or wrong bearer token",
    404: "Unknown engine or session",
    409: "Illegal engine state, or a sync is in progress (nothing was changed); for a "
         "rollout, a weight-version bound no engine can meet",
    413: "Request body over the service's limit (WEIGHTSYNC_MAX_BODY_MIB)",
    422: "Bad input (validation, path outside the load roots, a checkpoint or tensor list "
         "that does not cover the model, unsupported on this engine)",
    503: "An engine is unavailable or failed",
    504: "A phase ran past its deadline",
}


def error_responses(*statuses: int, json_route: bool = True) -> dict[int | str, dict[str, Any]]:
    """Documented error answers. Errors are JSON even on text/HTML routes, whose media type
    FastAPI would otherwise give them, so those name the schema explicitly."""
    ref = {"$ref": "#/components/schemas/ErrorBody"}
    out: dict[int | str, dict[str, Any]] = {
        s: {"model": ErrorBody, "description": _WHY[s]} if json_route else
        {"description": _WHY[s], "content": {"application/json": {"schema": ref}}}
        for s in statuses}
    if 400 in out:  # uvicorn answers malformed HTTP itself, in plain text, before the app
        out[400] = {"description": _WHY[400], "content": {
            "application/json": {"schema": ref}, "text/plain": {"schema": {"type": "string"}}}}
    return out


READ_ERRORS = error_responses(400, 401, 503, 504)
WRITE_ERRORS = error_responses(400, 401, 404, 409, 413, 422, 503, 504)
PAGE_ERRORS = error_responses(400, 401, 422, 503, 504, json_route=False)
