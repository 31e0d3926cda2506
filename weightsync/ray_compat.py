"""The only module that sets Ray's process environment or reads Ray's internals, as
``engine.vllm_compat`` is for vLLM. What to set is decided in ``weightsync.local_ray`` from the
entrypoint's ``Settings``; this applies it, before the process imports Ray."""

from __future__ import annotations

import os

from weightsync.errors import ConfigError
from weightsync.local_ray import AUTH_MODE, own_auth_mode, ray_env, unauthenticated


def prepare(address: str | None, auth_mode: str | None) -> str | None:
    """For an entrypoint, before it imports Ray: put ``local_ray.ray_env``'s variables in this
    process's environment (its children inherit them). ``auth_mode``: the user's
    ``RAY_AUTH_MODE`` (``Settings.ray_auth_mode``). Returns the mode Ray will run under
    (``local_ray.own_auth_mode``)."""
    os.environ.update(ray_env(address, auth_mode))
    return own_auth_mode(address, auth_mode)


def check_driver(auth_mode: str | None) -> None:
    """Refuse to start Ray under ``RAY_AUTH_MODE=auth_mode`` "token" when this process imported
    Ray before the mode was set (Ray would start authenticated and refuse its own driver)."""
    if unauthenticated(auth_mode):
        return
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    if not is_token_auth_enabled():
        raise ConfigError(f"{AUTH_MODE}=token was set after Ray was imported in this process; "
                          "set it in the environment before the process starts")
