"""LoRA adapters as weightsync moves them: the adapter's config, its tensors packed into one
checksummed buffer, and the checks both ends can make without vLLM (#31, first slice).

A trainer makes an ``AdapterPayload`` from a peft model (``from_peft``), from tensors under
peft's names and a peft config (``from_tensors``), or the control plane from a peft adapter
directory inside its load roots (``from_directory``); the payload's bytes are checksummed once,
as sent. The engine host gives each sync a version (``<name>@v<N>``, ``engine.adapters``) and
its workers check the checksum, then the tensors against the model (``check_adapter_shapes``
here, vLLM's own rules in ``vllm_lora.add_adapter``), before anything is loaded.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from weightsync.errors import ManifestError, VerificationError
from weightsync.transport.ipc import IpcBucketHandle
from weightsync.transport.packing import checksum, pack_bucket, plan_buckets, spec_of, unpack_bucket
from weightsync.types import Bucket, TensorSpec, TransferPlan

NAME = r"^[A-Za-z0-9_.-]+$"  # an adapter's name; its versions are "<name>@v<N>"


def version_of(served_as: str | None, name: str) -> int | None:
    """N of ``"<name>@v<N>"`` (an answer's adapter version), None for anything else."""
    got, _, n = (served_as or "").rpartition("@v")
    return int(n) if got == name and n.isdigit() else None
_PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


class AdapterConfig(BaseModel):
    """The fields of a peft ``LoraConfig`` that vLLM reads (its ``PEFTHelper``), including the
    features it refuses, so that an adapter using one is refused rather than served wrongly."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    r: int = Field(gt=0)
    lora_alpha: int | float = Field(gt=0)
    target_modules: tuple[str, ...] | str
    bias: str = "none"
    modules_to_save: tuple[str, ...] | None = None
    use_rslora: bool = False
    use_dora: bool = False
    lora_bias: bool = False
    init_lora_weights: bool | str = True
    alora_invocation_tokens: tuple[int, ...] | None = None
    layer_replication: tuple[tuple[int, ...], ...] | None = None
    use_qalora: bool = False
    rank_pattern: dict[str, int] = Field(default_factory=dict)
    alpha_pattern: dict[str, float] = Field(default_factory=dict)

    @field_validator("target_modules", "modules_to_save", mode="before")
    @classmethod
    def _sorted(cls, v: Any) -> Any:  # peft keeps them as sets
        return tuple(sorted(v)) if isinstance(v, (set, frozenset, list)) else v

    def ranks(self) -> set[int]:
        return {self.r, *self.rank_pattern.values()}

    def peft_dict(self) -> dict[str, Any]:
        """As peft's ``adapter_config.json`` spells it (what vLLM's ``PEFTHelper`` reads)."""
        d = self.model_dump()
        for key in ("target_modules", "modules_to_save", "alora_invocation_tokens"):
            if isinstance(d[key], tuple):
                d[key] = list(d[key])
        if d["layer_replication"] is not None:
            d["layer_replication"] = [list(x) for x in d["layer_replication"]]
        return d


class AdapterManifest(BaseModel):
    """What a trainer sends besides the bytes: the adapter's name, config, the layout of its
    packed tensors and their checksum as sent."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=NAME)
    config: AdapterConfig
    bucket: Bucket
    checksum: int


