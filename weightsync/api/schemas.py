"""Request and response bodies of the control plane, shared by the service and the client.

Requests are frozen and forbid unknown fields, so a typo is a 422 and never a silent default.
Their scalars are strict (``StrictBool``, ``WireInt``, ``_integer_only``): ``"yes"`` is not
true, ``"1"`` or ``1.0`` is not 1, and ``true`` is not a sleep level; tensor shapes are strict in
``TensorSpec`` itself.
Engine, sync and status values reuse the library's own types (``weightsync.types``), so the
wire format and the library cannot drift apart.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    model_validator,
)

from weightsync.config import TransferConfig
from weightsync.types import EngineStatus, PauseMode, SyncResult, TensorSpec, TransferPlan

EngineName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.-]+$")]
EngineNames = Annotated[list[EngineName], Field(min_length=1, max_length=1024)]
# An IP literal or a DNS name: what the engines dial to reach a trainer's group.
HostName = Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[A-Za-z0-9.:_-]+$")]
WakeTags = Annotated[list[Literal["weights", "kv_cache"]], Field(min_length=1, max_length=2)]
SessionId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-f0-9]+$")]
# A JSON integer, nothing else: pydantic's lax mode would take "3", 3.0 and true for 3 / 1.
WireInt = Annotated[int, Strict()]


def _integer_only(v: object) -> object:
    """For integer ``Literal`` fields (pydantic has no strict ``Literal``; its lax one takes
    ``true`` and ``1.0`` for 1)."""
    if type(v) is not int:
        raise ValueError("must be a JSON integer")
    return v


SleepLevel = Annotated[Literal[0, 1, 2], BeforeValidator(_integer_only)]


class _Request(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Targeted(_Request):
    engines: EngineNames | None = Field(
        None, description="Engines to act on; all engines when omitted.")


class SleepRequest(Targeted):
    level: Annotated[Literal[1, 2], BeforeValidator(_integer_only)] = Field(
        1, description="1: offload weights, drop KV cache; 2: drop both (weights undefined "
                       "until reload)")
    mode: Literal["abort", "wait"] = Field("abort", description="requests in flight: abort "
                                           "them, or wait for them to finish first")


class WakeRequest(Targeted):
    tags: WakeTags | None = Field(None, description="What to wake; everything when omitted.")


class PauseRequest(Targeted):
    mode: PauseMode = Field("abort", description="abort in-flight requests, wait for them, "
                                                 "or keep them frozen until resume")


class ResumeRequest(Targeted):
    pass


class ReloadRequest(Targeted):
    path: str | None = Field(
        None, min_length=1, max_length=4096, pattern=r"^/[^\x00]*$",
        description="Absolute path of a safetensors checkpoint directory inside a configured "
                    "load root; the engines' original model when omitted.")
    pause_mode: PauseMode = "abort"
    partial: StrictBool = Field(
        False, description="Allow a checkpoint that holds only some of the model's tensors (the "
                           "others keep their current values; the result says partial). Without "
                           "it, a checkpoint must hold every tensor of the model.")


class AdapterReloadRequest(Targeted):
    path: str = Field(
        min_length=1, max_length=4096, pattern=r"^/[^\x00]*$",
        description="Absolute path of a peft adapter directory (save_pretrained's "
                    "adapter_config.json and adapter_model.safetensors) inside a configured "
                    "load root.")


class SessionRequest(Targeted):
    """Open a sync whose weights a trainer outside the Ray cluster broadcasts as rank 0."""

    tensors: Annotated[list[TensorSpec], Field(min_length=1, max_length=200_000)] = Field(
        description="Every tensor the trainer will send, in order (checkpoint names): all of "
                    "the model's tensors unless ``partial``.")
    host: HostName = Field("127.0.0.1", description="Address the engines dial to reach the "
                                                    "trainer, which hosts the group's store.")
    port: WireInt = Field(0, ge=0, le=65535, description="The trainer's store port; 0 lets "
                                                         "the service pick one (host must be "
                                                         "an IP literal local to the service).")
    pause_mode: PauseMode = "abort"
    sleep_level: SleepLevel = 0
    partial: StrictBool = Field(False, description="Send only some of the model's tensors")

    @model_validator(mode="after")
    def _names_once(self) -> SessionRequest:
        """A name listed twice is refused here, in one pass over a set (200,000 names: tens of
        milliseconds), before the fleet is claimed: the engines would refuse the plan anyway."""
        seen: set[str] = set()
        for spec in self.tensors:
            if spec.name in seen:
                raise ValueError(f"tensor {spec.name!r} is listed twice: name every tensor once")
            seen.add(spec.name)
        return self


Checksum = Annotated[int, Strict(), Field(ge=0, lt=1 << 64)]


class CommitRequest(_Request):
    checksums: Annotated[list[Checksum], Field(max_length=200_000)] = Field(
        description="The trainer's per-bucket checksums, as BroadcastSender.send returned them.")


class AbortRequest(_Request):
    reason: str = Field("aborted by the trainer", min_length=1, max_length=2000)


# ---- responses -----------------------------------------------------------------------------
class ErrorBody(BaseModel):
    code: str
    message: str
    engine: str | None = None
    result: SyncResult | None = None


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    engines: int


class EngineInfo(BaseModel):
    name: str
    model: str
    device: str
    sleep_supported: bool


class EngineList(BaseModel):
    engines: list[EngineInfo]


class EngineStates(BaseModel):
    """The engines an action touched, as they are after it."""

    engines: list[EngineStatus]


class SyncRecord(BaseModel):
    """One sync seen by this service, for the status page's chart."""

    version: int
    mode: str
    ok: bool
    at: float = Field(description="Unix time the sync finished")
    seconds: dict[str, float] = Field(description="Phase -> slowest engine's seconds")


class FleetStatus(BaseModel):
    version: int = Field(description="Latest version the fleet published")
    busy: bool = Field(description="A reload or sync session holds the fleet")
    engines: list[EngineStatus]
    recent: list[SyncRecord]


class SessionInfo(BaseModel):
    """Everything the trainer needs to send: where to host the group and what to send."""

    session: SessionId
    backend: Literal["gloo", "nccl"]
    host: str
    port: int
    world_size: int
    rank: int = Field(0, description="The trainer's rank; engine workers are 1..world_size-1")
    version: int
    plan: TransferPlan = Field(description="The bucket layout the engines expect, in order")
    transfer: TransferConfig
    engines: list[str]


class SessionClosed(BaseModel):
    session: str
    ok: bool = Field(description="True only if the sync completed despite the abort")
    message: str
    result: SyncResult | None = None
