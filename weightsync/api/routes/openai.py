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
from fastapi.routing import APIRoute
from starlette.datastructures import Headers
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


def rollouts_of(app: Any) -> RolloutRouter:
    rollouts = getattr(app.state, "rollouts", None)
    if rollouts is None:
        raise EngineError("the rollout router is not running (still connecting, or turned "
                          "off: WEIGHTSYNC_ROLLOUTS)")
    return rollouts


async def _read_body(receive: Any) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":  # (gone: the proxy sees it too)
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


class ProxiedRoute(APIRoute):
    """A ``/v1`` route served as plain ASGI: the body is read once and handed to the router's
    proxy (``routing.proxy.ProxyResponse``), without FastAPI's request parsing and dependency
    solving (on the 2-core box they were ~0.2 ms of the router's ~0.8 ms per request). FastAPI
    still documents the route from its declaration (parameters, body, answers, the bearer
    scheme); the token and the body limit are checked before any route, by ``api.gate.Gate``
    (which every control-plane app has: ``create_app``). Errors raised here go to the app's
    error handlers as any route's do."""

    def __init__(self, path: str, endpoint: Any, **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        self.app = self._serve

    async def _serve(self, scope: Any, receive: Any, send: Any) -> None:
        rollouts = rollouts_of(scope["app"])
        body = await _read_body(receive) if scope["method"] == "POST" else b""
        headers = Headers(scope=scope)
        try:
            ask = read_ask(headers, body, rollouts.wait_s)
        except RoutingError as e:
            await send_error(send, e)
            return
        proxy = ProxyResponse(rollouts, scope["method"], self.path, headers, ask)
        await proxy(scope, receive, send)


async def _documented_only(request: Request) -> Response:  # pragma: no cover
    """Never called: a ``ProxiedRoute`` serves the request (FastAPI reads this signature for
    the OpenAPI document only)."""
    raise AssertionError("ProxiedRoute serves this route")


def _post(path: str, summary: str) -> None:
    router.add_api_route(path, _documented_only, methods=["POST"], summary=summary,
                         name="rollout_" + path.strip("/").replace("/", "_"),
                         route_class_override=ProxiedRoute,
                         dependencies=[Depends(require_token)], responses=ANSWERS,
                         response_class=Response,
                         openapi_extra={"parameters": PARAMETERS, **BODY})


_post("/v1/completions", "Completions (vLLM's), on one engine of the fleet")
_post("/v1/chat/completions", "Chat completions (vLLM's, the model's chat template)")
_post("/tokenize", "Tokenize (vLLM's)")
_post("/detokenize", "Detokenize (vLLM's)")
_post("/inference/v1/generate", "vLLM's token-in/token-out generate, where the engine's "
      "vLLM serves it")


router.add_api_route("/v1/models", _documented_only, methods=["GET"],
                     name="rollout_v1_models", route_class_override=ProxiedRoute,
                     dependencies=[Depends(require_reader)], responses=ANSWERS,
                     response_class=Response,
                     summary="The served model (vLLM's list, from one engine)")
