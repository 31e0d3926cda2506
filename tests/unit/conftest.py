"""Fixtures of the in-process fleet (``weightsync.testing.fleet``): protocol tests in
milliseconds on real engine hosts and workers, with only vLLM stood in for."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from weightsync.testing.fleet import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture()
def local_fleet(tiny_dir):
    """``make(workers=None, sleep_mode=False, **faults)`` -> a ``LocalEngines`` named after the
    faults given (``a``/``b`` without faults when none are); all closed after the test."""
    from weightsync.testing.fleet import Faults, LocalEngines

    made: list[LocalEngines] = []

    def make(workers: dict[str, int] | None = None, sleep_mode: bool = False,
             **faults: Faults) -> LocalEngines:
        names = workers or faults or {"a": 1, "b": 1}
        engines = LocalEngines(tiny_dir, {n: faults.get(n, Faults()) for n in names}, workers,
                               sleep_mode=sleep_mode)
        made.append(engines)
        return engines

    yield make
    for engines in made:
        engines.close()
