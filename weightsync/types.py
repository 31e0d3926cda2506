"""Typed values that cross process boundaries: manifests, plans, states, results.

Everything here is a frozen pydantic model, so wire data is parsed and validated at exactly one
boundary (``Model.model_validate_json``) and never travels as ``dict[str, Any]``.
"""

from __future__ import annotations

import enum
import hashlib
import math
from collections.abc import Mapping
from typing import Annotated, Any, Generic, Literal, Self, TypeVar, get_args

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    Strict,
    model_validator,
)

# dtype names as torch spells them (``str(torch.float32).removeprefix("torch.")``).
DTYPE_ITEMSIZE: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float64": 8,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
    "uint8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
    "bool": 1,
}

PauseMode = Literal["abort", "wait", "keep"]
T = TypeVar("T")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _dtype_name(v: object) -> object:
    """An unknown dtype is refused with the list of known ones."""
    if isinstance(v, str) and v not in DTYPE_ITEMSIZE:
        raise ValueError(f"unsupported dtype {v!r}; known: {sorted(DTYPE_ITEMSIZE)}")
    return v


# The schema lists the dtypes (an enum), so clients see what the service accepts.
DtypeName = Annotated[Literal["float32", "float16", "bfloat16", "float64", "float8_e4m3fn",
                              "float8_e5m2", "int8", "uint8", "int16", "int32", "int64", "bool"],
                      BeforeValidator(_dtype_name)]
# Strict: a shape is JSON integers, never "4", 4.0 or true (pydantic's lax mode takes all three)
Dim = Annotated[int, Strict(), Field(ge=0)]
assert set(get_args(get_args(DtypeName)[0])) == set(DTYPE_ITEMSIZE)


class TensorSpec(_Frozen):
    """Name, dtype and shape of one checkpoint-format tensor."""

    name: str = Field(min_length=1, max_length=1024)
    dtype: DtypeName
    shape: tuple[Dim, ...] = Field(max_length=8)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_ITEMSIZE[self.dtype]


class ParamSlot(TensorSpec):
    """A tensor's place inside a bucket: bytes ``[offset, offset + nbytes)``."""

    offset: int = Field(ge=0)


class Bucket(_Frozen):
    """One flat byte buffer carrying several tensors back to back (aligned offsets)."""

    index: int = Field(ge=0)
    nbytes: int = Field(ge=0)
    slots: tuple[ParamSlot, ...]

    @model_validator(mode="after")
    def _slots_fit(self) -> Bucket:
        end = 0
        for s in self.slots:
            if s.offset < end:
                raise ValueError(f"slot {s.name} overlaps the previous one in bucket {self.index}")
            end = s.offset + s.nbytes
        if end > self.nbytes:
            raise ValueError(f"bucket {self.index}: slots need {end} bytes, bucket has {self.nbytes}")
        return self


# the kernel layout (derived in transport.layout); here so that messages carry it without
# importing the transport
class KernelParam(BaseModel):
    """One vLLM parameter and the checkpoint tensors stacked (dim 0) to form it: ``rows`` count
    in the parameter viewed as ``(-1, *part.shape[1:])``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    dtype: str
    shape: tuple[int, ...]
    parts: tuple[tuple[str, int], ...]  # (checkpoint name, rows), in order
    # A parameter vLLM quantizes on load (online FP8, per tensor): ``dtype``/``shape`` are then
    # what travels (the unquantized stack vLLM's loader builds, e.g. bf16 ``[N, K]``) and the
    # engine quantizes it into the parameter (its FP8 ``[K, N]`` transposed view) and into
    # this scale parameter, as vLLM's own ``process_weights_after_loading`` does.
    fp8_scale: str | None = None


class KernelLayout(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    params: tuple[KernelParam, ...]

    @property
    def signature(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]

    def spec(self, p: KernelParam) -> TensorSpec:
        return TensorSpec(name=p.name, dtype=p.dtype, shape=p.shape)


class _Kept(Generic[T]):
    """A value computed once from a model's fields and kept with the model (a private
    attribute), no part of its value: equal to any other, so ``==`` and ``hash`` compare the
    fields alone. Pydantic copies a private attribute by reference, so a copy shares it; a copy
    that changes the fields it was computed from gets its own (``_PlanFields.model_copy``)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: T | None = None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Kept)

    def __hash__(self) -> int:
        return 0


