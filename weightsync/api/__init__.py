"""The control plane: a FastAPI service over one fleet of engine actors.

``create_app(settings, engines=...)`` builds it; ``weightsync.api.server.serve`` runs it with
uvicorn; ``weightsync.client.WeightSyncClient`` talks to it.
"""

from weightsync.api.app import check_bind, create_app

__all__ = ["check_bind", "create_app"]
