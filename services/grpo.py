"""GRPO on real vLLM engines: sample groups through the fleet, learn, sync after every step.

    python -m services.grpo                      # local Ray, CPU by default, a few minutes
    python -m services.grpo --steps 60 --engines 2 --run-dir runs/grpo
    ray job submit --working-dir . --runtime-env deploy/runtime_env.yaml -- python -m services.grpo

The policy is an HF transformers Qwen2-style model from the tiny-model factory. Each step
samples ``group_size`` completions per prompt from the engines (temperature 1), scores them
with a verifiable reward (the fraction of completion tokens that are numerals, or that are
" yes"), normalises rewards within each group, takes clipped-ratio policy-gradient steps with
a k3 KL to the frozen initial policy, and syncs the new weights into every engine through
``SyncCoordinator.sync``. Every sync must verify, and every sample must carry the version that
was synced just before it: the reward can only rise if new weights really reach the engines.

``--colocate`` runs the loop colocated RL teams run: after sampling, the engines sleep
(``SyncCoordinator.sleep``: level 2 by default frees their weights and KV cache), the training
step runs in the freed device memory, and the sync goes into the sleeping engines and wakes
them. Each step reports what the sleep freed and the trainer's peak memory during the step (on
CPU, where vLLM has no sleep mode, the engines only pause and the log says so).

Writes ``<run-dir>/<name>.json`` (config, per-step records, summary) and ``<name>.png``
(reward, sync time per step, and with ``--colocate`` memory freed per step). Runs unchanged on
GPU (``--device auto``).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import typer
from pydantic import BaseModel, ConfigDict, Field, model_validator
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from services.grpo_plot import write_plot
from services.grpo_rollouts import OpenAIRollouts, RayRollouts
from services.grpo_sync import ADAPTER, AdapterSync, FullSync, engine_args_of, model_bytes
from weightsync.config import Settings
from weightsync.local_ray import init_kwargs
from weightsync.ray_compat import prepare
from weightsync.types import exclusive_phases

logger = logging.getLogger(__name__)

PROMPTS = (
    "the answer is", "one two three", "hello world", "the quick brown fox",
    "weights move from", "reward rises when", "yes no maybe", "a b c d",
)
Task = Literal["digits", "yes"]


class GrpoConfig(BaseModel):
    """Everything that defines a run (written into the JSON log)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: int = Field(40, ge=1)
    engines: int = Field(2, ge=1)
    prompts_per_step: int = Field(4, ge=1)
    group_size: int = Field(8, ge=2)
    max_tokens: int = Field(16, ge=1)
    task: Task = "digits"
    lr: float = Field(2e-3, gt=0)
    beta: float = Field(0.04, ge=0)
    clip_eps: float = Field(0.2, gt=0)
    epochs: int = Field(2, ge=1)  # optimizer steps per batch; >1 makes the ratio clip bite
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    backend: Literal["gloo", "nccl"] = "gloo"
    sync_host: str = "127.0.0.1"  # address the engines reach the trainer at (rendezvous)
    ipc: bool = False
    colocate: bool = False  # engines sleep during each training step; sync into them
    sleep_level: int = Field(1, ge=0, le=2)
    bucket_mib: int = Field(16, ge=1)
    hidden: int = Field(128, ge=64)
    layers: int = Field(2, ge=1)
    gpu_memory_utilization: float = Field(0.3, gt=0, le=1)
    max_logprob_gap: float = Field(0.05, gt=0)  # engine vs trainer logprobs on the same weights
    trainer_ranks: int = Field(1, ge=1)  # > 1: FSDP2 over that many processes (grpo_ranks)
    # how groups are sampled (services.grpo_rollouts): Ray's generate, or the fleet's OpenAI
    # router with the openai client
    rollout: Literal["ray", "openai"] = "ray"
    # --rollout openai: where the job's router listens (another address than loopback needs
    # WEIGHTSYNC_TOKEN: rollout clients outside the job use it as their API key)
    router_host: str = "127.0.0.1"
    router_port: int = Field(0, ge=0, le=65535)
    # Ray custom resources every engine needs (EngineSpec.resources): pins them to nodes
    engine_resources: dict[str, float] = Field(default_factory=dict)
    # train a LoRA adapter (peft) on the frozen base instead of every weight; each step syncs
    # only the adapter (``SyncCoordinator.sync_adapter``) and samples with it by name
    lora: bool = False
    lora_rank: int = Field(16, ge=1, le=512)
    lora_alpha: float = Field(32.0, gt=0)
    # --lora: the adapter's bytes in the engine calls, once over the transfer group, or
    # shared on the trainer's GPU over CUDA IPC (colocated engines)
    adapter_leg: Literal["calls", "broadcast", "ipc"] = "calls"
    # roll out with the engines quantized (vLLM's online FP8: the bf16 checkpoint quantized at
    # load and on every sync; GPU only). FP8 rollouts are off-policy by design: the engine vs
    # trainer logprob gap of each step is recorded, not held to ``max_logprob_gap``
    quantization: Literal["fp8"] | None = None

    @model_validator(mode="after")
    def _quantization_fits(self) -> GrpoConfig:
        from weightsync.engine_args import device_refusal

        why = device_refusal({"quantization": self.quantization}, self.device)
        if why is not None:
            raise ValueError(f"--quantization {self.quantization}: {why}")
        return self

    @model_validator(mode="after")
    def _lora_fits(self) -> GrpoConfig:
        if not self.lora:
            return self
        for flag, why in ((self.colocate and self.sleep_level == 2, "--colocate at "
                           "--sleep-level 2 (it discards the base weights the adapter needs; "
                           "level 1 keeps them in host memory)"),
                          (self.trainer_ranks > 1, "--trainer-ranks > 1 (the FSDP2 trainer "
                           "trains every weight)")):
            if flag:
                raise ValueError(f"--lora does not combine with {why}")
        return self