class _PlanFields(_Frozen):
    """What a plan says but its version: a ``PlanBody``'s fields, and a ``TransferPlan``'s
    with its version."""

    buckets: tuple[Bucket, ...]
    # "checkpoint": HF names, applied by vLLM's weight loaders; "kernel": vLLM parameter
    # names and fused layout, copied straight into the parameters (see transport.layout)
    format: Literal["checkpoint", "kernel"] = "checkpoint"
    # gloo: 0 = the group's broadcast; > 0 = a chain in chunks of this many bytes (the sender
    # to rank 1, each rank on to the next as chunks arrive; see transport.broadcast)
    chain_chunk: int = Field(0, ge=0)
    # The sender updates only some of the model's tensors, and said so. Without it, a plan must
    # carry every tensor of the engine's model (a partial one would serve mixed weights).
    partial: bool = False

    @property
    def total_bytes(self) -> int:
        return sum(b.nbytes for b in self.buckets)

    @property
    def specs(self) -> list[TensorSpec]:
        return [TensorSpec(name=s.name, dtype=s.dtype, shape=s.shape)
                for b in self.buckets for s in b.slots]

    @model_validator(mode="after")
    def _unique(self) -> Self:
        seen: set[str] = set()
        dup: set[str] = set()
        for s in (s for b in self.buckets for s in b.slots):  # one pass: linear in the names
            (dup if s.name in seen else seen).add(s.name)
        if dup:
            raise ValueError(f"tensor names sent twice: {sorted(dup)[:5]}")
        if [b.index for b in self.buckets] != list(range(len(self.buckets))):
            raise ValueError("bucket indices must be 0..n-1 in order")
        return self

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy. One that changes anything but a plan's version keeps nothing this one
        computed from its fields (``_Kept``: its body, that body's JSON)."""
        copy = super().model_copy(update=update, deep=deep)
        if update is not None and set(update) - {"version"}:
            for name in type(self).__private_attributes__:
                setattr(copy, name, _Kept())
        return copy


class PlanBody(_PlanFields):
    """A transfer plan but its version: the same from one sync to the next of one layout, so
    a receiver keeps it and its sender names it by key from then on (``weightsync.plan_wire``).
    Its JSON (pydantic's) and key are computed once, on first use; a receiver parses that JSON
    as a ``PlanBody`` (the same checks as a plan's) and makes each sync's plan with ``at``."""

    _dumped: _Kept[tuple[str, str]] = PrivateAttr(default_factory=_Kept)

    @property
    def json_text(self) -> str:
        """This body's JSON, dumped once."""
        return self._dump()[0]

    @property
    def key(self) -> str:
        """What names this body on the wire: a hash of its JSON."""
        return self._dump()[1]

    def _dump(self) -> tuple[str, str]:
        kept = self._dumped
        if kept.value is None:
            text = self.model_dump_json()
            kept.value = (text, hashlib.blake2b(text.encode(), digest_size=12).hexdigest())
        return kept.value

    def at(self, version: int) -> TransferPlan:
        """The plan of this body at ``version``: the body is not validated again (it was, as
        this body), the version is checked here."""
        if version < 1:
            raise ValueError(f"a plan's version is 1 or more, not {version}")
        plan = TransferPlan.model_construct(version=version, **dict(self))
        plan._body.value = self
        return plan


class TransferPlan(_PlanFields):
    """What the sender will send, in order. Both ends derive their work from this one value."""

    version: int = Field(ge=1)

    # the plans of one layout differ only in their version (``at``): they share one body,
    # whose JSON is dumped once for all of them
    _body: _Kept[PlanBody] = PrivateAttr(default_factory=_Kept)

    def body(self) -> PlanBody:
        """This plan but its version: made once for this plan and its copies at other
        versions."""
        kept = self._body
        if kept.value is None:  # (not validated again: these fields were, as this plan's)
            kept.value = PlanBody.model_construct(
                **{name: getattr(self, name) for name in PlanBody.model_fields})
        return kept.value

    def at(self, version: int) -> TransferPlan:
        """This plan at ``version``, sharing its body (``body``): each sync of one layout."""
        return self.body().at(version)


class CheckpointFiles(_Frozen):
    """A checkpoint an engine loads: exactly these files (real paths, resolved and checked by
    ``weightsync.checkpoint``). ``partial``: the caller asked to change only some tensors."""

    files: tuple[str, ...] = Field(min_length=1)
    partial: bool = False
    check_finite: bool = True  # refuse a file holding NaN or Inf before loading any tensor
    # the engine's load roots: each file, once opened, must still lie inside them
    roots: tuple[str, ...] = ()
    # load the files the worker checked and kept open with this identity (``CheckedFiles``);
    # None: open, check and load in one call
    identity: str | None = None


class EngineState(str, enum.Enum):
    """Where an engine is in the sync protocol. ``FENCED`` engines are not routable."""

    STARTING = "starting"
    SERVING = "serving"
    PAUSED = "paused"
    ASLEEP = "asleep"
    WEIGHTS_AWAKE = "weights_awake"
    LOADING = "loading"
    FENCED = "fenced"
    STOPPED = "stopped"


# an engine in one of these is inside a sync (or asleep for one): only its owner drives it
IN_SYNC = frozenset({EngineState.PAUSED, EngineState.ASLEEP, EngineState.WEIGHTS_AWAKE,
                     EngineState.LOADING})


class Canary(_Frozen):
    """An end-to-end check of a sync, on request: the trainer's logprobs of ``token_ids[1:]``
    (each given the tokens before it, teacher-forced) under the weights it sends. Every engine
    computes the same after its load and before the commit; a gap over ``tolerance`` at any
    position fails the sync on that engine as a checksum mismatch would, after the weights
    were applied: that engine is fenced. ``weightsync.canary.reference`` computes one from a
    transformers model. Tolerances that fit: fp32 on CPU ~1e-4 (engine and trainer agree to
    ~1e-6 there); bf16 on a GPU, a few times the gap measured between the engine and the
    trainer on the first sync (kernels differ: 1e-2 to 1e-1 is common)."""

    token_ids: tuple[int, ...] = Field(min_length=2, max_length=8192)
    logprobs: tuple[float, ...]
    tolerance: float = Field(gt=0)

    @model_validator(mode="after")
    def _one_per_token(self) -> Canary:
        if len(self.logprobs) != len(self.token_ids) - 1:
            raise ValueError(f"{len(self.logprobs)} logprobs for {len(self.token_ids)} tokens: "
                             "one for each token after the first")
        if not all(math.isfinite(x) and x <= 0 for x in self.logprobs):
            raise ValueError("reference logprobs must be finite and <= 0")
        return self


class CanaryReply(_Frozen):
    """One engine's canary: the largest gap to the reference and where it is."""

    max_gap: float
    position: int
    seconds: float


class FinishReply(_Frozen):
    """Caches reset (or found clean) and the loaded weights fingerprinted: one digest per
    worker (each holds its own slice of the weights), and the engine's shape
    (``EngineWorkers.shape``): only engines of one shape can agree digest for digest."""

    fingerprint: str
    seconds: dict[str, float]
    skipped: tuple[str, ...] = ()
    fingerprints: tuple[str, ...] = ()  # per worker, in rank order
    shape: str = "tp1xpp1x1"
    # what the load left behind that the engine restored or rebuilt (``engine.derived``)
    rebuilt: tuple[str, ...] = ()


class ReceiveReport(_Frozen):
    """What an engine's worker says after receiving (and, when streaming, applying) a plan.

    A worker that applied fingerprints what it loaded in the same call (``fingerprint``); the
    engine's report carries ``finish`` when nothing else stands between the load and commit
    (no cache to reset): the coordinator then skips ``finish_load``; and ``commit`` when the
    engine also committed in that call (``ReceiveRequest.commit_version``): no ``commit``
    follows."""

    nbytes: int
    checksums: tuple[int, ...]  # one per bucket, as received (by the engine's worker 0)
    # every worker's checksums, in rank order, when the engine has more than one worker:
    # each received the plan on its own and is verified on its own
    rank_checksums: tuple[tuple[int, ...], ...] = ()
    applied: bool  # True once reload_weights consumed every tensor (streaming)
    seconds: dict[str, float] = Field(default_factory=dict)
    fingerprint: str | None = None  # the worker's, when it applied
    rebuilt: tuple[str, ...] = ()  # what the worker restored or rebuilt after its load
    finish: FinishReply | None = None  # the engine's verify step, when done with the apply
    commit: dict[str, float] | None = None  # the commit's seconds, when it committed too


def exclusive_phases(seconds: dict[str, float]) -> dict[str, float]:
    """The phases of ``EngineSyncReport.seconds`` that add up to its ``total`` (stacked in
    plots): without ``total`` itself, sums of other phases (``transfer+reload``) and the
    transfer's sub-phases (``transfer.*``, parts of ``transfer``)."""
    return {p: s for p, s in seconds.items()
            if p != "total" and "+" not in p and "." not in p}


class EngineSyncReport(_Frozen):
    """One engine's outcome in one fleet sync."""

    engine: str
    ok: bool
    version: int  # the version the engine serves after this sync
    seconds: dict[str, float] = Field(default_factory=dict)
    skipped: tuple[str, ...] = ()  # phases skipped and why, e.g. "sleep: unsupported on cpu"
    # derived state the engine had to restore or rebuild after the load (a tied head's
    # CPU pack, a parameter vLLM re-created): ``weightsync.engine.derived``
    rebuilt: tuple[str, ...] = ()
    nbytes: int = 0
    checksum_ok: bool | None = None
    fingerprint: str | None = None
    error: str | None = None
    fenced: bool = False


class SyncResult(_Frozen):
    """A fleet sync's result: the version it published and what every engine did."""

    version: int
    ok: bool
    mode: str = Field(description="The transfer leg that moved the weights (broadcast, ipc, "
                                  "external, ...), or checkpoint for a reload from files")
    layout: Literal["checkpoint", "kernel"] = "checkpoint"
    layout_note: str | None = None  # why the kernel layout was not used, when it was not
    partial: bool = False  # the caller asked to update only some of the model's tensors
    nbytes: int
    sender_checksums: tuple[int, ...] = ()
    engines: tuple[EngineSyncReport, ...]
    seconds: dict[str, float] = Field(default_factory=dict)

    @property
    def failed(self) -> list[str]:
        return [e.engine for e in self.engines if not e.ok]


class EngineSleepReport(_Frozen):
    """One engine's part of a fleet ``sleep``."""

    engine: str
    level: int
    freed_bytes: int | None = None  # device-wide free memory after minus before (None: CPU)
    free_after: int | None = None
    seconds: dict[str, float] = Field(default_factory=dict)
    skipped: tuple[str, ...] = ()  # e.g. "sleep: sleep mode is CUDA-only ..."


class SleepResult(_Frozen):
    """A fleet ``sleep``: every engine it put to sleep, and what that freed."""

    level: int
    engines: tuple[EngineSleepReport, ...]
    seconds: dict[str, float] = Field(default_factory=dict)


class EngineStatus(_Frozen):
    """What an engine reports about itself (status page, /status, coordinator)."""

    name: str
    state: EngineState
    version: int
    device: str
    sleep_supported: bool
    sleep_level: int = 0
    fenced_reason: str | None = None
    last_sync: dict[str, float] = Field(default_factory=dict)
    model: str
    version_seen: int = 0  # the highest version any sync here was for, published or not
    owner: str | None = None  # the coordinator whose sync holds the engine, if one does
    lease_left_s: float | None = None  # until its lease lapses (negative: lapsed)
    openai_url: str | None = None  # its vLLM OpenAI app, once serving (``serve_openai``)


class GenerationResult(_Frozen):
    """One finished request, stamped with the weight version(s) that produced it.

    ``version`` is set when one version produced every token; a request that lived across a
    sync in ``keep`` mode has ``version=None`` and the two versions in ``versions``.
    """

    prompt: str | None = None
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...] = ()
    finish_reason: str | None = None
    version: int | None
    versions: tuple[int, int]
    aborted: bool = False
    adapter: str | None = None  # the LoRA adapter version that served it ("<name>@v<N>")
