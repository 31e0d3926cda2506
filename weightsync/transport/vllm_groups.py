"""vLLM's stateless process groups: the one part of vLLM the transport uses.

Everything else weightsync takes from vLLM goes through ``weightsync.engine.vllm_compat``;
the groups live here, below the engine, so that the transport (which the engine imports) does
not import the engine back.
"""

from __future__ import annotations

import inspect
import logging
from datetime import timedelta
from typing import Any

logger = logging.getLogger(__name__)


def stateless_group(host: str, port: int, rank: int, world_size: int, backend: str,
                    timeout_s: float) -> Any:
    """A process group outside torch.distributed's global state (rank 0 hosts the store).

    gloo: returns a torch ProcessGroup (call ``pg.broadcast(t, root).wait(timeout)``).
    nccl: returns vLLM's ``PyNcclCommunicator`` over a ``StatelessProcessGroup``.
    """
    if backend == "gloo":
        from vllm.distributed.utils import stateless_init_torch_distributed_process_group as init

        kw: dict[str, Any] = {}
        if "timeout" in inspect.signature(init).parameters:
            kw["timeout"] = timedelta(seconds=timeout_s)
        return init(host, port, rank, world_size, backend="gloo", **kw)
    if backend == "nccl":
        import torch
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        kw = {}
        params = inspect.signature(StatelessProcessGroup.create).parameters
        if "store_timeout" in params:
            kw["store_timeout"] = int(timeout_s)
        spg = StatelessProcessGroup.create(host=host, port=port, rank=rank,
                                           world_size=world_size, **kw)
        return PyNcclCommunicator(spg, device=torch.cuda.current_device())
    raise ValueError(f"unknown backend {backend!r}")


def destroy_group(group: Any) -> None:
    """Best-effort teardown so a failed group never lingers (and never blocks a rebuild)."""
    try:
        if hasattr(group, "destroy"):  # PyNcclCommunicator: aborts the NCCL comm
            group.destroy()
        elif hasattr(group, "abort"):
            group.abort()
        elif hasattr(group, "shutdown"):
            group.shutdown()
    except Exception:
        logger.debug("group teardown raised", exc_info=True)
