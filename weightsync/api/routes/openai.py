"""The fleet's OpenAI-compatible base URL: ``/v1/completions``, ``/v1/chat/completions``,
``/v1/models``, tokenization, and vLLM's token-in/token-out generate route, each forwarded to
one engine's own vLLM app by the rollout router (``weightsync.routing``).

Request and response bodies are vLLM's own (its OpenAI schemas); what the router adds is
documented here: the session key, the version bounds, the wait, and the version headers the
engines stamp. Auth and the body limit are the control plane's (``api.gate``): a rollout client
uses the service's token as its OpenAI API key.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from weightsync.api.deps import require_reader, require_token
from weightsync.api.routes.common import error_responses
from weightsync.errors import EngineError
from weightsync.routing.proxy import ProxyResponse, send_error
from weightsync.routing.router import RolloutRouter, RoutingError, read_ask

router = APIRouter(tags=["rollouts"])


def _header(name: str, description: str, kind: str = "string") -> dict[str, Any]:
    return {"name": name, "in": "header", "required": False, "description": description,
            "schema": {"type": kind}}


PARAMETERS = [
    _header("X-Session-ID", "Session key: requests with the same key go to the same engine "
            "while it serves (its prefix cache hits). Without it, the body's `user` field is "
            "the key; with neither, the least-loaded engine."),
    _header("X-Min-Weight-Version", "Serve only with this weight version or newer (also the "
            "body field `min_weight_version`): waits for a sync in progress that brings it, "
            "409 if none does. Never served by older weights.", "integer"),
    _header("X-Max-Weight-Staleness", "At most this many versions behind the committed one "
            "(also the body field `max_weight_staleness`).", "integer"),
    _header("X-Wait-S", "Seconds the request may wait for an engine (a sync in progress): "
            "then 503 with Retry-After. Default 30.", "number"),
]
ANSWERS = {
    200: {"description": "vLLM's own response, from one engine. Headers: `X-Weight-Version` "
          "(the version at admission), `X-Engine`; JSON bodies carry `weight_version` (null "
          "if the version changed during the request) and `weight_versions` [first, last]; "
          "streamed chunks each carry the `weight_version` that produced them.",
          "content": {"application/json": {"schema": {"type": "object"}},
                      "text/event-stream": {"schema": {"type": "string"}}}},
    **error_responses(400, 401, 404, 409, 413, 422, 503),
}
BODY = {"requestBody": {"required": True, "description": "vLLM's OpenAI request body",
                        "content": {"application/json": {"schema": {"type": "object"}}}}}


async def get_rollouts(request: Request) -> RolloutRouter:
    rollouts = getattr(request.app.state, "rollouts", None)
    if rollouts is None:
        raise EngineError("the rollout router is not running (still connecting, or turned "
                          "off: WEIGHTSYNC_ROLLOUTS)")
    return rollouts


class _Refused(Response):
    def __init__(self, err: RoutingError) -> None:
        super().__init__()
        self.err = err

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send_error(send, self.err)


class _Forward(Response):
    """FastAPI passes a ``Response`` through as it is: this one is the proxy."""

    def __init__(self, proxy: ProxyResponse) -> None:
        super().__init__()
        self.proxy = proxy

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.proxy(scope, receive, send)


async def _forward(request: Request, rollouts: RolloutRouter, path: str) -> Response:
    body = await request.body() if request.method == "POST" else b""
    try:
        ask = read_ask(request.headers, body, rollouts.wait_s)
    except RoutingError as e:
        return _Refused(e)
    return _Forward(ProxyResponse(rollouts, request.method, path, request.headers, ask))


def _post(path: str, summary: str) -> None:
    async def route(request: Request, rollouts: RolloutRouter = Depends(get_rollouts)
                    ) -> Response:
        return await _forward(request, rollouts, path)

    route.__name__ = "rollout_" + path.strip("/").replace("/", "_")
    router.add_api_route(path, route, methods=["POST"], summary=summary,
                         dependencies=[Depends(require_token)], responses=ANSWERS,
                         response_class=Response,
                         openapi_extra={"parameters": PARAMETERS, **BODY})


_post("/v1/completions", "Completions (vLLM's), on one engine of the fleet")
_post("/v1/chat/completions", "Chat completions (vLLM's, the model's chat template)")
_post("/tokenize", "Tokenize (vLLM's)")
_post("/detokenize", "Detokenize (vLLM's)")
_post("/inference/v1/generate", "vLLM's token-in/token-out generate, where the engine's "
      "vLLM serves it")


@router.get("/v1/models", dependencies=[Depends(require_reader)], responses=ANSWERS,
            response_class=Response, summary="The served model (vLLM's list, from one engine)")
async def models(request: Request, rollouts: RolloutRouter = Depends(get_rollouts)
                 ) -> Response:
    return await _forward(request, rollouts, "/v1/models")
