"""The LoRA adapters one engine serves, by name and version (#31).

Each adapter sync loads a new version ``<name>@v<N>`` from memory into every worker
(``ws_load_adapter``) under a vLLM id never used before (``stage``: not servable yet), then
makes it what ``<name>`` resolves to (``commit``), or unloads it again (``abort``). A fleet
sync (``SyncCoordinator.sync_adapter``) stages the same N on every engine and commits only
if all staged; ``sync`` is both phases on one engine.

A fleet commit can be undone (``abort`` of the committed version) until the name's next
stage: ``<name>`` resolves to its previous version again, with the versions that commit
retired kept loaded until then, so a commit that failed on another engine leaves every
engine as it was. A fleet commit must also be settled (``settle``) within its ``settle_s``:
one that is not (its coordinator died mid-commit, before it learned that every engine
committed) undoes itself, and a settle that comes after that answers False, so the
coordinator undoes it everywhere. Before undoing itself it asks the other engines of the flip
(``outcome``): if any was settled, every engine committed and the commit stands here too (its
coordinator died part-way through the settle round); an engine asked while its own commit is
unsettled undoes it at once, so a settle reaching it later fails and no engine keeps a
version another one undid. A committed number is never used again here (vLLM's
prefix cache is keyed by the adapter's name, and requests ran on it); a number only staged
is (nothing ran on it).

The last ``keep`` versions of a name stay loaded (pinned), so a request that named an older
one, or started on it, finishes there; older ones are unloaded once no request of this host
uses them. Each version has its own vLLM name and id, so vLLM's prefix cache,
keyed by the adapter's name, never serves one version's KV cache to another.

A refusal (engine without LoRA, too few adapter slots, bad bytes, an adapter that does not fit
the model) changes nothing: ``<name>`` stays on its previous version.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from weightsync.adapters import (
    AdapterLoad,
    AdapterLoaded,
    AdapterManifest,
    AdapterState,
    AdapterSyncReply,
    LoadedAdapters,
    OverGroup,
)
from weightsync.config import EngineSpec
from weightsync.engine import vllm_lora
from weightsync.engine.peers import ask_outcome
from weightsync.engine.worker_calls import WorkerCalls
from weightsync.errors import (
    ConfigError,
    IllegalStateError,
    ManifestError,
    StaleVersionError,
    WeightSyncError,
)
from weightsync.messages import Ack
from weightsync.transport.ipc import IpcBucketHandle

logger = logging.getLogger(__name__)

# (peer engine, name, version, seconds to wait) -> its ``outcome``, None if it cannot answer
AskPeer = Callable[[str, str, int, float], Awaitable[str | None]]

_MEMORY = "weightsync-memory://"  # the path vLLM is given: never read (loaded from memory)


@dataclass(frozen=True)
class AdapterVersion:
    name: str
    version: int
    lora_int_id: int

    @property
    def served_as(self) -> str:
        return f"{self.name}@v{self.version}"

    def request(self) -> Any:
        """vLLM's ``LoRARequest`` for this version."""
        return vllm_lora.lora_request(self.served_as, self.lora_int_id,
                                        _MEMORY + self.served_as)


