"""An engine's workers, reply by reply: every worker of a tensor- or pipeline-parallel engine
answers every ``collective_rpc``, and every answer counts.

``EngineHost`` calls these on the list of replies it gets (one per worker, in rank order):
each worker received the plan on its own, loaded its own slice of the weights and fingerprints
that slice, so one worker's word is never taken for the engine's. A worker's error already
fails the call (``EngineHost._rpc``); here the replies that did come back are checked against
each other and folded into the engine's one reply, keeping what the coordinator needs to
verify each worker (``ReceiveReport.rank_checksums``, ``FinishReply.fingerprints``).
"""

from __future__ import annotations

from collections.abc import Sequence

from weightsync.errors import EngineError, ReloadError, VerificationError
from weightsync.messages import (
    ApplyReply,
    EngineWorkers,
    Fingerprint,
    GpuMemory,
    LayoutStatus,
    TensorDigests,
    WorkerInfo,
)
from weightsync.types import FinishReply, ReceiveReport


def check_workers(infos: Sequence[WorkerInfo], engine: str) -> EngineWorkers:
    """The engine's workers from their ``ws_info`` replies: exactly ranks ``0 .. n-1`` of an
    engine of ``n`` workers, or ``EngineError`` (a transfer group sized from this would be
    wrong)."""
    n = len(infos)
    ranks = [i.rank for i in infos]
    if ranks != list(range(n)) or any(i.workers != n for i in infos):
        raise EngineError(f"workers report ranks {ranks} of {[i.workers for i in infos]} "
                          f"workers; expected ranks 0..{n - 1} of {n}", engine=engine)
    first = infos[0]
    return EngineWorkers(workers=n, tensor_parallel=first.tensor_parallel,
                         pipeline_parallel=first.pipeline_parallel,
                         device_uuids=tuple(i.device_uuid for i in infos))


