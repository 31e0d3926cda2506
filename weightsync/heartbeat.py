"""A coordinator's heartbeat: it keeps the engines it holds (``weightsync.engine.lease``).

While a sync runs, and while engines sleep for this coordinator's trainer (the colocated loop:
``sleep`` -> train -> ``sync``), one daemon thread renews the lease on each of them every third
of its length. If the trainer's process dies, the beats stop and every engine ends what it was
held for by itself. The thread runs only while something is held.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from weightsync.remote import Engines

logger = logging.getLogger(__name__)


class Heartbeat:
    """Renews the lease of what it holds, as ``engines`` sign (the coordinator's owner id)."""

    def __init__(self, engines: Engines, lease_s: float) -> None:
        self.engines, self.lease_s = engines, lease_s
        self._syncing: set[str] = set()
        self.asleep: set[str] = set()  # engines asleep for this coordinator
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> set[str]:
        with self._lock:
            return self._syncing | self.asleep

    @contextmanager
    def syncing(self, names: Iterable[str]) -> Iterator[None]:
        """Hold ``names`` for the body (a sync). Never waits for a beat to end: a renewal
        waiting on a silent engine must not delay the sync's result."""
        names = set(names)
        with self._lock:
            self._syncing |= names
        self._ensure()
        try:
            yield
        finally:
            with self._lock:
                self._syncing -= names

    def holds_asleep(self, names: Iterable[str]) -> bool:
        """Every engine of ``names`` sleeps for this coordinator (held since its ``sleep``)."""
        with self._lock:
            return set(names) <= self.asleep

    def sleeping(self, names: Iterable[str], asleep: bool) -> None:
        """Hold ``names`` while they sleep for this coordinator (``asleep``), or stop."""
        with self._lock:
            if asleep:
                self.asleep |= set(names)
            else:
                self.asleep -= set(names)
        self._ensure()

    def close(self) -> None:
        """Stop beating: what this coordinator holds lapses within one lease."""
        self._stop.set()

    def _ensure(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="ws-lease", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            with self._lock:
                names = self._syncing | self.asleep
                if not names:  # _ensure starts a new thread once something is held again
                    self._thread = None
                    return
            try:
                self.engines.each(names, lambda n: self.engines.renew_lease(n, self.lease_s),
                                  self.lease_s / 3)
            except Exception:
                logger.warning("lease renewal failed", exc_info=True)