class Adapters:
    """The engine's adapter versions. Invariants: ``_latest[name]`` is in ``_loaded``; every
    version in ``_loaded`` or ``_retired`` is loaded in every worker; a retired version is no
    longer resolvable and is unloaded once ``_in_use`` of it is 0 and no undo holds it
    (``_undo``); ids are never reused, and neither is a version number once committed."""

    def __init__(self, spec: EngineSpec, calls: WorkerCalls,
                 ask_peer: AskPeer = ask_outcome) -> None:
        self.engine_name = spec.name
        self.calls = calls
        self._ask_peer = ask_peer  # another engine of a flip: what became of its commit
        args = spec.engine_args
        self.enabled = bool(args.get("enable_lora", False))
        self.keep = spec.lora_versions_kept
        # vLLM's defaults: max_loras 1, max_cpu_loras = max_loras
        self._slots = min(int(args.get("max_loras", 1)),
                          int(args.get("max_cpu_loras") or args.get("max_loras", 1)))
        self._next_id = 1
        self._latest: dict[str, AdapterVersion] = {}
        self._loaded: dict[str, AdapterVersion] = {}  # by served_as
        self._retired: dict[str, AdapterVersion] = {}
        self._staged: dict[str, AdapterVersion] = {}  # by name: loaded, not yet committed
        self._in_use: Counter[str] = Counter()
        # by name, what undoing its last fleet commit restores: the version it displaced and
        # the versions it retired (held loaded), until the name's next stage
        self._undo: dict[str, tuple[AdapterVersion | None, list[AdapterVersion]]] = {}
        self._committed: dict[str, int] = {}  # by name, the highest version ever committed
        self._unsettled: dict[str, int] = {}  # by name, a fleet commit not settled yet
        self._timers: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()
        self._listeners: list[Callable[[], None]] = []

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` whenever what ``requests`` returns changes (a commit, a version
        unloaded, the adapters a weight load dropped)."""
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            try:
                listener()
            except Exception:  # a listener never fails an adapter sync
                logger.warning("engine %s: an adapter listener failed", self.engine_name,
                               exc_info=True)

    def requests(self) -> dict[str, Any]:
        """Each name a request may give -> vLLM's ``LoRARequest`` it runs with: ``<name>``
        its latest version's, every kept ``<name>@v<N>`` its own."""
        out = {v.served_as: v.request() for v in self._loaded.values()}
        out.update({n: v.request() for n, v in self._latest.items()})
        return out

    def resolve(self, name: str) -> AdapterVersion:
        """``<name>``: its latest committed version; ``<name>@v<N>``: that version, while kept."""
        v = self._latest.get(name) or self._loaded.get(name)
        if v is None:
            known = sorted([*self._latest, *self._loaded])
            raise ConfigError(f"no adapter {name!r} is served here (served: {known})",
                              engine=self.engine_name)
        return v

    @contextmanager
    def use(self, name: str | None) -> Iterator[AdapterVersion | None]:
        """The version ``name`` resolves to now, held (never unloaded) until the block ends."""
        if name is None:
            yield None
            return
        v = self.resolve(name)
        self._in_use[v.served_as] += 1
        try:
            yield v
        finally:
            self._in_use[v.served_as] -= 1
            if not self._in_use[v.served_as]:
                del self._in_use[v.served_as]

    def served(self) -> dict[str, str]:
        """Each adapter name -> the version it resolves to."""
        return {n: v.served_as for n, v in self._latest.items()}

    def highest(self, name: str) -> int:
        """The highest version of ``name`` here: kept, retired, staged or ever committed (0:
        none)."""
        held = [*self._loaded.values(), *self._retired.values(), *self._staged.values()]
        return max([self._committed.get(name, 0), *(v.version for v in held if v.name == name)])

    async def state(self, deadline_s: float) -> AdapterState:
        """What this engine holds, the workers asked for the vLLM ids they hold."""
        held = await self.calls.rpc("ws_loaded_adapters", reply=LoadedAdapters,
                                    timeout=deadline_s) if self.enabled else []
        names = {v.name for t in (self._loaded, self._retired, self._staged) for v in t.values()}
        names |= self._committed.keys()  # (numbers committed once are never used again)
        return AdapterState(served=self.served(), kept=tuple(sorted(self._loaded)),
                            staged=tuple(sorted(v.served_as for v in self._staged.values())),
                            highest={n: self.highest(n) for n in sorted(names)},
                            held_ids=tuple(sorted({i for h in held for i in h.ids})))

    async def sync(self, manifest_json: str, buf: Any, deadline_s: float) -> AdapterSyncReply:
        """One engine on its own: stage the next version of the adapter and commit it."""
        manifest = AdapterManifest.model_validate_json(manifest_json)
        async with self._lock:
            staged = await self._stage(manifest, buf, self.highest(manifest.name) + 1,
                                       deadline_s)
            done = await self._commit(manifest.name, staged.version, deadline_s,
                                      undoable=False)
        return done.model_copy(update={"nbytes": staged.nbytes,
                                       "seconds": staged.seconds + done.seconds})

    async def stage(self, manifest_json: str, buf: Any, version: int,
                    deadline_s: float, over_group: OverGroup | None = None,
                    over_ipc: IpcBucketHandle | None = None) -> AdapterSyncReply:
        """Phase one of a fleet-wide sync: load ``<name>@v<version>`` on every worker under a
        new vLLM id, not yet servable (``<name>`` still resolves to its committed version).
        ``version`` is the coordinator's, the same on every engine: refused
        (``StaleVersionError``) unless above every version of the name here. An earlier
        staged version of the name (its coordinator never committed it) is unloaded first.
        ``over_group`` (``buf`` None): the workers receive the bytes from the transfer group
        they are in, sent by the coordinator once they are called; ``over_ipc`` (``buf``
        None): they are on the workers' GPU, shared by the colocated trainer."""
        manifest = AdapterManifest.model_validate_json(manifest_json)
        async with self._lock:
            return await self._stage(manifest, buf, version, deadline_s, over_group, over_ipc)

    async def commit(self, name: str, version: int, deadline_s: float,
                     settle_s: float | None = None,
                     peers: Sequence[str] = ()) -> AdapterSyncReply:
        """Phase two: ``<name>`` resolves to the staged ``version``; the versions beyond
        ``keep`` are retired (no longer resolvable) and stay loaded until the name's next
        stage, so that ``abort`` can undo this commit. ``settle_s``: unless ``settle`` comes
        within that many seconds, the commit undoes itself (``abort``) unless one of
        ``peers`` (the flip's other engines) says it was settled there."""
        async with self._lock:
            reply = await self._commit(name, version, deadline_s, undoable=True)
            if settle_s is not None:
                self._unsettled[name] = version
                task = asyncio.create_task(self._expire(name, version, settle_s, deadline_s,
                                                        tuple(peers)))
                self._timers.add(task)
                task.add_done_callback(self._timers.discard)
            return reply

    async def settle(self, name: str, version: int) -> bool:
        """Phase three: every engine committed ``<name>@v<version>``, so the commit stands
        (still undoable by ``abort`` until the name's next stage). False if it undid itself
        already (not settled in time) or is not what the name resolves to."""
        async with self._lock:
            if self._unsettled.get(name) == version:
                del self._unsettled[name]
                return True
            latest = self._latest.get(name)
            return latest is not None and latest.version == version

    async def outcome(self, name: str, version: int, deadline_s: float) -> str:
        """Another engine of the flip of ``<name>@v<version>`` asks, its settle deadline
        passed: ``"settled"`` (it stands here); ``"undone"`` (never committed here, undone,
        or unsettled until now: undone at once, and a settle after this answers False)."""
        async with self._lock:
            latest = self._latest.get(name)
            if latest is None or latest.version != version:
                return "undone"
            if self._unsettled.get(name) != version:
                return "settled"
            if name in self._undo:
                logger.warning("engine %s: a peer asked about adapter %s, not settled here "
                               "yet: undoing it", self.engine_name, latest.served_as)
                await self._uncommit(latest, deadline_s)
            else:
                del self._unsettled[name]
            return "undone"

    async def _expire(self, name: str, version: int, settle_s: float, deadline_s: float,
                      peers: tuple[str, ...]) -> None:
        await asyncio.sleep(settle_s)
        if self._unsettled.get(name) != version:
            return
        wait = min(deadline_s, settle_s)
        answers = await asyncio.gather(*(self._ask_peer(p, name, version, wait)
                                         for p in peers))
        async with self._lock:
            if self._unsettled.get(name) != version:
                return
            del self._unsettled[name]
            latest = self._latest.get(name)
            if latest is None or latest.version != version or name not in self._undo:
                return
            settled = [p for p, a in zip(peers, answers, strict=True) if a == "settled"]
            if settled:  # every engine committed: its coordinator died mid-settle round
                logger.warning("engine %s: adapter %s was not settled within %.1fs, but %s "
                               "settled it: it stands", self.engine_name, latest.served_as,
                               settle_s, settled)
                return
            logger.warning("engine %s: adapter %s was not settled within %.1fs (its "
                           "coordinator went silent mid-commit): undoing it", self.engine_name,
                           latest.served_as, settle_s)
            await self._uncommit(latest, deadline_s)

    async def abort(self, name: str, version: int, deadline_s: float) -> bool:
        """Undo ``<name>@v<version>`` wherever it got to: unload it if staged; if it is the
        committed version and its commit is still undoable (no stage of the name since),
        ``<name>`` resolves to its previous version again (none before v1), the versions the
        commit retired are kept again, and ``version`` is retired. False if there was nothing
        to undo (never staged, already undone, or a later stage came): idempotent."""
        async with self._lock:
            v = self._staged.get(name)
            if v is not None and v.version == version:
                del self._staged[name]
                await self._unload(v.lora_int_id, deadline_s)
                logger.info("engine %s: staged adapter %s aborted", self.engine_name,
                            v.served_as)
                return True
            latest = self._latest.get(name)
            if latest is None or latest.version != version or name not in self._undo:
                return False
            await self._uncommit(latest, deadline_s)
        return True

    async def _uncommit(self, v: AdapterVersion, deadline_s: float) -> None:
        if self._unsettled.get(v.name) == v.version:
            del self._unsettled[v.name]
        previous, retired = self._undo.pop(v.name)
        self._retired[v.served_as] = self._loaded.pop(v.served_as)
        for old in retired:  # held loaded by the undo: kept again
            self._loaded[old.served_as] = self._retired.pop(old.served_as)
        if previous is None:
            del self._latest[v.name]
        else:
            self._latest[v.name] = previous
        removed = await self._sweep(deadline_s)
        self._changed()
        logger.info("engine %s: adapter %s undone: %r resolves to %s again; unloaded %s",
                    self.engine_name, v.served_as, v.name,
                    previous.served_as if previous else "nothing", removed)

    async def _stage(self, manifest: AdapterManifest, buf: Any, version: int,
                     deadline_s: float, over_group: OverGroup | None = None,
                     over_ipc: IpcBucketHandle | None = None) -> AdapterSyncReply:
        t0 = time.perf_counter()
        name = manifest.name
        try:
            load = AdapterLoad(manifest=manifest, lora_int_id=self._next_id, version=version,
                               over_group=over_group, over_ipc=over_ipc)
        except ValueError as e:
            raise ManifestError(f"adapter {name}@v{version}: {e}",
                                engine=self.engine_name) from None
        try:
            await self._make_room(name, version, deadline_s)
        except WeightSyncError:
            # refused; bytes sent over the group are still taken: every rank of a collective
            # must take part, or its sender waits out its deadline
            if over_group is not None:
                await self.calls.rpc("ws_drain_adapter", load.model_dump_json(), reply=Ack,
                                     timeout=deadline_s)
            raise
        self._next_id += 1  # (a failed load's id is not reused either)
        try:
            t_rpc = time.perf_counter()
            loaded = await self.calls.rpc("ws_load_adapter", load.model_dump_json(),
                                          buf.numpy().tobytes() if load.in_call else None,
                                          reply=AdapterLoaded, timeout=deadline_s)
            t_rpc = time.perf_counter() - t_rpc
        except WeightSyncError:
            if self.calls.engine is not None:  # another worker may have loaded it
                await self._unload(load.lora_int_id, deadline_s)
            raise
        v = self._staged[name] = AdapterVersion(name, version, load.lora_int_id)
        logger.info("engine %s: adapter %s staged (id %d, %d bytes%s)", self.engine_name,
                    v.served_as, v.lora_int_id, manifest.bucket.nbytes,
                    " over the transfer group" if over_group else
                    " over CUDA IPC" if over_ipc else "")
        keys = loaded[0].seconds if loaded else {}
        steps = {k: max(w.seconds.get(k, 0.0) for w in loaded) for k in keys}
        steps["worker_rpc"] = t_rpc  # the workers' steps and vLLM's RPC there and back
        return AdapterSyncReply(name=name, version=version, served_as=v.served_as,
                                lora_int_id=v.lora_int_id, nbytes=manifest.bucket.nbytes,
                                removed=(), seconds=time.perf_counter() - t0, steps=steps)

    async def _make_room(self, name: str, version: int, deadline_s: float) -> None:
        """Refuse a stage that cannot be, and make room for one that can: unload an older
        stage of the name (its coordinator never committed it) and what an undo holds."""
        highest = self.highest(name)
        if version <= highest:
            raise StaleVersionError(f"adapter {name!r}: version {version} is not above "
                                    f"{highest}, the highest here", engine=self.engine_name)
        stale = self._staged.pop(name, None)
        if stale is not None:  # staged by a sync that never committed it
            await self._unload(stale.lora_int_id, deadline_s)
        unsettled = self._unsettled.get(name)
        latest = self._latest.get(name)
        if unsettled is not None and latest is not None and latest.version == unsettled:
            # its coordinator never settled it (it died mid-commit, or this is a second
            # coordinator of the name): undone here, as its timer would
            await self._uncommit(latest, deadline_s)
        if self._undo.pop(name, None) is not None:  # the last commit stands: let go of what
            await self._sweep(deadline_s)  # it retired before counting the slots
        if self._pinned() >= self._slots and self._undo:  # other names' settled undos give way
            self._undo = {n: u for n, u in self._undo.items() if n in self._unsettled}
            await self._sweep(deadline_s)
        self._check_ready()

    async def _commit(self, name: str, version: int, deadline_s: float, *,
                      undoable: bool) -> AdapterSyncReply:
        t0 = time.perf_counter()
        v = self._staged.get(name)
        if v is None or v.version != version:
            raise IllegalStateError(f"adapter {name}@v{version} is not staged here (staged: "
                                    f"{sorted(s.served_as for s in self._staged.values())})",
                                    engine=self.engine_name)
        del self._staged[name]
        displaced = self._latest.get(name)
        previous = sorted((p for p in self._loaded.values() if p.name == name),
                          key=lambda p: p.version)  # (an undo re-inserts older ones)
        self._loaded[v.served_as] = self._latest[name] = v
        self._committed[name] = max(self._committed.get(name, 0), version)
        retired = previous[:max(0, len(previous) + 1 - self.keep)]
        for old in retired:
            self._retired[old.served_as] = self._loaded.pop(old.served_as)
        if undoable:
            self._undo[name] = (displaced, retired)
        removed = await self._sweep(deadline_s)
        self._changed()
        logger.info("engine %s: adapter %s committed; unloaded %s", self.engine_name,
                    v.served_as, removed)
        return AdapterSyncReply(name=name, version=version, served_as=v.served_as,
                                lora_int_id=v.lora_int_id, nbytes=0, removed=tuple(removed),
                                seconds=time.perf_counter() - t0)

    async def weights_replaced(self, deadline_s: float) -> None:
        """After a full-weight load: vLLM's reload unloads every adapter (its
        ``reset_lora_state``), so the versions the workers no longer hold are forgotten (a
        name whose latest version is gone resolves to nothing until its next sync)."""
        if not (self._loaded or self._retired):
            return
        try:
            held = await self.calls.rpc("ws_loaded_adapters", reply=LoadedAdapters,
                                        timeout=deadline_s)
            ids = set.intersection(*(set(h.ids) for h in held))
        except WeightSyncError:  # unknown: forget them all (a request for one vLLM dropped
            # would make it read the version's made-up path)
            logger.warning("engine %s: the adapters loaded after a weight load are unknown; "
                           "forgetting them all", self.engine_name, exc_info=True)
            ids = set()
        for table in (self._loaded, self._retired, self._staged):
            for key in [k for k, v in table.items() if v.lora_int_id not in ids]:
                del table[key]
        self._undo.clear()  # the weights under every adapter changed: no commit is undone
        self._unsettled.clear()
        self._latest = {n: v for n, v in self._latest.items() if v.served_as in self._loaded}
        self._changed()

    def _check_ready(self) -> None:
        if not self.enabled:
            raise ManifestError("the engine was started without LoRA: start it with "
                                "engine_args {'enable_lora': true, 'max_lora_rank': ..., "
                                "'max_loras': ...}", engine=self.engine_name)
        pinned = self._pinned() + 1
        if pinned > self._slots:
            raise ConfigError(f"an adapter sync needs {pinned} adapter slots here (the kept "
                              f"versions, {self.keep} per name, and the new one): the engine "
                              f"has max_loras/max_cpu_loras {self._slots}",
                              engine=self.engine_name)

    def _pinned(self) -> int:
        return len(self._loaded) + len(self._retired) + len(self._staged)

    async def _sweep(self, deadline_s: float) -> list[str]:
        """Unload the retired versions no request and no undo holds."""
        held = {v.served_as for _, retired in self._undo.values() for v in retired}
        gone = [v for name, v in self._retired.items()
                if not self._in_use[name] and name not in held]
        for v in gone:
            await self._unload(v.lora_int_id, deadline_s)
            del self._retired[v.served_as]
        return [v.served_as for v in gone]

    async def _unload(self, lora_int_id: int, deadline_s: float) -> None:
        try:
            await self.calls.rpc("ws_remove_adapter", lora_int_id, reply=Ack, timeout=deadline_s)
        except WeightSyncError:
            logger.warning("engine %s: unloading adapter id %d failed", self.engine_name,
                           lora_int_id, exc_info=True)