class StepRecord(BaseModel):
    """One training step: what was sampled, how it scored, and how the sync after it went."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    step: int
    sampled_version: int
    reward_mean: float
    reward_std: float
    loss: float
    kl: float
    clip_fraction: float
    logprob_gap: float  # mean |engine logprob - trainer logprob| on the sampled tokens
    sync_version: int
    sync_ok: bool
    sync_seconds: float
    sync_bytes: int  # bytes each engine received for the sync (the adapter's, with --lora)
    engine_seconds: dict[str, dict[str, float]]  # engine -> phase -> seconds
    skipped: tuple[str, ...] = ()
    sample_seconds: float
    train_seconds: float
    sleep_seconds: float | None = None  # colocated: the fleet's sleep before the step
    freed_bytes: int | None = None  # colocated: free device memory the trainer gained by the
    # fleet's sleep (None on CPU)
    trainer_peak_bytes: int | None = None  # the step's peak device allocation (GPU)
    # the weight version each sample reported (engine-stamped), in sampling order, and the
    # engines that served them (the router's choice on the OpenAI path)
    sample_versions: tuple[int | None, ...] = ()
    sample_engines: dict[str, int] = Field(default_factory=dict)


# ---- task ------------------------------------------------------------------------------------
def target_ids(tokenizer: Any, task: Task) -> frozenset[int]:
    """Token ids the reward counts: numerals (``digits``) or the word " yes" (``yes``)."""
    if task == "digits":
        ids = {i for i in range(len(tokenizer)) if tokenizer.decode([i]).strip().isdigit()}
    else:
        ids = {i for i in range(len(tokenizer)) if tokenizer.decode([i]).strip() == "yes"}
    if not ids:
        raise ValueError(f"the tokenizer has no token for task {task!r}")
    return frozenset(ids)


# ---- trainer side ----------------------------------------------------------------------------
class Policy:
    """The trainer's model, its frozen reference and the optimizer. With ``cfg.lora`` the model
    is the base wrapped by peft with a LoRA adapter on every linear layer (only the adapter
    trains) and the reference is the base itself (the adapter disabled)."""

    def __init__(self, model_dir: Path, cfg: GrpoConfig, device: str) -> None:
        import copy

        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg, self.device = cfg, torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.ref: Any = None
        if cfg.lora:
            from peft import LoraConfig, get_peft_model

            self.model = get_peft_model(self.model, LoraConfig(
                r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules="all-linear",
                lora_dropout=0.0))
        else:
            self.ref = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.model.to(self.device).train()
        if self.ref is not None:
            self.ref.to(self.device)
        self.trained = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.trained, lr=cfg.lr, weight_decay=0.0)

    def _ref_logprobs(self, batch: Any) -> Any:
        if self.ref is not None:
            return self._logprobs(self.ref, batch)
        with self.model.disable_adapter():  # LoRA: the base is the reference
            return self._logprobs(self.model, batch)

    def prompt_ids(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt).input_ids)

    def _logprobs(self, model: Any, batch: Any) -> Any:
        from weightsync.rl.grpo_math import sequence_logprobs

        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return sequence_logprobs(logits, batch.input_ids)

    def update(self, batch: Any, advantages: Any) -> tuple[Any, Any]:
        """``epochs`` clipped policy-gradient steps on one sampled batch.

        Returns the trainer's logprobs of the sampled tokens before the update (to compare with
        the engines') and the last step's ``LossStats``.
        """
        import torch

        from weightsync.rl.grpo_math import grpo_loss

        batch = batch.to(self.device)
        advantages = advantages.to(self.device)
        with torch.no_grad():
            old = self._logprobs(self.model, batch)
            ref = self._ref_logprobs(batch)
        stats = None
        for _ in range(self.cfg.epochs):
            logp = self._logprobs(self.model, batch)
            loss, stats = grpo_loss(logp, old, ref, advantages, batch.completion_mask,
                                    clip_eps=self.cfg.clip_eps, beta=self.cfg.beta)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.trained, 1.0)
            self.opt.step()
        return old.cpu(), stats


# ---- engine side -----------------------------------------------------------------------------
def engine_gpus(device: str, engines: int) -> float:
    """Ray GPU share per engine: none on CPU; a whole GPU each when the cluster has enough,
    else an equal share of what it has (engines colocated with each other and the trainer)."""
    import ray

    if device != "cuda":
        return 0.0
    gpus = float(ray.cluster_resources().get("GPU", 0.0))
    if gpus <= 0:
        raise RuntimeError("device is cuda but the Ray cluster advertises no GPU")
    return min(1.0, gpus / engines)


# ---- outputs ---------------------------------------------------------------------------------
def _say(console: Console, text: str) -> None:
    """Print a plain line: no wrapping (logs are parsed), no markup (phases use brackets)."""
    console.print(text, soft_wrap=True, highlight=False, markup=False)


def _step_line(r: StepRecord, total_steps: int) -> str:
    phases = " ".join(f"{p} {s:.3f}"
                      for p, s in exclusive_phases(next(iter(r.engine_seconds.values()))).items())
    gib = 1 << 30
    slept = "" if r.sleep_seconds is None else (
        f" | slept {r.sleep_seconds:.3f}s, " + ("freed nothing (no sleep mode on this device)"
                                                if r.freed_bytes is None else
                                                f"freed {r.freed_bytes / gib:.2f} GiB")
        + ("" if r.trainer_peak_bytes is None else
           f", train step peak {r.trainer_peak_bytes / gib:.2f} GiB"))
    return (f"step {r.step}/{total_steps} reward {r.reward_mean:.3f}±{r.reward_std:.3f} "
            f"sampled@v{r.sampled_version} gap {r.logprob_gap:.1e} kl {r.kl:.4f} | "
            f"sync v{r.sync_version} {'verified' if r.sync_ok else 'FAILED'} "
            f"{r.sync_seconds:.3f}s on {len(r.engine_seconds)} engine(s) [{phases}]{slept}")


def grpo_step(step: int, cfg: GrpoConfig, rollouts: Any, coord: Any, syncer: Any,
              policy: Policy, targets: frozenset[int]) -> StepRecord:
    """Sample groups on the current version, score, update the policy, sync, verify."""
    import torch

    from weightsync.errors import VerificationError
    from weightsync.rl.grpo_math import group_advantages, pack_sequences, token_fraction_reward

    prompts = [PROMPTS[(step + i) % len(PROMPTS)] for i in range(cfg.prompts_per_step)]
    t = time.perf_counter()
    sampled_version = syncer.version
    groups = rollouts.sample(prompts, cfg.group_size, cfg.max_tokens, sampled_version)
    sample_s = time.perf_counter() - t
    rewards = torch.tensor([[token_fraction_reward(r.token_ids, targets) for r in g]
                            for g in groups])
    flat = [(r.prompt_ids, r) for g in groups for r in g]
    batch = pack_sequences([p for p, _ in flat], [r.token_ids for _, r in flat],
                           pad_id=policy.tokenizer.pad_token_id)
    cuda = policy.device.type == "cuda"
    slept, freed = None, None
    if cfg.colocate:  # the trainer shares the engines' device: it sees what their sleep frees
        free0 = torch.cuda.mem_get_info(policy.device)[0] if cuda else None
        slept = coord.sleep(cfg.sleep_level or 1)
        freed = torch.cuda.mem_get_info(policy.device)[0] - free0 if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats(policy.device)
    t = time.perf_counter()
    old, stats = policy.update(batch, group_advantages(rewards).flatten())
    train_s = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated(policy.device) if cuda else None
    # the engines' logprobs of what they sampled vs the trainer's, same weights: must agree
    mask = batch.completion_mask.bool()
    engine_lp = torch.zeros_like(old)
    engine_lp[mask] = torch.tensor([lp for _, r in flat for lp in r.logprobs])
    gap = float((engine_lp - old)[mask].abs().mean())
    if cfg.quantization is None and gap > cfg.max_logprob_gap:  # (FP8: off-policy by design)
        raise VerificationError(f"engines sampled v{sampled_version} with logprobs {gap:.3g} "
                                f"away from the trainer's: they do not serve its weights")
    synced = syncer.sync(policy)
    return StepRecord(
        step=step, sampled_version=sampled_version,
        reward_mean=float(rewards.mean()), reward_std=float(rewards.std()),
        loss=stats.loss, kl=stats.kl, clip_fraction=stats.clip_fraction,
        logprob_gap=gap, sync_version=synced.version, sync_ok=True,
        sync_seconds=synced.seconds, sync_bytes=synced.nbytes,
        engine_seconds=synced.engine_seconds,
        skipped=(*(slept.engines[0].skipped if slept else ()), *synced.skipped),
        sample_seconds=sample_s, train_seconds=train_s,
        sleep_seconds=max(e.seconds["sleep"] for e in slept.engines) if slept else None,
        freed_bytes=freed, trainer_peak_bytes=peak,
        sample_versions=tuple(r.version for g in groups for r in g),
        sample_engines=dict(Counter(r.engine for g in groups for r in g if r.engine)))



# ---- the loop --------------------------------------------------------------------------------
def run(cfg: GrpoConfig, run_dir: Path, name: str, model_dir: Path, console: Console,
        router_token: str | None = None, actors: list[Any] | None = None) -> dict:
    """Train for ``cfg.steps`` steps on already-initialised Ray; returns the JSON summary.
    ``actors``: engines already serving the model this builds in ``model_dir`` (with LoRA
    enabled for ``cfg.lora``), used instead of starting ``cfg.engines`` and left running."""
    import torch

    from weightsync.config import BroadcastSettings, EngineSpec, TransferConfig
    from weightsync.coordinator import SyncCoordinator
    from weightsync.engine.actor import start_engines, stop_engines
    from weightsync.engine.vllm_compat import resolve_device
    from weightsync.rl.grpo_math import token_fraction_reward
    from weightsync.testing.models import build_text_model

    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    model_dir = build_text_model(model_dir, hidden=cfg.hidden, layers=cfg.layers,
                                 heads=max(1, cfg.hidden // 64), seed=cfg.seed).resolve()
    if cfg.trainer_ranks > 1:  # this process is rank 0; the others start here
        from services.grpo_ranks import ShardedPolicy

        policy = ShardedPolicy.start(model_dir, cfg, device, cfg.trainer_ranks)
    else:
        policy = Policy(model_dir, cfg, device)
    targets = target_ids(policy.tokenizer, cfg.task)
    gpus = engine_gpus(device, cfg.engines)
    # short prompts and completions: a 512-token context; on CPU, eager (vLLM's default there
    # compiles the model: each engine starts in about twice the time); on a GPU, vLLM's default
    # (CUDA graphs: 2.9x the rollout throughput of eager on the H100)
    # FP8 kernels take bf16 activations: a quantized engine computes in bf16
    specs = [EngineSpec(name=f"grpo-engine-{i}", model=str(model_dir),
                        dtype="bfloat16" if cfg.quantization else "float32",
                        seed=cfg.seed + i, device=device, max_model_len=512,
                        enforce_eager=True if device == "cpu" else None,
                        num_gpus=gpus, gpu_memory_utilization=cfg.gpu_memory_utilization,
                        resources=cfg.engine_resources, engine_args=engine_args_of(cfg))
             for i in range(cfg.engines)]
    _say(console, f"starting {cfg.engines} vLLM engine(s) on {device} "
                  f"(model {model_dir}, task {cfg.task!r}: {len(targets)} target tokens) ...")
    t = time.perf_counter()
    own = actors is None
    if actors is None:
        actors = start_engines(specs)
    elif len(actors) != cfg.engines:
        raise ValueError(f"{len(actors)} engines given, the config says {cfg.engines}")
    started_s = time.perf_counter() - t
    _say(console, f"engines up in {started_s:.1f}s")
    records: list[StepRecord] = []
    done = False
    rollouts: Any = None
    fleet: Any = None
    try:
        if cfg.rollout == "openai":
            import ray

            rollouts = OpenAIRollouts(actors, namespace=ray.get_runtime_context().namespace,
                                      host=cfg.router_host, port=cfg.router_port,
                                      token=router_token, lora=ADAPTER if cfg.lora else None)
            _say(console, f"rollouts through the fleet's router at {rollouts.base_url}")
        else:
            rollouts = RayRollouts(actors, policy.prompt_ids,
                                   lora=ADAPTER if cfg.lora else None)
        coord = fleet = SyncCoordinator(actors, TransferConfig(
            broadcast=BroadcastSettings(backend=cfg.backend, host=cfg.sync_host),
            bucket_bytes=cfg.bucket_mib << 20))
        if cfg.trainer_ranks > 1:
            coord = policy.syncing(coord)  # every sync is one ShardedSync across the ranks
        syncer: FullSync | AdapterSync = FullSync(coord, cfg)
        if cfg.lora:  # the untrained adapter first (B = 0: the base's outputs), as v1
            syncer = AdapterSync(coord, cfg.engines,
                                 None if cfg.adapter_leg == "calls" else cfg.adapter_leg)
            first = syncer.sync(policy)
            _say(console, f"adapter {ADAPTER}@v{first.version} synced: {first.nbytes} bytes "
                          f"per engine (the base model: {model_bytes(policy)} bytes)")
        columns = (SpinnerColumn(), TextColumn("[bold]GRPO"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TextColumn("{task.fields[status]}"))
        with Progress(*columns, console=console) as progress:
            bar = progress.add_task("grpo", total=cfg.steps, status="sampling ...")
            for step in range(1, cfg.steps + 1):
                rec = grpo_step(step, cfg, rollouts, coord, syncer, policy, targets)
                records.append(rec)
                _say(progress.console, _step_line(rec, cfg.steps))
                progress.update(bar, advance=1,
                                status=f"reward {rec.reward_mean:.3f}  sync v{rec.sync_version} "
                                       f"{rec.sync_seconds * 1e3:.0f} ms")
        # the last sync must reach the engines too: sample once more on its version
        final = rollouts.sample(list(PROMPTS), cfg.group_size, cfg.max_tokens, syncer.version)
        final_reward = float(torch.tensor([[token_fraction_reward(r.token_ids, targets) for r in g]
                                           for g in final]).mean())
        done = True
    finally:
        if rollouts is not None:
            rollouts.close()
        if cfg.trainer_ranks > 1:
            policy.close(failed=not done)
        if fleet is not None:
            fleet.close()
        if own:
            stop_engines(actors)
    k = max(1, cfg.steps // 5)
    summary = dict(
        first_steps=k, first_reward_mean=sum(r.reward_mean for r in records[:k]) / k,
        last_reward_mean=sum(r.reward_mean for r in records[-k:]) / k,
        final_eval_reward=final_reward, final_version=syncer.version,
        all_syncs_verified=all(r.sync_ok for r in records),
        versions=[r.sync_version for r in records],
        sync_seconds_median=sorted(r.sync_seconds for r in records)[len(records) // 2],
        sync_bytes_median=sorted(r.sync_bytes for r in records)[len(records) // 2],
        model_bytes=model_bytes(policy), lora=cfg.lora,
        engine_start_seconds=started_s, device=device,
        skipped=list(records[0].skipped) if records else [],
        colocated=cfg.colocate, rollout=cfg.rollout,
        every_sample_on_its_version=all(v == r.sampled_version for r in records
                                        for v in r.sample_versions),
        sample_engines=dict(sum((Counter(r.sample_engines) for r in records), Counter())),
        # calls each engine answered over its local channel (None: all through Ray, as for
        # an engine on another node)
        channel_calls=getattr(getattr(coord, "access", None), "inner", None)
        and coord.access.inner.channel_calls(),
        freed_bytes_min=min((r.freed_bytes for r in records if r.freed_bytes is not None),
                            default=None),
        trainer_peak_bytes_max=max((r.trainer_peak_bytes for r in records
                                    if r.trainer_peak_bytes is not None), default=None),
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    from benchmarks.meta import run_meta  # (the repo's one writer of results metadata)

    log = dict(meta=run_meta("grpo", device=device),
               command=" ".join(["python -m services.grpo", *sys.argv[1:]]),
               config=cfg.model_dump(), summary=summary,
               steps=[r.model_dump() for r in records])
    (run_dir / f"{name}.json").write_text(json.dumps(log, indent=1))
    write_plot(records, run_dir / f"{name}.png",
               f"GRPO{' (LoRA r' + str(cfg.lora_rank) + ', adapter-only syncs)' if cfg.lora else ''}"
               f" on {cfg.engines} vLLM engine(s), {device}, task {cfg.task!r}: "
               f"reward {summary['first_reward_mean']:.2f} -> {summary['last_reward_mean']:.2f}")
    return summary


app = typer.Typer(add_completion=False, help=__doc__.split("\n\n")[0])


@app.command()
def main(
    steps: int = typer.Option(40, min=1, help="training steps (one sync after each)"),
    engines: int = typer.Option(2, min=1, help="vLLM engines (Ray actors)"),
    prompts_per_step: int = typer.Option(4, min=1),
    group_size: int = typer.Option(8, min=2, help="completions per prompt (the GRPO group)"),
    max_tokens: int = typer.Option(16, min=1),
    task: str = typer.Option("digits", help="reward: 'digits' (numeral tokens) or 'yes'"),
    lr: float = typer.Option(2e-3),
    beta: float = typer.Option(0.04, help="KL weight"),
    clip_eps: float = typer.Option(0.2),
    epochs: int = typer.Option(2, min=1, help="optimizer steps per sampled batch"),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto", help="auto | cpu | cuda (trainer and engines)"),
    backend: str = typer.Option("gloo", help="broadcast backend: gloo | nccl"),
    sync_host: str = typer.Option("auto", help="trainer address for the transfer rendezvous; "
                                  "auto: 127.0.0.1 on a local Ray, this node's IP on a cluster"),
    ipc: bool = typer.Option(False, help="CUDA IPC to colocated engines instead of broadcast"),
    colocate: bool = typer.Option(False, help="engines sleep (--sleep-level, 2 recommended) "
                                  "during each training step; the sync goes into them"),
    sleep_level: int = typer.Option(1, min=0, max=2, help="engine sleep level during a sync (GPU)"),
    bucket_mib: int = typer.Option(16, min=1),
    run_dir: Path = typer.Option(Path("runs/grpo"), help="where the JSON log and PNG go"),
    name: str = typer.Option("grpo", help="file stem of the JSON log and PNG"),
    model_dir: Path = typer.Option(Path("runs/models/tiny-qwen2-grpo")),
    ray_address: str | None = typer.Option(
        None, envvar="RAY_ADDRESS", help="join this Ray cluster (set by `ray job submit`)"),
    num_cpus: int = typer.Option(2, min=1, help="CPUs for a local Ray (no address)"),
    engine_logs: bool = typer.Option(False, help="forward engine actor logs to this console"),
    trainer_ranks: int = typer.Option(1, min=1, help="FSDP2 trainer ranks (processes; CPU)"),
    rollout: str = typer.Option("ray", help="ray: the engines' generate over Ray; openai: the "
                                "fleet's OpenAI router (/v1) with the openai client"),
    engine_resources: str = typer.Option("{}", help="Ray custom resources each engine needs, "
                                         "as JSON (pins engines to nodes): '{\"rollout\": 1}'"),
    router_host: str = typer.Option("127.0.0.1", help="--rollout openai: the router's address "
                                    "(not loopback: needs WEIGHTSYNC_TOKEN)"),
    router_port: int = typer.Option(0, min=0, max=65535, help="the router's port (0: free)"),
    lora: bool = typer.Option(False, help="train a LoRA adapter (peft, every linear layer) on "
                              "the frozen base and sync only the adapter each step"),
    lora_rank: int = typer.Option(16, min=1, max=512, help="--lora: the adapter's rank"),
    lora_alpha: float = typer.Option(32.0, help="--lora: peft's lora_alpha (scale alpha/rank)"),
    adapter_leg: str = typer.Option("calls", help="--lora: the adapter's bytes in the engine "
                                    "calls, once over the transfer group ('broadcast'), or "
                                    "over CUDA IPC to colocated engines ('ipc')"),
    quantization: str = typer.Option("", help="'fp8': roll out on FP8 engines (vLLM's online "
                                     "FP8, re-quantized on every sync; GPU only), recording "
                                     "the engine-vs-trainer logprob gap per step"),
) -> None:
    import warnings

    settings = Settings()  # the process's environment, read once
    prepare(ray_address, settings.ray_auth_mode)  # own Ray: token auth, before its import
    import ray

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"ray\.")
    console = Console()
    if ray_address:
        ray.init(address=ray_address, log_to_driver=engine_logs)
    else:
        ray.init(num_cpus=num_cpus, log_to_driver=engine_logs, **init_kwargs())
    if sync_host == "auto":
        sync_host = ray.util.get_node_ip_address() if ray_address else "127.0.0.1"
    try:
        cfg = GrpoConfig(steps=steps, engines=engines, prompts_per_step=prompts_per_step,
                         group_size=group_size, max_tokens=max_tokens, task=task, lr=lr,
                         beta=beta, clip_eps=clip_eps, epochs=epochs, seed=seed, device=device,
                         backend=backend, sync_host=sync_host, ipc=ipc, colocate=colocate,
                         sleep_level=sleep_level, bucket_mib=bucket_mib,
                         trainer_ranks=trainer_ranks, rollout=rollout,
                         engine_resources=json.loads(engine_resources),
                         router_host=router_host, router_port=router_port, lora=lora,
                         lora_rank=lora_rank, lora_alpha=lora_alpha,
                         adapter_leg=adapter_leg, quantization=quantization or None)
        summary = run(cfg, run_dir, name, model_dir, console,
                      router_token=settings.token)
    finally:
        ray.shutdown()
    _say(console, f"reward: first {summary['first_steps']} steps {summary['first_reward_mean']:.3f}"
                  f" -> last {summary['first_steps']} steps {summary['last_reward_mean']:.3f}"
                  f" (final eval on v{summary['final_version']}: "
                  f"{summary['final_eval_reward']:.3f})")
    _say(console, f"all {len(summary['versions'])} syncs verified "
                  f"(versions {summary['versions'][0]}..{summary['final_version']}"
                  f"{' of adapter ' + ADAPTER if lora else ''}), median sync "
                  f"{summary['sync_seconds_median'] * 1e3:.0f} ms, "
                  f"{summary['sync_bytes_median']} bytes per engine")
    _say(console, f"log:  {(run_dir / f'{name}.json').resolve()}")
    _say(console, f"plot: {(run_dir / f'{name}.png').resolve()}")


if __name__ == "__main__":
    app()
