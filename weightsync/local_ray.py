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
calls ``prepare_environ`` before anything imports ``ray`` (``check_driver`` refuses to go on
otherwise, instead of a driver that cannot reach the Ray it started). This module decides what
Ray's environment must hold (``ray_env``, a pure function of an environment given to it) and is
the one place that applies it to the process, as ``engine.vllm_compat`` is for vLLM's.

For a cluster the user provides (an address), nothing changes: Ray's own security model applies
(it assumes a trusted network; ``RAY_AUTH_MODE=token`` on the cluster and its drivers requires
a token). This module never imports ``ray`` itself.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping

from weightsync.errors import ConfigError

AUTH_MODE = "RAY_AUTH_MODE"
AUTH_TOKEN = "RAY_AUTH_TOKEN"


def starts_own_ray(address: str | None) -> bool:
    """Whether ``ray.init(address=address)`` starts a Ray of its own."""
    return address in (None, "", "local")


def own_ray_env(environ: Mapping[str, str]) -> dict[str, str]:
    """What to add to the environment before this process imports Ray and starts its own:
    token authentication with a fresh token, unless the user chose a mode (then nothing)."""
    if environ.get(AUTH_MODE):
        return {}
    return {AUTH_MODE: "token", AUTH_TOKEN: secrets.token_hex(32)}


def ray_env(address: str | None, environ: Mapping[str, str]) -> dict[str, str]:
    """What the entrypoint adds to its environment ``environ`` before it imports Ray: when it
    will start Ray itself (``address``), Ray's token authentication for it and its children,
    unless the user chose a mode; nothing for a cluster the user provides."""
    return own_ray_env(environ) if starts_own_ray(address) else {}


def prepare_environ(address: str | None) -> Mapping[str, str]:
    """For an entrypoint, before it imports Ray: add ``ray_env``'s variables to this process's
    environment (its children inherit them) and return the environment, for the callees that
    read Ray's authentication mode from it (``api.server.serve``)."""
    os.environ.update(ray_env(address, os.environ))
    return os.environ


def auth_mode(environ: Mapping[str, str]) -> str | None:
    """``RAY_AUTH_MODE`` in ``environ`` (None: unset, Ray's default, no token)."""
    return environ.get(AUTH_MODE)


def unauthenticated(environ: Mapping[str, str]) -> bool:
    """Whether a Ray started under ``environ`` takes drivers without a token."""
    return environ.get(AUTH_MODE, "disabled").strip().lower() != "token"


def check_driver(environ: Mapping[str, str]) -> None:
    """Refuse to start Ray when ``environ`` (this process's) asks for token authentication but
    the process imported Ray before it was set (Ray would start authenticated and refuse its
    own driver)."""
    if unauthenticated(environ):
        return
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    if not is_token_auth_enabled():
        raise ConfigError(f"{AUTH_MODE}=token was set after Ray was imported in this process; "
                          "set it in the environment before the process starts")


def init_kwargs() -> dict[str, object]:
    """``ray.init`` arguments for a Ray this process starts: no dashboard (its job API runs
    arbitrary code as this user)."""
    return {"include_dashboard": False}
