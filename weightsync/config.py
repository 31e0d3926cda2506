"""Configuration: frozen values both ends share, and the one place env vars are read.

``TransferConfig`` and ``EngineSpec`` are frozen and travel with every call, so the sender and
the receivers can never disagree on wire parameters. ``Settings`` reads ``WEIGHTSYNC_*``
environment variables; only entrypoints (services/, the CLI) construct it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1 << 20


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Deadlines(_Frozen):
    """Seconds each phase may take before the coordinator gives up on that engine."""

    pause: float = Field(60.0, gt=0)
    sleep: float = Field(60.0, gt=0)
    wake: float = Field(60.0, gt=0)
    rendezvous: float = Field(60.0, gt=0)
    transfer: float = Field(120.0, gt=0)
    reload: float = Field(300.0, gt=0)
    verify: float = Field(60.0, gt=0)
    resume: float = Field(60.0, gt=0)
    # A sync's lease on each engine: renewed every third of it while the coordinator lives;
    # if it lapses (the trainer died) the engine ends the sync by itself.
    lease: float = Field(30.0, gt=0)


class BroadcastSettings(_Frozen):
    """The transfer group's settings (``TransferConfig.broadcast``).

    The broadcast leg hosts the group as rank 0 on ``host:port`` with ``backend``; the external
    leg's engines join a group with the same ``backend`` at the address the outside sender
    gives (``host`` and ``port`` are the broadcast leg's own).
    """

    backend: Literal["gloo", "nccl"] = "gloo"
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535)  # 0: pick a free port per session
    # gloo only. "collective": gloo's broadcast (the sender's bytes go out once per receiver,
    # or down a tree: 8 receivers took 3.6x one on 16 CPUs). "chain": the sender sends to the
    # first engine only and every engine forwards each chunk to the next as it arrives, so the
    # time grows by a chunk per engine instead of a bucket; one dead engine fails the engines
    # after it (the sync then fails as a whole, as with any failed transfer).
    mode: Literal["collective", "chain"] = "collective"
    chain_chunk_bytes: int = Field(4 * MiB, ge=64 * 1024)

    @model_validator(mode="after")
    def _chain_is_gloo(self) -> BroadcastSettings:
        if self.mode == "chain" and self.backend != "gloo":
            raise ValueError("broadcast mode 'chain' is for gloo; NCCL's broadcast is pipelined")
        return self


class IpcSettings(_Frozen):
    """The CUDA IPC leg's settings (``TransferConfig.ipc``)."""

    # Keep the trainer's packed buckets (one model-sized GPU allocation) and the engine's
    # mapping of them across syncs, instead of allocating, mapping and freeing them every
    # sync. Faster; costs that memory on the trainer's GPU between syncs.
    reuse_buffers: bool = False
    # Into one single-worker engine, kernel layout, where every tensor lies on the engine's
    # GPU in the dtype it serves: share the trainer's own storages and let the engine copy
    # from them (no packed copy on the trainer). Every piece is checksummed by the trainer,
    # and by the engine in the launch that copies it (what is verified is what was loaded):
    # a mismatch — the trainer wrote its tensors during the sync — is found with the
    # parameters overwritten, so that engine is fenced until the next sync (packed, it would
    # refuse the sync and keep serving its old weights). Anything else is packed as before.
    # Off until it has run on a GPU (its CPU stand-in, the loopback leg, is tested in CI;
    # tests/gpu/test_fast_path_gpu.py and test_moe_gpu.py turn it on).
    direct: bool = False


# The flat keyword arguments TransferConfig still accepts as a shorthand on input, and the
# leg setting each one stands for (``broadcast="chain"``, a string, is ``broadcast.mode``).
FLAT_SHORTHAND: dict[str, tuple[str, str]] = {
    "backend": ("broadcast", "backend"),
    "host": ("broadcast", "host"),
    "port": ("broadcast", "port"),
    "chain_chunk_bytes": ("broadcast", "chain_chunk_bytes"),
    "ipc_reuse_buffers": ("ipc", "reuse_buffers"),
    "ipc_direct": ("ipc", "direct"),
}


class TransferConfig(_Frozen):
    """Wire parameters shared by sender and receivers.

    Leg-independent fields sit here; each leg's own settings sit in its model
    (``broadcast``: the transfer group's, read by the broadcast and external legs; ``ipc``:
    the CUDA IPC leg's), and each leg reads only its own. The old flat keywords are accepted as
    a shorthand on input: ``TransferConfig(backend="nccl", ipc_reuse_buffers=True)`` is
    ``TransferConfig(broadcast=BroadcastSettings(backend="nccl"),
    ipc=IpcSettings(reuse_buffers=True))``, and ``broadcast="chain"`` is
    ``broadcast=BroadcastSettings(mode="chain")``. A flat keyword that contradicts the nested
    setting it stands for is refused.

    ``apply``: ``staged`` receives every bucket, checks checksums on all engines, and only then
    calls ``reload_weights`` everywhere — a failed transfer leaves every engine on its old
    weights (fleet all-or-nothing) at the cost of one model-sized staging copy.
    ``streaming`` feeds buckets into ``reload_weights`` as they arrive (no staging memory);
    an engine whose transfer breaks midway is fenced until a resync verifies.
    """

    # "auto": send buckets in vLLM's kernel layout once every engine has verified it (see
    # transport.layout), else checkpoint format; "checkpoint": always checkpoint format;
    # "kernel": kernel layout or a ConfigError saying why not.
    layout: Literal["auto", "checkpoint", "kernel"] = "auto"
    bucket_bytes: int = Field(64 * MiB, ge=64 * 1024)
    apply: Literal["staged", "streaming"] = "staged"
    # Every floating tensor an engine is given is checked finite before it is applied (one
    # fused reduction per bucket, in the worker): a NaN or Inf is refused like a checksum
    # mismatch, with the tensor named. False publishes whatever arrives (an engine then zeroes
    # its KV cache at the next load, so nothing the unchecked version wrote reaches it).
    check_finite: bool = True
    deadlines: Deadlines = Deadlines()
    broadcast: BroadcastSettings = BroadcastSettings()
    ipc: IpcSettings = IpcSettings()

    @model_validator(mode="before")
    @classmethod
    def _flat_shorthand(cls, data: Any) -> Any:
        """Move the old flat keywords into the leg models they belong to."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        moved: dict[str, dict[str, Any]] = {}
        if isinstance(data.get("broadcast"), str):
            moved["broadcast"] = {"mode": data.pop("broadcast")}
        for flat, (leg, key) in FLAT_SHORTHAND.items():
            if flat in data:
                moved.setdefault(leg, {})[key] = data.pop(flat)
        for leg, values in moved.items():
            nested = data.get(leg)
            if nested is None:
                data[leg] = values
                continue
            if isinstance(nested, BaseModel):  # only what it was given counts as set
                nested = nested.model_dump(exclude_unset=True)
            if not isinstance(nested, dict):
                continue  # the leg model's own validation says what is wrong with it
            for key, value in values.items():
                if key in nested and nested[key] != value:
                    flat = next((f for f, lk in FLAT_SHORTHAND.items() if lk == (leg, key)),
                                leg)
                    raise ValueError(f"{flat}={value!r} contradicts {leg}.{key}="
                                     f"{nested[key]!r}: give one of them")
            data[leg] = {**nested, **values}
        return data


# vLLM engine arguments EngineSpec has a field of the same name for
_TYPED_ARGS = ("dtype", "max_model_len", "seed", "enforce_eager", "tensor_parallel_size",
               "gpu_memory_utilization", "limit_mm_per_prompt")


BATCH_INVARIANT_CPU = ("batch_invariant needs a CUDA GPU (vLLM's batch-invariant kernels are "
                       "CUDA's; on CPU its ops are deterministic already)")


class EngineSpec(_Frozen):
    """How to start one vLLM engine. The same spec starts it on CPU or GPU."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    model: str
    dtype: str = "auto"
    # None: vLLM's default (the model's own context length)
    max_model_len: int | None = Field(None, ge=16)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    # None: vLLM's default (CUDA graphs on a GPU; compiled on CPU); True: eager mode
    enforce_eager: bool | None = None
    # every worker of a tensor-parallel engine joins the transfer group (transport.ranks)
    tensor_parallel_size: int = Field(1, ge=1)
    cpu_kvcache_gib: float = Field(1.0, gt=0)  # CPU engines' KV cache (fractions allowed)
    # GPU engines' KV cache. None: vLLM sizes it from gpu_memory_utilization by profiling the
    # device, which fails when another process (a colocated trainer, another engine) frees
    # GPU memory meanwhile; a fixed size skips that profiling
    gpu_kvcache_gib: float | None = Field(None, gt=0)
    # CPU engines: vLLM's VLLM_CPU_OMP_THREADS_BIND for this engine's workers ("nobind",
    # "auto", or one core list per worker: "0-3|4-7"). None: "nobind" for one worker; for
    # several, the environment's value if it fits, else the cores split between them
    # (vllm_compat.cpu_threads_bind).
    cpu_threads_bind: str | None = Field(None, min_length=1,
                                         pattern=r"^[0-9,|\-]+$|^nobind$|^auto$")
    num_gpus: float = Field(0.0, ge=0)  # Ray resource; >0 for a GPU engine of its own
    # Ray custom resources the engine's actor needs: pins it to the nodes that have them
    # (``ray start --resources='{"rollout": 4}'``; ``{"rollout": 1}`` here)
    resources: dict[str, float] = Field(default_factory=dict)
    limit_mm_per_prompt: dict[str, int] | None = None
    load_roots: tuple[str, ...] = ()  # directories /reload may read checkpoints from
    # modules the engine's workers import once at start so that their ``register_leg`` calls
    # run there (``transport.legs.import_leg_modules``): a leg of your own, or the test legs
    # (``weightsync.testing.legs.MODULES``). Set by whoever starts the engine; a sync request
    # names a leg, never a module.
    leg_modules: tuple[str, ...] = ()
    # Any other argument of vLLM's engine (``AsyncEngineArgs``: quantization, max_num_seqs,
    # enable_prefix_caching, kv_cache_dtype, compilation_config, ...), checked against the
    # installed vLLM's own arguments when the spec is made. Arguments weightsync owns (its
    # worker extension, sleep mode, the executor) are refused; ones with a field above
    # (max_model_len, enforce_eager, ...) become that field.
    engine_args: dict[str, Any] = Field(default_factory=dict)
    # LoRA adapter syncs (engine_args enable_lora): the versions of each adapter kept loaded,
    # the latest included, so requests on an older one finish there (engine.adapters); the
    # engine's max_loras must leave room for them and the one being loaded
    lora_versions_kept: int = Field(2, ge=1)
    # vLLM's batch-invariant kernels (VLLM_BATCH_INVARIANT=1 in the engine's processes; CUDA
    # only): a request's tokens and logprobs do not depend on what else is batched with it,
    # and LoRA's shrink kernel stops summing split parts with atomic adds, so an adapter's
    # answers repeat run to run (without it they do not on a GPU: docs/guides/lora.md).
    # Slower kernels; what a bit-for-bit comparison or a reproducible rollout needs.
    batch_invariant: bool = False

    @model_validator(mode="before")
    @classmethod
    def _lift_typed_args(cls, data: Any) -> Any:
        """vLLM's arguments that have a field here (``max_model_len``, ``enforce_eager``, ...)
        may come in ``engine_args`` too, as ``WEIGHTSYNC_ENGINE_ARGS`` and the CLI give them:
        they become the field. Given both ways, they must agree."""
        if not isinstance(data, dict) or not isinstance(data.get("engine_args"), dict):
            return data
        out, args = dict(data), dict(data["engine_args"])
        for name in _TYPED_ARGS:
            if name not in args:
                continue
            value = args.pop(name)
            if name in out and out[name] != value:
                raise ValueError(f"{name} given twice, differently: {out[name]!r} and "
                                 f"engine_args[{name!r}] = {value!r}")
            out[name] = value
        out["engine_args"] = args
        return out

    @field_validator("engine_args")
    @classmethod
    def _vllm_accepts(cls, args: dict[str, Any]) -> dict[str, Any]:
        if args:
            from weightsync.engine_args import check_engine_args

            check_engine_args(args, {"kv_cache_memory_bytes": "cpu_kvcache_gib (CPU engines) or "
                                                               "gpu_kvcache_gib (GPU engines)"})
        return args

    @model_validator(mode="after")
    def _gpu_consistent(self) -> EngineSpec:
        if self.device == "cpu" and self.num_gpus:
            raise ValueError("a cpu engine asks for no GPUs")
        if self.device == "cpu" and self.batch_invariant:
            raise ValueError(BATCH_INVARIANT_CPU)
        if self.engine_args:
            from weightsync.engine_args import device_refusal

            why = device_refusal(self.engine_args, self.device)
            if why is not None:
                raise ValueError(why)
        bind = self.cpu_threads_bind
        if bind not in (None, "nobind", "auto") and \
                len(bind.split("|")) != self.tensor_parallel_size:
            raise ValueError(f"cpu_threads_bind {bind!r} names {len(bind.split('|'))} core "
                             f"list(s) for {self.tensor_parallel_size} worker(s)")
        return self


class Settings(BaseSettings):
    """Process settings for entrypoints (``WEIGHTSYNC_*``). Library code takes values, not this."""

    model_config = SettingsConfigDict(env_prefix="WEIGHTSYNC_", env_file=None, extra="ignore")

    ray_address: str | None = None
    # Ray's own RAY_AUTH_MODE as the user set it (None: unset; a Ray the process starts then
    # gets token authentication, weightsync.local_ray)
    ray_auth_mode: str | None = Field(None, validation_alias=AliasChoices("RAY_AUTH_MODE",
                                                                          "ray_auth_mode"))
    namespace: str = "weightsync"
    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None
    model: str | None = None
    engines: int = Field(1, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bucket_mib: int = Field(64, ge=1)
    load_roots: tuple[str, ...] = ()
    # vLLM engine arguments for the engines `serve` starts (EngineSpec.engine_args), as JSON:
    # WEIGHTSYNC_ENGINE_ARGS='{"max_num_seqs": 64, "enable_prefix_caching": false}'
    engine_args: dict[str, Any] = Field(default_factory=dict)
    # Request bodies over this are refused (413) before any of it is parsed. A /sessions
    # tensor list takes ~100 bytes a tensor: 8 MiB is ~80,000 tensors.
    max_body_mib: int = Field(8, ge=1, le=1024)
    # The fleet's OpenAI-compatible base URL (/v1, weightsync.routing): each engine serves
    # vLLM's own OpenAI app on a port of its node, behind a token only the router holds.
    rollouts: bool = True
    # What `serve` does with the engines it started when it stops: None keeps them when Ray is
    # an external cluster (they are detached, and a restarted service finds them) and stops
    # them when the service starts Ray itself (ray_address unset or "local": they would be
    # orphans that nobody could find).
    keep_engines: bool | None = None