class OverGroup(BaseModel):
    """How a worker receives an adapter's bytes from the trainer's transfer group instead of
    in its call (``AdapterLoad.over_group``): the deadline of the receive and, for a chain,
    its chunk size (``BroadcastSettings.chain_chunk_bytes``; 0: a broadcast)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    deadline_s: float = Field(gt=0)
    chain_chunk: int = Field(default=0, ge=0)


class AdapterLoad(BaseModel):
    """What a worker is told to load (``ws_load_adapter``), besides the bytes themselves: the
    manifest, the version the host gave it and its vLLM id (never reused); ``over_group``:
    the bytes come through the transfer group the worker is in (``wire_plan``), not in the
    call; ``over_ipc``: they are on the worker's GPU, shared by the colocated trainer
    (``transport.ipc``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    manifest: AdapterManifest
    version: int = Field(ge=1)
    lora_int_id: int = Field(ge=1)
    over_group: OverGroup | None = None
    over_ipc: IpcBucketHandle | None = None

    @model_validator(mode="after")
    def _one_way(self) -> AdapterLoad:
        if self.over_group is not None and self.over_ipc is not None:
            raise ValueError("an adapter's bytes come over the group or over IPC, not both")
        if self.over_ipc is not None and self.over_ipc.nbytes != self.manifest.bucket.nbytes:
            raise ValueError(f"the IPC buffer holds {self.over_ipc.nbytes} bytes, the adapter "
                             f"{self.manifest.bucket.nbytes}")
        return self

    @property
    def in_call(self) -> bool:
        """Whether the bytes come in the load's call."""
        return self.over_group is None and self.over_ipc is None

    @property
    def versioned(self) -> str:
        return f"{self.manifest.name}@v{self.version}"

    def wire_plan(self) -> TransferPlan:
        """The plan of the one bucket both ends of a group derive from the load
        (``wire_plan``); only for a load ``over_group``."""
        if self.over_group is None:
            raise ValueError("the bytes of this load come in its call")
        return wire_plan(self.manifest, self.version, self.over_group.chain_chunk)


def wire_plan(manifest: AdapterManifest, version: int, chain_chunk: int = 0) -> TransferPlan:
    """An adapter's packed bytes as a transfer plan (one bucket holding one uint8 tensor,
    ``WIRE_NAME``): what a group leg sends from ``{WIRE_NAME: payload.buf}`` and every worker
    receives, byte for byte the payload's (so its checksum is the manifest's)."""
    n = manifest.bucket.nbytes
    plan = plan_buckets([TensorSpec(name=WIRE_NAME, dtype="uint8", shape=(n,))], n, version)
    return plan.model_copy(update={"chain_chunk": chain_chunk}) if chain_chunk else plan


WIRE_NAME = "adapter"


class AdapterLoaded(BaseModel):
    """A worker's reply: the adapter is loaded and pinned under ``lora_int_id``; ``seconds``
    each step took there (``receive``, ``checksum``, ``check``, ``add``: vLLM's build and
    load, ``verify``: ``verify_held``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    lora_int_id: int
    modules: int  # vLLM modules the adapter changes (packed ones counted once)
    seconds: dict[str, float] = {}


class LoadedAdapters(BaseModel):
    """A worker's reply: the vLLM ids of the adapters it holds."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ids: tuple[int, ...]


class AdapterSyncReply(BaseModel):
    """An engine's answer to an adapter sync: the version it now serves under ``name``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    version: int
    served_as: str  # "<name>@v<N>"
    lora_int_id: int
    nbytes: int
    removed: tuple[str, ...]  # older versions unloaded by this sync (beyond the kept ones)
    seconds: float
    steps: dict[str, float] = {}  # a stage's: its worker steps (the slowest worker's each)


class AdapterState(BaseModel):
    """What one engine holds of its adapters (``EngineHost.adapter_state``): ``served`` each
    name -> the version it resolves to; ``kept`` the versions servable by ``<name>@v<N>``;
    ``staged`` loaded but not committed (not servable); ``highest`` each name's highest
    version here, staged included; ``held_ids`` the vLLM ids the workers hold now;
    ``group_id`` the trainer's transfer group its workers are in, if any."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    served: dict[str, str]
    kept: tuple[str, ...]
    staged: tuple[str, ...]
    highest: dict[str, int]
    held_ids: tuple[int, ...]
    group_id: str | None = None  # the transfer group its workers are in (engine.group)
    serving: bool = True  # whether it would stage an adapter now (not paused, syncing, ...)


class AdapterFleetResult(BaseModel):
    """A fleet-wide adapter sync (``SyncCoordinator.sync_adapter``): ``committed`` the
    engines now serving ``<name>@v<version>``; ``failed`` engine -> why it failed (staging or
    commit); ``aborted`` the engines on which the version was undone (unloaded from staging,
    or its commit undone after a commit failed elsewhere); ``uncommitted`` the engines that
    could not be asked to undo it after a failed commit: fenced, what they serve unknown.
    ``phases``: the coordinator's seconds in each step of a sync that went through
    (``states``, ``stage``, ``commit``, ``settle``; ``stage_on_engine``: the slowest engine's
    own stage time, in ``stage``, and ``stage_on_engine.<step>`` its steps,
    ``AdapterSyncReply.steps``), summed over rolling waves."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    version: int
    ok: bool
    committed: tuple[str, ...] = ()
    failed: dict[str, str] = {}
    aborted: tuple[str, ...] = ()
    uncommitted: tuple[str, ...] = ()
    replies: dict[str, AdapterSyncReply] = {}
    seconds: float = 0.0
    phases: dict[str, float] = {}


@dataclass(frozen=True)
class AdapterPayload:
    """An adapter's tensors packed back to back into ``buf`` (one ``Bucket``) and its
    manifest, whose checksum of ``buf`` is made here: the worker compares it before loading.
    Sent to an engine host as ``sync_adapter(manifest.model_dump_json(), buf)``."""

    manifest: AdapterManifest
    buf: torch.Tensor

    @classmethod
    def from_tensors(cls, name: str, tensors: Mapping[str, torch.Tensor],
                     config: AdapterConfig | Mapping[str, Any],
                     device: torch.device | str = "cpu") -> AdapterPayload:
        """``tensors`` under peft's names (``base_model.model.<module>.lora_A.weight``; as
        ``get_peft_model_state_dict`` gives them), ``config`` a peft ``LoraConfig`` as a dict
        (``to_dict()``) or an ``AdapterConfig``. Copied: later changes to them do not move.
        ``device``: where ``buf`` is packed (a GPU for ``leg="ipc"``)."""
        if not re.match(NAME, name):
            raise ManifestError(f"adapter name {name!r}: letters, digits, '_', '.', '-' only")
        cfg = config if isinstance(config, AdapterConfig) else AdapterConfig.model_validate(
            dict(config))
        if not tensors:
            raise ManifestError(f"adapter {name!r} has no tensors")
        src = {k: t.detach().to(device).contiguous() for k, t in tensors.items()}
        specs = [spec_of(k, t) for k, t in src.items()]
        bucket = plan_buckets(specs, sum(s.nbytes for s in specs) + 1, version=1).buckets[0]
        buf = pack_bucket(bucket, dict(src), device)
        return cls(AdapterManifest(name=name, config=cfg, bucket=bucket, checksum=checksum(buf)),
                   buf)

    @classmethod
    def from_directory(cls, name: str, path: str,
                       roots: Sequence[str] | None = None) -> AdapterPayload:
        """A peft adapter directory (``save_pretrained``'s files), read under the load-root
        rules of ``weightsync.checkpoint.read_adapter`` (``roots`` None: a trusted caller)."""
        from weightsync.checkpoint import read_adapter

        config, tensors = read_adapter(path, roots)
        try:
            cfg = AdapterConfig.model_validate(config)
        except ValidationError as e:
            raise ManifestError(f"{path}/adapter_config.json is not a LoRA config peft and "
                                f"vLLM read: {e.errors()[0]['loc']}: "
                                f"{e.errors()[0]['msg']}") from None
        return cls.from_tensors(name, tensors, cfg)  # type: ignore[arg-type]

    @classmethod
    def from_peft(cls, name: str, model: Any, adapter_name: str = "default",
                  device: torch.device | str = "cpu") -> AdapterPayload:
        """The adapter ``adapter_name`` of a peft model (``peft.PeftModel``), packed on
        ``device``."""
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(model, adapter_name=adapter_name)
        return cls.from_tensors(name, state, model.peft_config[adapter_name].to_dict(), device)

    def on_gpu(self) -> AdapterPayload:
        """This payload with ``buf`` on the current GPU (itself if it is there already)."""
        if self.buf.is_cuda:
            return self
        return AdapterPayload(self.manifest, self.buf.to(torch.cuda.current_device()))


class AdapterPacker:
    """Packs one peft model's adapter sync after sync (``SyncCoordinator.sync_adapter`` keeps
    one per name and model). peft's state-dict walk (``get_peft_model_state_dict``: module
    walks, and a read of the base model's config to see whether the vocabulary changed; ~20
    ms a call on a 2-core box) runs once, here, to learn which parameters hold the adapter
    under which of peft's names; ``pack`` then reads those parameters' current values, through
    the modules that own them (a parameter replaced in its module is followed; a module
    replaced is not: make a new packer after changing the model's adapters). Where a tensor of
    peft's state dict is not a parameter's own memory, every ``pack`` is ``from_peft``."""

    def __init__(self, name: str, model: Any, adapter_name: str = "default") -> None:
        from peft import get_peft_model_state_dict

        self.name, self.model, self.adapter_name = name, model, adapter_name
        state = get_peft_model_state_dict(model, adapter_name=adapter_name)
        owners = {p.data_ptr(): (m, attr, p) for m in model.modules()
                  for attr, p in m.named_parameters(recurse=False) if p.numel()}
        where = {k: owners.get(t.data_ptr()) for k, t in state.items()}
        self._where: dict[str, tuple[torch.nn.Module, str]] | None = None
        if all(w is not None and w[2].shape == state[k].shape for k, w in where.items()):
            self._where = {k: (w[0], w[1]) for k, w in where.items() if w is not None}
        self.config = AdapterConfig.model_validate(
            model.peft_config[adapter_name].to_dict())

    @property
    def direct(self) -> bool:
        """Whether ``pack`` reads the parameters themselves (False: every pack is
        ``from_peft``)."""
        return self._where is not None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors now, under peft's names."""
        if self._where is None:
            from peft import get_peft_model_state_dict

            return dict(get_peft_model_state_dict(self.model, adapter_name=self.adapter_name))
        return {k: getattr(m, a).detach() for k, (m, a) in self._where.items()}

    def pack(self, device: torch.device | str = "cpu") -> AdapterPayload:
        """``AdapterPayload.from_peft`` of the model as it is now, packed on ``device``."""
        return AdapterPayload.from_tensors(self.name, self.tensors(), self.config, device)


def unpack_adapter(load: AdapterLoad, buf: torch.Tensor) -> dict[str, torch.Tensor]:
    """The adapter's tensors: views of ``buf`` (``vllm_lora.add_adapter`` builds from copies
    of them: vLLM scales B by alpha/r in place)."""
    return dict(unpack_bucket(load.manifest.bucket, buf))


def check_adapter_shapes(specs: list[TensorSpec], base: Mapping[str, TensorSpec],
                         config: AdapterConfig) -> None:
    """Refuse (``ManifestError``) an adapter that does not fit the base model's checkpoint
    (``base``: its tensors as on disk): every tensor a ``lora_A``/``lora_B`` weight of a linear
    module the model has, ``A`` of shape (rank, in), ``B`` (out, rank) for that module's
    (out, in) weight, each module both, at a rank its config declares."""
    pairs: dict[str, dict[str, TensorSpec]] = {}
    bad: list[str] = []
    for s in specs:
        m = _LORA_KEY.match(s.name.removeprefix(_PEFT_PREFIX))
        if m is None:
            bad.append(f"{s.name}: not a LoRA A/B weight")
            continue
        pairs.setdefault(m["module"], {})[m["ab"]] = s
    ranks = config.ranks()
    for module, ab in sorted(pairs.items()):
        weight = base.get(f"{module}.weight")
        if weight is None:
            bad.append(f"{module}: the model has no such module")
            continue
        if len(weight.shape) != 2:
            bad.append(f"{module}: not a linear module (weight shape {weight.shape})")
            continue
        if set(ab) != {"A", "B"}:
            bad.append(f"{module}: lora_A and lora_B come together (got {sorted(ab)})")
            continue
        out, inp = weight.shape
        a, b = ab["A"].shape, ab["B"].shape
        if len(a) != 2 or len(b) != 2 or a[1] != inp or b[0] != out or a[0] != b[1]:
            bad.append(f"{module}: A {a} and B {b} do not fit its weight ({out}, {inp})")
        elif a[0] not in ranks:
            bad.append(f"{module}: rank {a[0]} is not one its config declares {sorted(ranks)}")
    if bad:
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise ManifestError(f"the adapter does not fit the model: {'; '.join(bad[:5])}{more}")


def _pattern(pattern: Mapping[str, Any], module: str, default: Any) -> Any:
    """peft's per-module override (``rank_pattern``/``alpha_pattern``): the first key the
    module's name ends with (as ``.<key>``), else ``default``."""
    return next((v for k, v in pattern.items() if re.match(rf"(.*\.)?{k}$", module)), default)


def lora_scale(config: AdapterConfig, module: str, rank: int) -> float:
    """The factor peft applies to ``B @ A`` of ``module`` (and vLLM folds into B):
    alpha / r, or alpha / sqrt(r) with rsLoRA, per-module overrides included."""
    alpha = _pattern(config.alpha_pattern, module, config.lora_alpha)
    return float(alpha / (math.sqrt(rank) if config.use_rslora else rank))


_INT_OF_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bitwise_equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Same shape, dtype and bits (compared as integers of the element's width: ``torch.equal``
    on bf16 CPU tensors is slower: ``verify_held`` of a 0.5B-shaped rank-16 bf16 adapter took
    9.9 ms with it, 7.0 ms so)."""
    if x.shape != y.shape or x.dtype != y.dtype:
        return False
    width = _INT_OF_WIDTH[x.element_size()]
    return torch.equal(x.view(width), y.view(width))


def verify_held(sent: Mapping[str, torch.Tensor],
                held: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]],
                module_of: Callable[[str], tuple[str, bool]], config: AdapterConfig,
                what: str) -> None:
    """What vLLM holds after loading an adapter against what the trainer sent, scaled the
    same way. ``sent``: peft's names -> tensors as sent; ``held``: vLLM's module name ->
    ``(A, B, scale)`` as its kernels apply them (``vllm_lora.adapter_held``);
    ``module_of``: a sent tensor's module as vLLM names it, and whether it is A. Every module
    sent is held and nothing else; A equals the sent A, and B times its scale equals the sent
    B times peft's scale for that module, both computed as vLLM computes them (in the held
    dtype), bit for bit. A ``VerificationError`` names what differs (an adapter scaled twice,
    a stale one, a wrong module)."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in sent.items():
        module, is_a = module_of(name)
        pairs.setdefault(module, {})["A" if is_a else "B"] = t
    bad = [f"{m}: sent, not held" for m in sorted(set(pairs) - set(held))]
    bad += [f"{m}: held, not sent" for m in sorted(set(held) - set(pairs))]
    for module in sorted(set(pairs) & set(held)):  # (one module at a time: while in cache)
        a, b, scale = held[module]
        want_a, want_b = pairs[module]["A"].to(a.dtype), pairs[module]["B"].to(b.dtype)
        want = want_b * lora_scale(config, module, want_a.shape[0])
        got = b if scale == 1 else b * scale
        if not _bitwise_equal(a, want_a):
            bad.append(f"{module}: A differs from the A sent")
        elif not _bitwise_equal(got, want):
            ratio = float((got.double().norm() / want.double().norm()).item()) \
                if got.shape == want.shape and want.abs().sum() > 0 else float("nan")
            bad.append(f"{module}: B x scale differs from the B sent x its scale "
                       f"(norm ratio {ratio:.4g})")
    if bad:
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise VerificationError(f"{what}: what vLLM holds is not what was sent: "
                                f"{'; '.join(bad[:5])}{more}")
