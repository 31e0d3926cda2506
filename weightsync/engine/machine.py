"""The engine's state (``types.EngineState``) and why it is fenced, for one engine host.

Every change of either goes through ``EngineMachine``: the serving gate opens when the engine
serves and closes when it is fenced (it closes earlier on its own when a pause or sleep begins),
and a fenced engine names its reason until a commit serves again.
"""

from __future__ import annotations

import logging

from weightsync.engine.serving import ServingGate
from weightsync.errors import EngineError, FencedError, IllegalStateError
from weightsync.types import EngineState

logger = logging.getLogger(__name__)

S = EngineState


class EngineMachine:
    def __init__(self, name: str, gate: ServingGate) -> None:
        self.name, self._gate = name, gate
        self.state = S.STARTING
        self.fenced_reason: str | None = None

    def expect(self, *states: EngineState, op: str) -> None:
        """Refuse ``op`` (``IllegalStateError``) unless the engine is in one of ``states``."""
        if self.state not in states:
            raise IllegalStateError(
                f"cannot {op} while {self.state.value} (needs {'/'.join(s.value for s in states)})",
                engine=self.name)

    def require_routable(self) -> None:
        if self.state == S.FENCED:
            raise FencedError(f"fenced: {self.fenced_reason}", engine=self.name)
        if self.state in (S.STARTING, S.STOPPED):
            raise EngineError(f"engine is {self.state.value}", engine=self.name)

    def serve(self, *, unfence: bool = False) -> None:
        """Serve (a start, a resume, a commit: ``unfence``, or a rolled-back sync)."""
        if unfence:
            self.fenced_reason = None
        self.state = S.SERVING
        self._gate.open()

    def loading(self) -> None:
        """A load began changing the weights (a fenced engine stays fenced until it commits)."""
        if self.state != S.FENCED:
            self.state = S.LOADING

    def fence(self, reason: str) -> None:
        self.state = S.FENCED
        self.fenced_reason = reason
        self._gate.close()
        logger.error("engine %s fenced: %s", self.name, reason)
