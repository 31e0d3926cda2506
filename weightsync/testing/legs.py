"""The test legs, registered when this module is imported (``tests/conftest.py`` does).

- ``loopback``: buckets handed to engines in the trainer's own process (``testing.loopback``;
  the in-process fleet of ``testing.fleet``).
- ``corrupt-one-rank``: the broadcast leg with one worker's copy of bucket 0 corrupted, on real
  engines (``testing.faulty``).
- ``ipc-false-checksums``: the IPC leg telling the engines checksums that differ from what it
  sent (``testing.faulty``); its receiver is the IPC leg's own.

Real engines resolve a test leg's receiver in their own workers: they must be started with
``EngineSpec(leg_modules=MODULES)``, so that their workers import this module at start too.
Nothing else makes an engine import it.
"""

from __future__ import annotations

from weightsync.transport.legs import register_leg

MODULES = (__name__,)
"""``EngineSpec.leg_modules`` for engines that tests sync through a test leg."""

register_leg("loopback", "weightsync.testing.loopback", "LoopbackLeg", "LoopbackReceiver")
register_leg("corrupt-one-rank", "weightsync.testing.faulty", "CorruptOneRankLeg",
             "CorruptOneRankReceiver")
register_leg("ipc-false-checksums", "weightsync.testing.faulty", "FalseChecksumsIpcLeg",
             "IpcReceiver")
