"""Each load format's applier on its own, over a small torch model (no vLLM): what it writes,
what it keeps across syncs, and what it refuses. The real-engine paths run in
tests/integration (CPU) and tests/gpu (graph replay, direct IPC)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from weightsync.engine.appliers import Load, choose
from weightsync.engine.copy_program import CopyPrograms
from weightsync.engine.layout_check import LayoutCheck
from weightsync.engine.sync_state import WorkerSyncState
from weightsync.errors import ReloadError, VerificationError
from weightsync.transport.layout import LayoutUnavailable, derive_layout
from weightsync.transport.packing import (
    digest_terms,
    direct_pieces,
    pack_bucket,
    piece_views,
    plan_buckets,
    span_views,
    spec_of,
)
from weightsync.types import TensorSpec


class _Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.norm = torch.nn.LayerNorm(8)


class _Runner:
    """vLLM's model runner as far as the appliers use it: a loader by name."""

    def __init__(self) -> None:
        self.model, self.reloads = _Model(), 0

    def get_model(self) -> torch.nn.Module:
        return self.model

    def reload_weights(self, weights_iterator=None, is_checkpoint_format=True,
                       weights_path=None) -> None:
        self.reloads += 1
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, t in weights_iterator or ():
                params[name].copy_(t)


def _specs(model: torch.nn.Module) -> dict[str, TensorSpec]:
    return {n: spec_of(n, p) for n, p in model.named_parameters()}


def _worker():
    worker = SimpleNamespace(model_runner=_Runner(), rank=0, device=torch.device("cpu"))
    model = worker.model_runner.model
    state = WorkerSyncState(layout=LayoutCheck(
        lambda: derive_layout(_specs(model), _specs(model), {}, set(), [])))
    return worker, state


def _new_weights(seed: int = 1) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {n: p.detach().clone() for n, p in _Model().named_parameters()}


def _staged(weights: dict[str, torch.Tensor]):
    plan = plan_buckets([spec_of(n, t) for n, t in weights.items()], bucket_bytes=200,
                        version=1)
    return plan, [(b, pack_bucket(b, weights, "cpu")) for b in plan.buckets]


def _loaded(worker, weights) -> bool:
    live = dict(worker.model_runner.model.named_parameters())
    return all(torch.equal(live[n], t) for n, t in weights.items())


def test_checkpoint_applier_loads_through_vllm_and_a_full_staged_load_verifies_the_layout():
    worker, state = _worker()
    weights = _new_weights()
    plan, staged = _staged(weights)
    applier = choose(worker, state, "checkpoint")
    assert not state.layout.status()[0].verified
    report = applier.apply(Load(staged=staged))
    assert _loaded(worker, weights) and worker.model_runner.reloads == 1
    assert report.rebuilt == () and report.checksums is None
    assert state.layout.status()[0].verified  # vLLM's load was our stacking, bit for bit
    state.reloaded_from_files()
    assert not state.layout.status()[0].verified  # re-derived, to be verified again


def test_a_streamed_or_partial_checkpoint_load_does_not_verify_the_layout():
    worker, state = _worker()
    weights = _new_weights()
    plan, staged = _staged(weights)
    applier = choose(worker, state, "checkpoint")
    applier.apply(Load(stream=iter(staged)))
    assert _loaded(worker, weights) and not state.layout.status()[0].verified
    applier.apply(Load(staged=staged[:1]))
    assert not state.layout.status()[0].verified


def test_a_layout_that_cannot_be_derived_is_no_candidate():
    def derive():
        raise LayoutUnavailable("quantized weights")

    check = LayoutCheck(derive)
    status, layout = check.status()
    assert not status.candidate and layout is None and "quantized" in status.reason


def test_kernel_applier_copies_into_the_parameters_and_keeps_its_program_by_key():
    worker, state = _worker()
    weights = _new_weights()
    plan, staged = _staged(weights)
    applier = choose(worker, state, "kernel")
    state.rebuilt = ("from before",)
    applier.apply(Load(staged=staged, key="plan:ipc"))
    assert _loaded(worker, weights) and worker.model_runner.reloads == 0 and state.rebuilt == ()
    kept = state.programs.program(staged, "plan:ipc", lambda: {})  # (no resolve: kept)
    assert state.programs.graph_key(kept) is not None
    other = _new_weights(2)
    for (_b, buf), (_, new) in zip(staged, _staged(other)[1], strict=True):
        buf.copy_(new)  # the same buffers, new bytes: the kept program copies them
    applier.apply(Load(staged=staged, key="plan:ipc"))
    assert _loaded(worker, other)
    state.programs.forget()
    assert state.programs.graph_key(kept) is None
    applier.apply(Load(stream=iter(_staged(weights)[1])))  # streaming: resolved as it comes
    assert _loaded(worker, weights)


