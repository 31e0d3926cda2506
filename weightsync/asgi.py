"""Small ASGI pieces shared by the control plane's gate and the engines' OpenAI guard."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]


def replayed(body: bytes, receive: Receive) -> Receive:
    """``receive`` that hands out ``body`` (already read, or rewritten) first, then the
    client's own messages (its disconnect, which the app may listen for)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
