"""The transfer-leg registry: public, lazy, duplicate-checked; test legs come from the test
package, and an engine learns them only from its own start-up environment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from weightsync.errors import ConfigError
from weightsync.transport.legs import (
    receiver_leg,
    register_leg,
    registered_legs,
    sender_leg,
)

REPO = Path(__file__).resolve().parents[2]


def _python(code: str, **env: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, env={**os.environ, **env}, check=True)
    return out.stdout.strip()


def test_a_registered_leg_resolves_lazily_and_a_name_is_registered_once():
    register_leg("unit-lazy", "weightsync.testing.no_such_module", "S", "R")  # not imported
    assert "unit-lazy" in registered_legs()
    with pytest.raises(ValueError, match="already registered"):
        register_leg("unit-lazy", "weightsync.transport.legs.broadcast", "BroadcastLeg",
                     "GroupReceiver")
    with pytest.raises(ValueError, match="already registered"):
        register_leg("broadcast", "x", "S", "R")  # nor a built-in one
    with pytest.raises(ModuleNotFoundError):
        sender_leg("unit-lazy")  # imported only now


def test_an_unknown_leg_is_a_config_error_naming_the_known_ones():
    with pytest.raises(ConfigError, match="unknown transfer leg 'nope'.*broadcast"):
        sender_leg("nope")
    with pytest.raises(ConfigError, match="unknown transfer leg 'nope'"):
        receiver_leg("nope")


def test_the_test_legs_are_registered_by_the_test_package():
    assert {"loopback", "corrupt-one-rank", "ipc-false-checksums"} <= set(registered_legs())
    assert sender_leg("loopback").__module__ == "weightsync.testing.loopback"
    assert receiver_leg("corrupt-one-rank").__name__ == "CorruptOneRankReceiver"
    assert receiver_leg(sender_leg("ipc-false-checksums").receiver).__name__ == "IpcReceiver"


def test_production_knows_the_built_in_legs_only():
    code = ("from weightsync.transport.legs import registered_legs; "
            "import weightsync.coordinator, weightsync.engine.host; print(registered_legs())")
    assert _python(code) == "['broadcast', 'external', 'ipc']"


def test_an_engine_learns_test_legs_only_from_the_modules_its_spec_names():
    """A worker resolving a leg by name (what a request carries) imports nothing: an engine
    knows the test legs only after ``import_leg_modules(EngineSpec.leg_modules)`` at start."""
    code = ("import sys; from weightsync.transport.legs import receiver_leg, import_leg_modules\n"
            "from weightsync.errors import ConfigError\n"
            "try:\n    print(receiver_leg('corrupt-one-rank').__name__)\n"
            "except ConfigError:\n    print('unknown')\n"
            "print('weightsync.testing.legs' in sys.modules)\n"
            "import_leg_modules(['weightsync.testing.legs'])\n"
            "print(receiver_leg('corrupt-one-rank').__name__)")
    assert _python(code).split() == ["unknown", "False", "CorruptOneRankReceiver"]
