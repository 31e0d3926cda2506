"""vLLM's engine client as its own OpenAI app sees it, with every request passing the host's
serving gate (``engine.serving.ServingGate``) exactly as a Ray-path rollout does.

vLLM's OpenAI app calls ``engine_client.generate(prompt, params, request_id, **kw)`` (0.24 and
0.32: completions, chat, beam search, the token-in/token-out route) and reads a handful of other
attributes (``model_config``, ``renderer``, ``errored``, ``abort``...). ``GatedEngineClient``
hands all of those to the ``AsyncLLM`` and only ``generate`` changes: it waits while the gate is
closed (a sync, a pause), refuses when the engine cannot serve, admits with no await between
the open gate and the admission (so ``begin_sync`` waits for it), and runs the request through
``ServingGate.outputs``: counted in flight, caches marked dirty.

Each HTTP request carries a ``Ticket`` (set by ``engine.openai_guard`` in a context variable,
which vLLM's tasks for the request inherit): how long it may still wait, the version at its
first admission and at its latest output (its stamps), and why it was refused, if it was.
"""

from __future__ import annotations

import contextvars
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from weightsync.engine.adapters import Adapters
from weightsync.engine.serving import ServingGate
from weightsync.errors import DeadlineExceeded, EngineError, FencedError, WeightSyncError
from weightsync.types import EngineState, EngineStatus

S = EngineState


class Served(Protocol):
    """What the HTTP path reads of its engine host (``engine.host.EngineHost``)."""

    @property
    def gate(self) -> ServingGate: ...

    @property
    def version(self) -> int: ...

    @property
    def engine(self) -> Any: ...

    @property
    def adapters(self) -> Adapters: ...

    def status(self) -> EngineStatus: ...


@dataclass
class Ticket:
    """One HTTP request on its way through vLLM. ``deadline``: monotonic time until which it
    may wait for a closed gate; ``first``/``last``: the engine's version when its first
    sub-request was admitted and when its latest output came (None: none yet); ``refused``:
    why it was not admitted; ``adapter``: the LoRA adapter version it ran on
    (``<name>@v<N>``), if it named one."""

    deadline: float
    first: int | None = None
    last: int | None = None
    refused: WeightSyncError | None = None
    adapter: str | None = None

    def left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def admitted(self, version: int) -> None:
        if self.first is None:
            self.first = version
        self.produced(version)

    def produced(self, version: int) -> None:
        self.last = version if self.last is None else max(self.last, version)


#: the HTTP request being served (``engine.openai_guard`` sets it around vLLM's app)
TICKET: contextvars.ContextVar[Ticket | None] = contextvars.ContextVar("ws_ticket",
                                                                      default=None)


def unavailable(status: EngineStatus) -> WeightSyncError | None:
    """Why requests must not wait for this engine now: fenced, not running, or asleep with no
    sync holding it (nothing will wake it). None when it serves or will serve after the sync,
    pause or trainer step that closed its gate."""
    if status.state == S.FENCED:
        return FencedError(f"fenced: {status.fenced_reason}", engine=status.name)
    if status.state in (S.STARTING, S.STOPPED):
        return EngineError(f"engine is {status.state.value}", engine=status.name)
    if status.state in (S.ASLEEP, S.WEIGHTS_AWAKE) and status.owner is None:
        return EngineError("engine is asleep and no sync holds it: wake it up first",
                           engine=status.name)
    return None


def retry_after(status: EngineStatus) -> int:
    """Seconds a refused client should wait: the last sync's duration, at least 1."""
    return max(1, math.ceil(status.last_sync.get("total", 1.0)))


async def wait_routable(host: Served, wait_s: float) -> None:
    """Until the host's gate is open, at most ``wait_s``; at once (no await) when it is open.
    Raises ``unavailable``'s error when the engine cannot serve (checked every second while
    waiting), ``DeadlineExceeded`` when the gate stayed closed."""
    end = time.monotonic() + wait_s
    while True:
        why = unavailable(host.status())
        if why is not None:
            raise why
        if host.gate.is_open:
            return
        left = end - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded(f"the engine did not serve within {wait_s:g}s (state "
                                   f"{host.status().state.value})", engine=host.status().name)
        try:
            await host.gate.wait_open(min(1.0, left))
        except TimeoutError:
            pass


class GatedEngineClient:
    """The ``AsyncLLM`` for vLLM's OpenAI app, ``generate`` gated (see the module's doc);
    every other attribute is the engine's own. ``wait_s``: how long a request not started by
    the guard may wait for a closed gate (every request the app serves comes through it)."""

    def __init__(self, engine: Any, host: Served, wait_s: float = 30.0) -> None:
        self._engine, self._host, self._wait_s = engine, host, wait_s

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    async def generate(self, prompt: Any, sampling_params: Any, request_id: str | None = None,
                       **kwargs: Any) -> AsyncIterator[Any]:
        ticket = TICKET.get()
        if ticket is None:
            ticket = Ticket(deadline=time.monotonic() + self._wait_s)
        try:
            await wait_routable(self._host, ticket.left())
        except WeightSyncError as e:
            ticket.refused = e
            raise
        lora = kwargs.get("lora_request")
        # an adapter of the host's (vLLM's app found its model name in the table the host
        # publishes: the version's own request): held, so it stays loaded until the end
        with self._host.adapters.use(None if lora is None else lora.lora_name) as held:
            if held is not None:
                ticket.adapter = held.served_as
            gate = self._host.gate
            gate.admit(1)  # no await since the gate was open: begin_sync waits for it
            ticket.admitted(self._host.version)
            async for out in gate.outputs(self._engine, prompt, sampling_params,
                                          request_id or uuid.uuid4().hex, **kwargs):
                ticket.produced(self._host.version)
                yield out
