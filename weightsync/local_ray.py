"""The Ray instance a weightsync entrypoint starts itself: token-authenticated, no dashboard.

Ray's GCS, raylets and worker ports listen on every interface whatever address they are given
(its gRPC servers bind 0.0.0.0: read with ``ss -ltnp`` on Ray 2.55 with
``_node_ip_address="127.0.0.1"``), and with no authentication any driver that reaches them can
take the engine actors by name, pause them, or call any actor method. So when ``services.serve``
(``weightsync serve``), ``services.grpo`` or ``services.demo`` starts Ray itself, Ray's own
token authentication (``RAY_AUTH_MODE=token``, Ray >= 2.52) is turned on with a fresh random
token that only that process and the processes Ray starts for it inherit, and the dashboard
(whose job API runs code as this user) stays off. A driver without the token is refused when it
connects.

Ray reads ``RAY_AUTH_MODE`` when it is imported: every entrypoint (the CLI, ``services.*``)
reads ``Settings`` once (``Settings.ray_auth_mode`` is the user's ``RAY_AUTH_MODE``) and calls
``ray_compat.prepare`` with it before anything imports ``ray`` (``ray_compat.check_driver``
refuses to go on otherwise, instead of a driver that cannot reach the Ray it started). This
module decides, from values given to it, what Ray's environment must hold (``ray_env``) and
which mode that Ray runs under (``own_auth_mode``); ``weightsync.ray_compat`` is the one place
that applies it to the process, as ``engine.vllm_compat`` is for vLLM's.

For a cluster the user provides (an address), nothing changes: Ray's own security model applies
(it assumes a trusted network; ``RAY_AUTH_MODE=token`` on the cluster and its drivers requires
a token). This module never imports ``ray`` itself.
"""

from __future__ import annotations

import secrets

AUTH_MODE = "RAY_AUTH_MODE"
AUTH_TOKEN = "RAY_AUTH_TOKEN"


def starts_own_ray(address: str | None) -> bool:
    """Whether ``ray.init(address=address)`` starts a Ray of its own."""
    return address in (None, "", "local")


def ray_env(address: str | None, auth_mode: str | None) -> dict[str, str]:
    """What the entrypoint adds to its environment before it imports Ray: when it will start
    Ray itself (``address``), token authentication with a fresh token for it and its
    children, unless the user chose a mode (``auth_mode``, their ``RAY_AUTH_MODE``); nothing
    for a cluster the user provides."""
    if not starts_own_ray(address) or auth_mode:
        return {}
    return {AUTH_MODE: "token", AUTH_TOKEN: secrets.token_hex(32)}


def own_auth_mode(address: str | None, auth_mode: str | None) -> str | None:
    """The ``RAY_AUTH_MODE`` the process runs Ray under once ``ray_env`` is applied: the
    user's, else ``"token"`` for a Ray it starts; None for a cluster the user provides with
    none set."""
    return auth_mode or ray_env(address, auth_mode).get(AUTH_MODE)


def unauthenticated(auth_mode: str | None) -> bool:
    """Whether a Ray started under ``RAY_AUTH_MODE=auth_mode`` takes drivers without a
    token."""
    return (auth_mode or "disabled").strip().lower() != "token"


def init_kwargs() -> dict[str, object]:
    """``ray.init`` arguments for a Ray this process starts: no dashboard (its job API runs
    arbitrary code as this user)."""
    return {"include_dashboard": False}
