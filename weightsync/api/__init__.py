"""The control plane: a FastAPI service over one fleet of engine actors.

``create_app(settings, engines=...)`` builds it; ``weightsync.api.server.serve`` runs it with
uvicorn; ``weightsync.client.WeightSyncClient`` talks to it. The app (and with it FastAPI, the
coordinator and Ray) is imported on first use of ``create_app``/``check_bind``, not with the
package: the client imports ``weightsync.api.schemas`` and ``weightsync.api.http_errors`` only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from weightsync.api.app import check_bind, create_app

__all__ = ["check_bind", "create_app"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from weightsync.api import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
