"""The fleet-wide, all-or-nothing flip of a LoRA adapter's name to its next version (#31).

One ``AdapterFlip.run`` per ``SyncCoordinator.sync_adapter``:

    ask each engine's versions -> N = 1 + the highest of the name anywhere
    -> stage <name>@vN everywhere (loaded, not served) -> all staged: commit everywhere
                                                       -> any failed: abort everywhere
    -> a commit failed anywhere: abort everywhere (the engines that committed undo it)
    -> all committed: settle everywhere (a commit not settled in time undoes itself)

so a refusal or a failure on any engine leaves ``<name>`` on v(N-1) on every engine, with vN
unloaded again. Where every engine that failed refused the input itself (``ConfigError``,
``ManifestError``: another base's shapes, a rank above ``max_lora_rank``, no LoRA) and every
abort succeeded, that refusal is raised as it is (HTTP 422 through the control plane); any
other failure is an ``AdapterSyncFailedError`` naming each engine's.

A commit only flips the host's table, so one fails after others succeeded when an engine
stops answering between the two phases, or another coordinator aborted its stage. The
engines that committed undo it (``Adapters.abort``: ``<name>`` back on v(N-1), vN never
used again); an engine that cannot be asked to (its state unknown) is fenced.

A trainer that dies mid-commit cannot undo anything: each commit therefore carries a settle
deadline (the coordinator's lease, ``Deadlines.lease``) and undoes itself unless the
coordinator, once every engine committed, settles it in time; a settle that comes too late
(the engine undid it) fails the flip, which then undoes it everywhere. An engine whose
deadline passed asks the flip's other engines first (``Adapters.outcome``): a trainer that
died part-way through the settle round settled some, and their answer keeps vN on the rest;
an engine asked while unsettled undoes its commit at once, so no engine is settled on a
version another one undid.
Engines asleep for this coordinator (its ``sleep``) stage with their weights woken and serve
from the commit on, as after a full sync. Rolling (``wave_size``), each wave is such a flip of
the same version, settled before the next wave stages; a failed wave stops the rollout.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import NoReturn

from weightsync.adapters import (
    WIRE_NAME,
    AdapterFleetResult,
    AdapterPayload,
    AdapterState,
    AdapterSyncReply,
    wire_plan,
)
from weightsync.coordination.reach import Reach, raise_refusal
from weightsync.errors import (
    AdapterSyncFailedError,
    ConfigError,
    IllegalStateError,
    WeightSyncError,
)
from weightsync.transport.legs.base import SenderLeg
from weightsync.transport.legs.broadcast import BroadcastLeg

logger = logging.getLogger(__name__)


class AdapterFlip:
    """Stages, then commits or aborts, one adapter version on a set of engines."""

    def __init__(self, reach: Reach, leg: Callable[[str], SenderLeg]) -> None:
        self.reach = reach
        self.leg = leg  # the coordinator's sender leg by name (kept across syncs)

    def states(self, targets: Sequence[str]) -> dict[str, AdapterState]:
        e, dl = self.reach.engines, self.reach.deadlines
        states, bad = e.each(targets, lambda n: e.adapter_state(n, dl.verify), dl.verify * 1.5)
        raise_refusal(bad)  # nothing changed anywhere
        return states

    def run(self, targets: Sequence[str], payload: AdapterPayload, leg: str | None = None,
            wave_size: int | None = None) -> AdapterFleetResult:
        """``leg``: None, the bytes go in the engine calls; ``"broadcast"``, over the
        coordinator's transfer group (``stage_over``); ``"ipc"``, shared on the trainer's
        GPU with colocated engines (``stage_ipc``).

        ``wave_size`` (rolling): the same version flips ``wave_size`` engines at a time, each
        wave all or nothing and settled before the next begins; a wave that fails is undone
        and stops the rollout, so the waves before it serve vN and the rest v(N-1)
        (``AdapterSyncFailedError``, its result's ``committed`` naming the former)."""
        if wave_size is not None and wave_size < 1:
            raise ConfigError(f"wave_size must be at least 1, not {wave_size}")
        t0 = time.perf_counter()
        name = payload.manifest.name
        group_leg = None if leg == "ipc" else self._group_leg(leg)
        states = self.states(targets)
        asked = time.perf_counter() - t0
        version = 1 + max(s.highest.get(name, 0) for s in states.values())
        size = wave_size or len(targets)
        waves = [list(targets[i:i + size]) for i in range(0, len(targets), size)]
        done: list[AdapterFleetResult] = []
        for i, wave in enumerate(waves):
            try:
                if i:  # (an engine's state may have moved while the waves before it flipped)
                    states = self.states(wave)
                done.append(self._flip(wave, payload, leg, group_leg, version, states, t0))
            except WeightSyncError as err:
                if not done:  # nothing committed anywhere: the error as it is
                    raise
                self._stopped(done, waves[i:], err, name, version, t0)
        replies = {n: r for res in done for n, r in res.replies.items()}
        phases = {"states": asked}
        for res in done:  # (each wave's, summed)
            for k, v in res.phases.items():
                phases[k] = phases.get(k, 0.0) + v
        result = AdapterFleetResult(
            name=name, version=version, ok=True, replies=replies,
            committed=tuple(sorted(replies)), seconds=time.perf_counter() - t0, phases=phases)
        logger.info("adapter %s@v%d committed on %s", name, version, list(result.committed))
        return result

    def _stopped(self, done: list[AdapterFleetResult], rest: list[list[str]],
                 err: WeightSyncError, name: str, version: int, t0: float) -> NoReturn:
        """A rolling flip's wave failed after earlier waves committed: say where each
        version is served and raise."""
        committed = tuple(sorted(n for res in done for n in res.committed))
        failed_wave = err.result if isinstance(err, AdapterSyncFailedError) else None
        result = AdapterFleetResult(
            name=name, version=version, ok=False, committed=committed,
            failed=failed_wave.failed if failed_wave is not None else {
                n: str(err) for n in rest[0]},
            aborted=failed_wave.aborted if failed_wave is not None else (),
            uncommitted=failed_wave.uncommitted if failed_wave is not None else (),
            replies={n: r for res in done for n, r in res.replies.items()},
            seconds=time.perf_counter() - t0)
        untouched = sorted(n for wave in rest[1:] for n in wave)
        raise AdapterSyncFailedError(
            f"rolling adapter sync of {name}@v{version} stopped at the wave {rest[0]}: {err}; "
            f"{committed} serve v{version}, {sorted(rest[0])} and the waves after it "
            f"({untouched}) v{version - 1}", engine=err.engine or rest[0][0], result=result)

    def _flip(self, targets: Sequence[str], payload: AdapterPayload, leg: str | None,
              group_leg: BroadcastLeg | None, version: int,
              states: Mapping[str, AdapterState], t0: float) -> AdapterFleetResult:
        """One wave: stage everywhere, then commit and settle everywhere, or undo."""
        e, dl = self.reach.engines, self.reach.deadlines
        name = payload.manifest.name
        manifest_json = payload.manifest.model_dump_json()
        t = time.perf_counter()
        self.reach.phase("adapter:stage", None)
        if group_leg is not None:
            staged, bad = self.stage_over(group_leg, targets, payload, version, states)
        elif leg == "ipc":
            staged, bad = self.stage_ipc(targets, payload, manifest_json, version)
        else:
            staged, bad = e.each(targets, lambda n: e.stage_adapter(
                n, manifest_json, payload.buf, version, dl.transfer), dl.transfer + dl.verify)
        if bad:
            return self._abort(targets, name, version, bad, t0)
        slowest = max(staged.values(), key=lambda r: r.seconds)
        phases = {"stage": time.perf_counter() - t, "stage_on_engine": slowest.seconds,
                  **{f"stage_on_engine.{k}": v for k, v in slowest.steps.items()}}
        t = time.perf_counter()
        self.reach.phase("adapter:commit", None)
        done, bad = e.each(targets, lambda n: e.commit_adapter(
            n, name, version, dl.verify, settle_s=dl.lease,
            peers=[p for p in targets if p != n]), dl.verify * 1.5)
        if bad:
            self._undo_commits(targets, name, version, sorted(done), bad, t0)
        phases["commit"] = time.perf_counter() - t
        t = time.perf_counter()
        self.reach.phase("adapter:settle", None)
        settled, bad = e.each(targets, lambda n: e.settle_adapter(n, name, version),
                              dl.verify)
        bad.update({n: IllegalStateError(
            f"adapter {name}@v{version} was not settled within {dl.lease}s of its commit: it "
            "undid itself", engine=n) for n, ok in settled.items() if not ok})
        if bad:
            self._undo_commits(targets, name, version, sorted(done), bad, t0)
        phases["settle"] = time.perf_counter() - t
        replies = {n: done[n].model_copy(update={"nbytes": staged[n].nbytes}) for n in done}
        return AdapterFleetResult(
            name=name, version=version, ok=True, committed=tuple(sorted(done)),
            replies=replies, seconds=time.perf_counter() - t0, phases=phases)

    def _group_leg(self, leg: str | None) -> BroadcastLeg | None:
        if leg is None:
            return None
        got = self.leg(leg)  # an unknown leg: ConfigError
        if not isinstance(got, BroadcastLeg):
            raise ConfigError(f"an adapter moves in the engine calls, over a transfer group "
                              f"(leg='broadcast') or over CUDA IPC (leg='ipc'), not over "
                              f"{leg!r}")
        return got

    def stage_over(self, leg: BroadcastLeg, targets: Sequence[str], payload: AdapterPayload,
                   version: int, states: Mapping[str, AdapterState]
                   ) -> tuple[dict[str, AdapterSyncReply], dict[str, WeightSyncError]]:
        """Phase one with the bytes sent once over the leg's group (the engines join it if
        they are not in it already; it stays open): every engine is asked to stage, then the
        payload's bytes are broadcast (or chained) as one bucket (``adapters.wire_plan``),
        which every worker receives and checks against the manifest's checksum. An engine
        that is not serving is refused before any byte moves (a collective needs every
        rank); one that refuses later still takes the bytes. Any failure closes the group."""
        e, dl = self.reach.engines, self.reach.deadlines
        idle: dict[str, WeightSyncError] = {
            n: IllegalStateError("cannot stage an adapter: the engine is not serving (paused, "
                                 "syncing, asleep or fenced)", engine=n)
            for n in targets if not states[n].serving}
        if idle:
            return {}, idle
        sender, bad = leg.sender_for(targets, {n: states[n].group_id for n in targets})
        if sender is None:
            return {}, bad
        manifest_json = payload.manifest.model_dump_json()
        pending = {n: e.stage_adapter(n, manifest_json, None, version, dl.transfer,
                                      chain_chunk=leg.chain_chunk) for n in targets}
        _, ok, bad, _ = leg.deliver(targets, sender,
                                    wire_plan(payload.manifest, version, leg.chain_chunk),
                                    {WIRE_NAME: payload.buf},
                                    lambda: e.wait(pending, dl.transfer * 1.6))
        return ok, bad

    def stage_ipc(self, targets: Sequence[str], payload: AdapterPayload, manifest_json: str,
                  version: int
                  ) -> tuple[dict[str, AdapterSyncReply], dict[str, WeightSyncError]]:
        """Phase one with the bytes on the trainer's GPU: one CUDA IPC share of the packed
        adapter (``transport.ipc``), which each colocated engine's workers map and copy; the
        buffer (``on_gpu``) lives until every stage answered."""
        import torch

        from weightsync.transport.ipc import share_bucket

        if not torch.cuda.is_available():
            raise ConfigError("leg='ipc' shares the adapter on the trainer's GPU: this process "
                              "has none")
        e, dl = self.reach.engines, self.reach.deadlines
        on_gpu = payload.on_gpu()
        torch.cuda.current_stream(on_gpu.buf.device).synchronize()  # packed before shared
        handle = share_bucket(0, on_gpu.buf).model_dump_json()
        return e.each(targets, lambda n: e.stage_adapter(
            n, manifest_json, None, version, dl.transfer, ipc=handle), dl.transfer + dl.verify)

    def _undo_commits(self, targets: Sequence[str], name: str, version: int,
                      committed: list[str], bad: dict[str, WeightSyncError],
                      t0: float) -> NoReturn:
        """The commit failed on ``bad`` after ``committed`` committed: undo vN everywhere
        (staged or committed); fence an engine that cannot be asked (what it serves is
        unknown); raise."""
        e, dl = self.reach.engines, self.reach.deadlines
        self.reach.phase("adapter:undo", None)
        undone, undo_bad = self._undo_everywhere(targets, name, version)
        fenced = sorted(undo_bad)
        if fenced:
            e.each(fenced, lambda n: e.fence(
                n, f"adapter {name}@v{version}: its commit and its undo failed "
                   f"({undo_bad[n]}): what it serves as {name!r} is unknown"), dl.verify)
        failed = {n: str(err) for n, err in bad.items()}
        failed.update({n: f"undo failed: {err}" for n, err in undo_bad.items()})
        result = AdapterFleetResult(
            name=name, version=version, ok=False, failed=failed,
            aborted=tuple(sorted(n for n, was in undone.items() if was)),
            uncommitted=tuple(fenced), seconds=time.perf_counter() - t0)
        where = f"every engine but {fenced} (fenced)" if fenced else "every engine"
        raise AdapterSyncFailedError(
            f"adapter {name}@v{version}: the commit failed on {sorted(bad)} "
            f"({'; '.join(failed[n] for n in sorted(bad))}) after {committed} committed; "
            f"undone on {list(result.aborted)}: {name!r} resolves to v{version - 1} on "
            f"{where}", engine=next(iter(bad)), result=result)

    def _undo_everywhere(self, targets: Sequence[str], name: str, version: int
                         ) -> tuple[dict[str, bool], dict[str, WeightSyncError]]:
        """``Adapters.abort`` of ``<name>@v<version>`` on every engine (idempotent: staged ->
        unloaded, committed -> undone, nothing -> False): (whether each undid it, failures)."""
        e, dl = self.reach.engines, self.reach.deadlines
        return e.each(targets, lambda n: e.abort_adapter(n, name, version, dl.verify),
                      dl.verify * 1.5)

    def _abort(self, targets: Sequence[str], name: str, version: int,
               bad: dict[str, WeightSyncError], t0: float) -> NoReturn:
        """Unload the staged version everywhere (idempotent: an engine that refused, or whose
        stage is still running, answers False or unloads it) and raise."""
        self.reach.phase("adapter:abort", None)
        aborted, abort_bad = self._undo_everywhere(targets, name, version)
        failed = {n: str(err) for n, err in bad.items()}
        for n, err in abort_bad.items():
            logger.warning("engine %s: aborting adapter %s@v%d failed: %s", n, name, version,
                           err)
            failed.setdefault(n, f"abort failed: {err}")
        result = AdapterFleetResult(
            name=name, version=version, ok=False, failed=failed,
            aborted=tuple(sorted(n for n, was in aborted.items() if was)),
            seconds=time.perf_counter() - t0)
        refusals = [err for err in bad.values() if isinstance(err, ConfigError)]
        if not abort_bad and len(refusals) == len(bad):  # bad input: refused as such (422)
            first = refusals[0]
            raise type(first)(f"{first.message} (adapter {name}@v{version} refused: nothing "
                              f"changed on any engine, {name!r} still resolves to "
                              f"v{version - 1})", engine=first.engine)
        left = f"still staged on {sorted(abort_bad)}" if abort_bad else "staged nowhere now"
        raise AdapterSyncFailedError(
            f"adapter {name}@v{version} was refused or failed on {failed}; {left} (aborted "
            f"on {list(result.aborted)}); {name!r} still resolves to v{version - 1} on every "
            f"engine", engine=next(iter(bad)), result=result)
