"""A plan's buckets from a receiver leg to the applier chosen for it.

Packed buckets are checked on arrival, every one against the sender's checksums (``expected``)
and for non-finite values, then streamed into the applier, staged for ``ws_apply_staged``, or
(``atomic``) all verified first and applied in the same call. An applier that checks what it
copies (``Applier.checks_copies``) is handed every bucket at once instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import torch

from weightsync.engine.appliers import AppliedReport, Applier, Load
from weightsync.engine.finite import require_finite
from weightsync.engine.sync_state import Staged, WorkerSyncState
from weightsync.errors import ReloadError, TransferError, VerificationError
from weightsync.messages import ApplyMode, ReceiveRequest
from weightsync.transport.legs.base import Incoming
from weightsync.transport.packing import checksum, packed_only, unpack_bucket
from weightsync.types import Bucket, ReceiveReport, TransferPlan


class Intake:
    """One receive (or apply) on one worker. ``fingerprint()``: the worker's digest of its
    weights as loaded, taken in the call that loads them."""

    def __init__(self, state: WorkerSyncState, fingerprint: Callable[[], str]) -> None:
        self.state = state
        self.fingerprint = fingerprint

    def receive(self, plan: TransferPlan, incoming: Incoming, request: ReceiveRequest,
                applier: Applier, key: str | None) -> ReceiveReport:
        """``incoming`` into ``applier`` as ``request`` asks (``key``: the copy program's)."""
        if applier.checks_copies:
            return self._checked_by_copy(plan, incoming, request, applier, key)
        return self.consume(plan, incoming.buckets, request.apply, applier, key=key,
                            expected=incoming.expected, known=incoming.known,
                            check_finite=request.check_finite)

    def consume(self, plan: TransferPlan, stream: Iterator[tuple[Bucket, torch.Tensor]],
                apply: ApplyMode, applier: Applier, *, key: str | None = None,
                expected: list[int] | None = None, known: list[int] | None = None,
                check_finite: bool = True) -> ReceiveReport:
        """Check every bucket of ``stream`` against ``expected`` (the sender's checksums) and
        stage or apply it. ``known``: the buckets' checksums, already computed by the leg."""
        if apply == "atomic" and expected is None:
            raise TransferError("atomic apply needs the sender's checksums")
        sums: list[int] = []
        seconds: dict[str, float] = {}
        nbytes = 0

        def checked() -> Iterator[tuple[Bucket, torch.Tensor]]:
            nonlocal nbytes
            for bucket, buf in stream:
                if known is not None:
                    sums.append(known[bucket.index])
                else:
                    t = time.perf_counter()
                    sums.append(checksum(buf))
                    seconds["checksum"] = seconds.get("checksum", 0.0) + time.perf_counter() - t
                if expected is not None and sums[-1] != expected[bucket.index]:
                    raise VerificationError(f"bucket {bucket.index}: checksum differs from the "
                                            "sender's; nothing applied from it")
                if check_finite and apply == "streaming":  # (staged: all at once, below)
                    t = time.perf_counter()
                    require_finite(unpack_bucket(bucket, buf), f"bucket {bucket.index}")
                    seconds["finite"] = seconds.get("finite", 0.0) + time.perf_counter() - t
                nbytes += buf.numel()
                yield bucket, buf

        st = self.state
        st.staged = None
        applied = False
        stream = packed_only(stream)  # (direct: an applier that checks_copies)
        if apply == "streaming":
            applier.apply(Load(stream=checked()))
            applied = True
        else:
            st.staged = Staged(list(checked()), applier, key)
        if len(sums) != len(plan.buckets):
            st.staged = None
            raise TransferError(f"received {len(sums)} of {len(plan.buckets)} buckets")
        if check_finite and st.staged is not None:  # every staged tensor, one read-back
            t = time.perf_counter()
            try:
                require_finite((nt for b, buf in st.staged.buckets
                                for nt in unpack_bucket(b, buf)), "the update")
            except VerificationError:
                st.staged = None
                raise
            seconds["finite"] = time.perf_counter() - t
        if apply == "atomic":  # every bucket is here and verified: load in this call
            seconds["reload"] = self.apply_staged()[0].reload_s
            applied = True
        fingerprint = self.timed_fingerprint(seconds) if applied else None
        return ReceiveReport(nbytes=nbytes, checksums=tuple(sums), applied=applied,
                             fingerprint=fingerprint, seconds=seconds,
                             rebuilt=st.rebuilt if applied else ())

    def _checked_by_copy(self, plan: TransferPlan, incoming: Incoming,
                         request: ReceiveRequest, applier: Applier, key: str | None
                         ) -> ReceiveReport:
        """Every direct bucket handed over at once, checked by the applier as it copies."""
        if request.apply != "atomic" or plan.format != "kernel" or \
                incoming.expected_terms is None:
            raise TransferError("a direct share (the sender's own storages) is for a kernel-"
                                "layout plan applied atomically, with the sender's checksums")
        self.state.staged = None
        staged = list(incoming.buckets)
        if len(staged) != len(plan.buckets):
            raise TransferError(f"received {len(staged)} of {len(plan.buckets)} buckets")
        report = applier.apply(Load(staged=staged, key=key,
                                    expected_terms=incoming.expected_terms,
                                    sender_nonfinite=incoming.sender_nonfinite,
                                    check_finite=request.check_finite))
        seconds = {"reload": report.reload_s}
        if request.check_finite:  # (part of the reload here: checked before the copy)
            seconds["finite"] = report.finite_s
        fingerprint = self.timed_fingerprint(seconds)
        return ReceiveReport(nbytes=report.nbytes, checksums=report.checksums or (),
                             applied=True, fingerprint=fingerprint, seconds=seconds)

    def apply_staged(self) -> tuple[AppliedReport, str]:
        """Load what was staged, by the applier chosen for its plan; returns its report and
        the format loaded."""
        staged = self.state.take_staged()
        if staged is None or not staged.buckets:
            raise ReloadError("nothing staged to apply")
        report = staged.applier.apply(Load(staged=staged.buckets, key=staged.key))
        return report, staged.applier.layout

    def timed_fingerprint(self, seconds: dict[str, float]) -> str:
        """The weights just loaded, fingerprinted in the same call (the sync's verify step
        needs no call of its own); its seconds go to ``seconds["fingerprint"]``."""
        t = time.perf_counter()
        digest = self.fingerprint()
        seconds["fingerprint"] = time.perf_counter() - t
        return digest
