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

Ray reads ``RAY_AUTH_MODE`` when it is imported: the entrypoint applies ``own_ray_env`` to its
environment before anything imports ``ray`` (``prepare_process_env``; ``check_driver`` refuses
to go on otherwise, instead of a driver that cannot reach the Ray it started). This is the one
module that reads or sets Ray's environment, as ``engine.vllm_compat`` is for vLLM's.

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


def prepare_process_env(address: str | None) -> None:
    """Before this process imports Ray: when it will start Ray itself (``address``), turn
    Ray's token authentication on for it and its children, unless the user chose a mode."""
    if starts_own_ray(address):
        os.environ.update(own_ray_env(os.environ))


def auth_mode() -> str | None:
    """``RAY_AUTH_MODE`` as this process sees it (None: unset, Ray's default, no token)."""
    return os.environ.get(AUTH_MODE)


def unauthenticated(environ: Mapping[str, str]) -> bool:
    """Whether a Ray started under ``environ`` takes drivers without a token."""
    return environ.get(AUTH_MODE, "disabled").strip().lower() != "token"


def check_driver() -> None:
    """Refuse to start Ray when the environment asks for token authentication but this
    process imported Ray before it was set (Ray would start authenticated and refuse its own
    driver)."""
    if unauthenticated(os.environ):
        return
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    if not is_token_auth_enabled():
        raise ConfigError(f"{AUTH_MODE}=token was set after Ray was imported in this process; "
                          "set it in the environment before the process starts")


def init_kwargs() -> dict[str, object]:
    """``ray.init`` arguments for a Ray this process starts: no dashboard (its job API runs
    arbitrary code as this user)."""
    return {"include_dashboard": False}