def _slowest(seconds: Sequence[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for s in seconds:
        for k, v in s.items():
            out[k] = max(out.get(k, 0.0), v)
    return out


def merge_receipts(reports: Sequence[ReceiveReport], engine: str) -> ReceiveReport:
    """One engine's receipt: worker 0's checksums plus every worker's (``rank_checksums``,
    verified one by one by the coordinator), applied only if every worker applied."""
    if len(reports) == 1:
        return reports[0]
    applied = {r.applied for r in reports}
    if len(applied) != 1:  # every worker ran the same apply mode; a mix is a bug, not a state
        raise EngineError(f"workers disagree on whether they applied: "
                          f"{[r.applied for r in reports]}", engine=engine)
    return ReceiveReport(nbytes=min(r.nbytes for r in reports), checksums=reports[0].checksums,
                         rank_checksums=tuple(r.checksums for r in reports),
                         applied=applied.pop(), seconds=_slowest([r.seconds for r in reports]))


def merge_applies(replies: Sequence[ApplyReply], engine: str) -> ApplyReply:
    """Every worker applied its staged buckets: the slowest load, in the one format all used."""
    layouts = {r.layout for r in replies}
    if len(layouts) != 1:
        raise ReloadError(f"workers applied different formats: {[r.layout for r in replies]}",
                          engine=engine)
    return ApplyReply(reload=max(r.reload for r in replies), layout=layouts.pop())


def merge_fingerprints(prints: Sequence[Fingerprint], workers: EngineWorkers | None, *,
                       seconds: dict[str, float], skipped: tuple[str, ...] = ()) -> FinishReply:
    """Every worker's digest of its own slice, in rank order, and the engine's shape: engines
    agree only with engines of the same shape, worker by worker."""
    digests = tuple(p.digest for p in prints)
    shape = workers.shape if workers is not None else f"tp1xpp1x{len(digests)}"
    rebuilt = tuple(dict.fromkeys(n for p in prints for n in p.rebuilt))
    return FinishReply(fingerprint="|".join(digests), fingerprints=digests, shape=shape,
                       seconds=seconds, skipped=skipped, rebuilt=rebuilt)


def merge_tensor_digests(replies: Sequence[TensorDigests]) -> TensorDigests:
    """One engine's ``TensorDigests``: a single worker's as it is, several workers' with
    ``w<rank>/`` before each name."""
    if len(replies) == 1:
        return replies[0]
    return TensorDigests(
        digests={f"w{i}/{n}": d for i, r in enumerate(replies) for n, d in r.digests.items()},
        unregistered=tuple(f"w{i}/{n}" for i, r in enumerate(replies) for n in r.unregistered),
        opaque=tuple(f"w{i}/{n}" for i, r in enumerate(replies) for n in r.opaque))


def merge_memory(readings: Sequence[GpuMemory], workers: EngineWorkers | None) -> GpuMemory:
    """The engine's device memory over all its workers: ``free``/``total`` once per GPU (they
    are device-wide: two workers on one GPU see the same), ``allocated``/``reserved`` summed
    (each worker's own process; ``peak_allocated`` too, an upper bound: the workers' peaks
    need not coincide). A tensor-parallel engine's sleep frees memory on every GPU it
    spans, and its report must count all of them."""
    if len(readings) == 1:
        return readings[0]
    if any(r.free is None for r in readings):
        return GpuMemory()
    uuids = workers.device_uuids if workers is not None and \
        len(workers.device_uuids) == len(readings) else tuple(range(len(readings)))
    per_gpu = {u: r for u, r in zip(uuids, readings, strict=True)}
    return GpuMemory(free=sum(r.free for r in per_gpu.values()),
                     total=sum(r.total for r in per_gpu.values()),
                     allocated=sum(r.allocated or 0 for r in readings),
                     reserved=sum(r.reserved or 0 for r in readings),
                     peak_allocated=None if any(r.peak_allocated is None for r in readings)
                     else sum(r.peak_allocated or 0 for r in readings))


def merge_layouts(statuses: Sequence[LayoutStatus], workers: EngineWorkers | None
                  ) -> LayoutStatus:
    """The kernel-layout fast path for the engine. A plan carries one kernel layout for every
    receiver, while each worker of a tensor-parallel engine holds its own slice of every
    sharded parameter (its own shapes): such an engine takes checkpoint format, which every
    worker's loader slices for itself, and the reason says so."""
    if len(statuses) == 1:
        return statuses[0]
    n = len(statuses)
    tp = workers.tensor_parallel if workers is not None else n
    own = "; ".join(sorted({s.reason for s in statuses if not s.candidate}))
    return LayoutStatus(
        candidate=False, verified=False,
        reason=f"tensor-parallel engine ({n} workers, tp={tp}): each worker holds its own "
               "slice of the sharded parameters, and a kernel-layout plan is one layout for "
               "every worker; checkpoint format is sliced by each worker's loader"
               + (f" (also: {own})" if own else ""))


# ---- the coordinator's side: every worker verified ----------------------------------------------
def verify_receipt(receipt: ReceiveReport, sums: Sequence[int], engine: str
                   ) -> tuple[VerificationError | None, bool]:
    """Check every worker's checksums against the sender's: (the error, whether to fence).

    An engine whose workers all got the same wrong bytes is treated like any failed transfer
    (it rolls back with the fleet). One whose workers disagree — some intact, some not, from the
    same broadcast — is at fault itself: it is fenced, and the error names the worker(s)."""
    per_worker = receipt.rank_checksums or (receipt.checksums,)
    want = tuple(sums)
    wrong = {}
    for rank, got in enumerate(per_worker):
        if tuple(got) != want:
            wrong[rank] = [i for i, (a, b) in enumerate(zip(got, want)) if a != b] or "count"
    if not wrong:
        return None, False
    if len(per_worker) == 1:
        return VerificationError(f"checksums differ from the sender's in bucket(s) {wrong[0]}",
                                 engine=engine), False
    where = "; ".join(f"worker rank {r}/{len(per_worker)}: bucket(s) {b}"
                      for r, b in wrong.items())
    fence = len(wrong) < len(per_worker)
    return VerificationError(
        f"checksums differ from the sender's ({where})"
        + ("; its other workers received them intact: the engine is fenced" if fence else ""),
        engine=engine), fence


def disagreeing(prints: dict[str, FinishReply]) -> dict[str, VerificationError]:
    """Engines whose loaded weights differ from the majority of the engines of their shape,
    worker by worker (engines of different shapes hold different slices: each shape agrees
    within itself; an engine alone in its shape is verified by its checksums only)."""
    shapes: dict[str, list[str]] = {}
    for n, reply in prints.items():
        shapes.setdefault(reply.shape, []).append(n)
    out = {}
    for shape, names in shapes.items():
        digests = [prints[n].fingerprints or (prints[n].fingerprint,) for n in names]
        if len(set(digests)) <= 1:
            continue
        major = max(set(digests), key=digests.count)
        for n, d in zip(names, digests, strict=True):
            if d != major:
                ranks = [r for r, (a, b) in enumerate(zip(d, major)) if a != b]
                which = f" (worker rank(s) {ranks} of {shape})" if len(d) > 1 else ""
                out[n] = VerificationError(
                    f"loaded weights differ from the rest of the fleet{which}", engine=n)
    return out