def test_a_program_made_again_over_the_same_addresses_never_replays_the_old_graph():
    """The direct-IPC regression an H100 run found (illegal memory access): a program made
    again over the same buffers and parameters (after ``forget``, e.g. a packed sync between
    two direct ones) got the old program's graph key, so the old capture replayed and its
    launches read the old program's freed tensors. Each program made has its own key."""
    worker, state = _worker()
    plan, staged = _staged(_new_weights())
    params = lambda: dict(worker.model_runner.model.named_parameters())  # noqa: E731
    first = state.programs.program(staged, "plan:ipc", params)
    key = state.programs.graph_key(first)
    assert state.programs.graph_key(state.programs.program(staged, "plan:ipc", params)) == key
    state.programs.forget()
    again = state.programs.program(staged, "plan:ipc", params)  # same addresses, new program
    assert again is not first and state.programs.graph_key(again) not in (None, key)
    assert state.programs.graph_key(first) is None  # (no longer the kept one)


def test_kernel_applier_refuses_a_tensor_that_is_not_the_parameter():
    worker, state = _worker()
    weights = _new_weights()
    weights["norm.weight"] = torch.zeros(4)
    plan, staged = _staged(weights)
    with pytest.raises(ReloadError, match="norm.weight"):
        choose(worker, state, "kernel").apply(Load(staged=staged))
    programs = CopyPrograms()
    with pytest.raises(ReloadError):
        programs.program(staged, None, lambda: dict(worker.model_runner.model.named_parameters()))


def _direct(weights: dict[str, torch.Tensor]):
    """``weights`` as the direct path shares them: (plan, pieces, their spans per bucket,
    the staged (bucket, spans) pairs)."""
    plan = plan_buckets([spec_of(n, t) for n, t in weights.items()], bucket_bytes=200,
                        version=1)
    storages, pieces = direct_pieces(plan, weights, torch.device("cpu"))
    spans = piece_views(storages, pieces)
    return plan, pieces, spans, list(zip(plan.buckets, spans, strict=True))


def test_checked_by_copy_applier_writes_the_senders_memory_and_checks_what_it_wrote():
    worker, state = _worker()
    weights = _new_weights()
    plan, _, spans, staged = _direct(weights)
    terms = digest_terms(span_views(spans))
    applier = choose(worker, state, "kernel", checked_by_copy=True)
    report = applier.apply(Load(staged=staged, expected_terms=terms))
    assert _loaded(worker, weights) and len(report.checksums) == len(plan.buckets)
    assert report.nbytes == sum(s.numel() for s in spans)
    bad = terms.clone()
    bad[-1, 0] += 1  # the sender's checksum of its last piece differs from what was copied
    with pytest.raises(ReloadError, match=f"bucket {len(plan.buckets) - 1}"):
        applier.apply(Load(staged=staged, expected_terms=bad))
    weights["proj.weight"][0, 0] = float("nan")
    with pytest.raises(VerificationError, match="non-finite"):  # refused before anything is copied
        applier.apply(Load(staged=staged, expected_terms=terms))
    assert not torch.isnan(worker.model_runner.model.proj.weight).any()


def test_checked_by_copy_refuses_what_the_sender_flagged_and_reads_only_what_it_did_not():
    """The sender's finite flags (``ManyDigests`` with dtypes, from the reads its checksums
    came from) decide without the engine reading the pieces again: a flagged piece is refused
    with its parameter named, its bytes finite or not; -1 (an encoding the sender does not
    check) makes the engine read them itself; flags for other pieces are a transfer error."""
    from weightsync.errors import TransferError
    from weightsync.transport.digest_cuda import ManyDigests
    from weightsync.transport.packing import piece_dtypes

    worker, state = _worker()
    weights = _new_weights()
    plan, pieces, spans, staged = _direct(weights)
    sent = ManyDigests(span_views(spans), dtypes=piece_dtypes(plan, pieces)).terms()
    terms, flags = sent[:, :3], sent[:, 3]
    assert flags.tolist() == [0] * len(flags)
    applier = choose(worker, state, "kernel", checked_by_copy=True)
    before = {n: p.clone() for n, p in worker.model_runner.model.named_parameters()}
    lying = flags.clone()
    lying[-1] = 1  # the last piece, as if the sender had seen a NaN in it
    with pytest.raises(VerificationError, match="non-finite.*norm.bias"):
        applier.apply(Load(staged=staged, expected_terms=terms, sender_nonfinite=lying))
    after = dict(worker.model_runner.model.named_parameters())
    assert all(torch.equal(after[n], before[n]) for n in before)  # nothing copied
    with pytest.raises(TransferError, match="cover"):
        applier.apply(Load(staged=staged, expected_terms=terms, sender_nonfinite=flags[:-1]))
    assert applier.apply(Load(staged=staged, expected_terms=terms, sender_nonfinite=flags))
    assert _loaded(worker, weights)
    weights["proj.weight"][0, 0] = float("inf")
    unknown = torch.full_like(flags, -1)
    with pytest.raises(VerificationError, match="non-finite.*proj.weight"):
        applier.apply(Load(staged=staged, expected_terms=terms, sender_nonfinite=unknown))
