"""weightsync: move freshly trained policy weights into vLLM engine fleets, verified.

The public surface is small on purpose:

- :class:`weightsync.coordinator.SyncCoordinator` — trainer-side sync over a fleet.
- :class:`weightsync.engine.actor.EngineActor` — a Ray actor hosting one vLLM engine.
- :mod:`weightsync.types` — the typed results every call returns.
"""

__version__ = "0.1.0"
