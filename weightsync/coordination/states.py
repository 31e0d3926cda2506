"""Every engine's status as asked now, and the one check that engines are in a state for an
operation before anything is touched. The coordinator uses both (``FleetStatuses``); the
control plane (``weightsync.api.fleet.Fleet``) asks statuses its own way (awaited, for its
readers) and checks them here too (``require_states``, ``unreachable``)."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping

from weightsync.errors import IllegalStateError
from weightsync.remote import Engines, Pending
from weightsync.types import EngineState, EngineStatus


def unreachable(name: str, error: BaseException | str) -> EngineStatus:
    """How an engine that did not answer a status call shows: stopped, with why."""
    return EngineStatus(name=name, state=EngineState.STOPPED, version=-1, device="?",
                        sleep_supported=False, fenced_reason=str(error), model="?")


def require_states(statuses: Iterable[EngineStatus], allowed: Collection[EngineState], op: str,
                   names: Collection[str] | None = None) -> None:
    """Every engine of ``statuses`` (of ``names`` only, when given) is in an ``allowed`` state,
    or an ``IllegalStateError`` (409) naming the first that is not."""
    for st in statuses:
        if (names is None or st.name in names) and st.state not in allowed:
            raise IllegalStateError(
                f"cannot {op} while {st.state.value} (needs "
                f"{'/'.join(sorted(s.value for s in allowed))}); no engine was touched",
                engine=st.name)


class FleetStatuses:
    """The coordinator's engines' statuses, asked now under one deadline: an engine that does
    not answer shows as stopped (``unreachable``), never as an error."""

    def __init__(self, engines: Engines, timeout: float) -> None:
        self.engines, self.timeout = engines, timeout

    def ask(self) -> dict[str, Pending[EngineStatus]]:
        """Start asking every engine (``collect`` waits for the answers)."""
        return {n: self.engines.status(n) for n in self.engines.handles}

    def collect(self, asked: Mapping[str, Pending[EngineStatus]] | None = None
                ) -> list[EngineStatus]:
        """Every engine's status (``asked``: the calls ``ask`` already started)."""
        ok, bad = self.engines.wait(asked if asked is not None else self.ask(), self.timeout)
        return [*ok.values(), *(unreachable(n, e) for n, e in bad.items())]
