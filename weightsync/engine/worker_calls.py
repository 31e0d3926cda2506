"""The engine host's calls into its engine's workers (vLLM's ``collective_rpc``), and the plan
they hold.

Every call has a deadline; every worker's ``WorkerReply`` is parsed once, and a worker's error
comes back as the same typed error. A worker keeps the last plan body it was sent whole, and
nothing but this host sends them plans, so a body every worker holds is named by key
(``plan_wire.PlanMessage.by_key``).
"""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar, cast

from pydantic import BaseModel

from weightsync.engine import vllm_compat
from weightsync.errors import DeadlineExceeded, EngineError, error_class
from weightsync.messages import reply_of
from weightsync.plan_wire import HeldPlan, PlanMessage

M = TypeVar("M", bound=BaseModel)


class WorkerCalls:
    """Calls into one engine's workers. Invariant: ``workers_plan`` is the key of the plan
    body every worker holds, or None when that is not known (new workers, a call in
    progress)."""

    def __init__(self, name: str) -> None:
        self.name = name  # the engine's, for errors
        self.engine: Any = None
        self.plan = HeldPlan()  # the body the trainer last sent whole (BeginReply.plan_key)
        self.workers_plan: str | None = None  # the key of the body every worker holds

    def attach(self, engine: Any) -> None:
        """Call into ``engine`` from now on (a start or restart): its workers hold no plan."""
        self.engine, self.workers_plan = engine, None

    async def rpc(self, method: str, *args: Any, reply: type[M],
                  timeout: float | None = None) -> list[M]:
        """``collective_rpc`` with a deadline; every worker's ``WorkerReply`` parsed once, and
        a worker's error re-raised as the same typed error."""
        try:
            out = await asyncio.wait_for(vllm_compat.collective_rpc(self.engine, method, args),
                                         timeout)
        except TimeoutError as e:
            raise DeadlineExceeded(f"{method} exceeded {timeout}s", engine=self.name) from e
        except Exception as e:
            raise EngineError(f"{method} failed in the worker: {e}", engine=self.name) from e
        replies = [reply_of(reply).model_validate_json(o) for o in out]
        got: list[M] = []
        for rank, r in enumerate(replies):  # any worker's error fails the call
            if r.error is not None:
                where = f"worker rank {rank}/{len(replies)}: " if len(replies) > 1 else ""
                raise error_class(r.error.code)(where + r.error.message, engine=self.name)
            got.append(cast(M, r.reply))  # (a WorkerReply holds its reply or its error)
        return got

    async def plan_rpc(self, method: str, plan: PlanMessage, *args: Any, reply: type[M],
                       timeout: float) -> list[M]:
        """``rpc`` of a worker method whose first argument is a plan (``plan``, with its
        body: ``HeldPlan.read``), its body named by key when every worker holds it already."""
        if plan.key == self.workers_plan:
            plan = plan.by_key()
        else:
            self.workers_plan = None  # until every worker has it
        out = await self.rpc(method, plan.model_dump_json(), *args, reply=reply,
                             timeout=timeout)
        self.workers_plan = plan.key
        return out
