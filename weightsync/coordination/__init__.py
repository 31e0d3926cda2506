"""The parts ``weightsync.coordinator.SyncCoordinator`` is composed of, each owning its state
and the invariants that go with it:

- ``reach.Reach``: what every part reaches engines with (signed calls, deadlines, phase hook).
- ``states.FleetStatuses``: every engine's status as asked now, and the one state-requirement
  check (shared with the control plane's ``weightsync.api.fleet.Fleet``).
- ``versions.VersionBook``: which version is published and which numbers were issued; a number
  is never handed out twice.
- ``layout.LayoutNegotiator``: the plan a sync sends (kernel layout or checkpoint format) and
  whether every engine accepted it before any engine begins.
- ``attempt.SyncAttempt``: one sync of one set of engines from begin to commit or rollback;
  all-or-nothing, fencing whoever failed after its weights were touched.
- ``colocation.Colocation``: the colocated loop's sleep and wake.
- ``adapter_flip.AdapterFlip``: a LoRA adapter's next version staged on every engine, then
  committed everywhere or aborted everywhere.
"""
