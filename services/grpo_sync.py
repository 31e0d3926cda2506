"""How the GRPO job syncs after each step: every weight (``FullSync``), or with ``--lora`` only
the adapter (``AdapterSync``), and the engine arguments and byte counts that go with it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from weightsync.config import EngineSpec

if TYPE_CHECKING:
    from services.grpo import GrpoConfig

ADAPTER = "policy"  # the adapter's name on the engines (--lora)
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def lora_args(cfg: GrpoConfig) -> dict[str, Any]:
    """vLLM's engine arguments for serving the job's adapter (none without --lora): slots for
    the versions kept (``EngineSpec.lora_versions_kept``) and the one being synced."""
    if not cfg.lora:
        return {}
    kept = EngineSpec.model_fields["lora_versions_kept"].default
    return {"enable_lora": True, "max_loras": kept + 1,
            "max_lora_rank": next(r for r in LORA_RANKS if r >= cfg.lora_rank)}


def engine_args_of(cfg: GrpoConfig) -> dict[str, Any]:
    """The engines' vLLM arguments: LoRA's (``lora_args``) and the quantization, if any."""
    args = lora_args(cfg)
    if cfg.quantization:
        args["quantization"] = cfg.quantization
    return args


def model_bytes(policy: Any) -> int:
    """The bytes of the base model's weights (what a full sync moves)."""
    model = policy.model.get_base_model() if hasattr(policy.model, "get_base_model") else \
        policy.model
    return sum(t.numel() * t.element_size() for n, t in model.state_dict().items()
               if "lora_" not in n)


@dataclass(frozen=True)
class Synced:
    """One step's sync, whichever kind: the version it made, its time and bytes per engine."""

    version: int
    seconds: float
    nbytes: int
    engine_seconds: dict[str, dict[str, float]]
    skipped: tuple[str, ...] = ()


class FullSync:
    """Every weight after each step (``SyncCoordinator.sync``): the version is the fleet's."""

    lora: str | None = None

    def __init__(self, coord: Any, cfg: GrpoConfig) -> None:
        self.coord, self.cfg = coord, cfg

    @property
    def version(self) -> int:
        return int(self.coord.version)

    def sync(self, policy: Any) -> Synced:
        from weightsync.errors import VerificationError

        cfg = self.cfg
        result = self.coord.sync(policy.model, pause_mode="abort",  # colocated: into the
                                 sleep_level=0 if cfg.colocate else cfg.sleep_level,  # sleeping
                                 ipc=cfg.ipc)  # fleet
        if not (result.ok and all(e.ok and e.checksum_ok and e.version == result.version
                                  for e in result.engines)):
            raise VerificationError(f"sync to version {result.version} did not verify: "
                                    f"{result.failed}")
        return Synced(version=result.version, seconds=result.seconds.get("total", 0.0),
                      nbytes=result.nbytes,
                      engine_seconds={e.engine: dict(e.seconds) for e in result.engines},
                      skipped=tuple(result.engines[0].skipped))


class AdapterSync:
    """Only the LoRA adapter after each step (``SyncCoordinator.sync_adapter``, all or
    nothing across the fleet): the version is the adapter's, ``policy@v<N>``, which every
    sample names; the base weights never move."""

    lora: str | None = ADAPTER

    def __init__(self, coord: Any, engines: int, leg: str | None = None) -> None:
        self.coord, self.engines, self.version = coord, engines, 0
        self.leg = leg  # None: the bytes in the engine calls; "broadcast": over the group

    def sync(self, policy: Any) -> Synced:
        from weightsync.errors import VerificationError

        result = self.coord.sync_adapter(policy.model, name=ADAPTER, leg=self.leg)
        if not (result.ok and len(result.committed) == self.engines):
            raise VerificationError(f"adapter sync {ADAPTER}@v{result.version} did not commit "
                                    f"everywhere: {result.failed}")
        self.version = result.version
        return Synced(version=result.version, seconds=result.seconds,
                      nbytes=next(iter(result.replies.values())).nbytes,
                      engine_seconds={n: {"total": r.seconds} for n, r in result.replies.items()})
