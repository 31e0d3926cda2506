"""GRPO's trainer on several ranks (``python -m services.grpo --trainer-ranks N``).

The policy is sharded with FSDP2 (``fully_shard`` per decoder layer and at the root) over N
processes joined by torch.distributed (gloo on CPU, NCCL on GPU). This process is rank 0: it
samples from the engines, scores, and owns the coordinator; the other ranks are spawned here and
follow it. Each step rank 0 broadcasts the batch, every rank takes its share of the rows
(FSDP2 averages the gradients), rank 0 gathers the pre-update logprobs for its engine check, and
the sync is one ``ShardedSync`` across all ranks: each bucket's shards are gathered to rank 0,
which alone talks to the engines.

``ShardedPolicy`` is a drop-in for ``services.grpo.Policy`` and ``RankedCoordinator`` for the
coordinator as ``grpo_step`` uses it, so the training loop does not change.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from services.grpo import GrpoConfig, Policy

logger = logging.getLogger(__name__)

_STOP, _STEP = 0, 1
TIMEOUT_S = 900.0  # the longest a rank waits for another (engine start-up included)


def _shard(policy: Policy, world: int, device: str) -> None:
    """FSDP2-shard the policy's model (its frozen reference stays whole) and rebuild its
    optimizer over the shards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(torch.device(device).type, (world,))
    for layer in policy.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(policy.model, mesh=mesh)
    policy.opt = torch.optim.AdamW(policy.model.parameters(), lr=policy.cfg.lr, weight_decay=0.0)


def _rows(n: int, rank: int, world: int) -> torch.Tensor:
    return torch.tensor_split(torch.arange(n), world)[rank]


def _broadcast_step(batch: Any | None, advantages: torch.Tensor | None) -> tuple[Any, Any]:
    """Rank 0's batch and advantages on every rank (shapes first, then the tensors)."""
    import torch.distributed as dist

    from weightsync.rl.grpo_math import PackedBatch

    shape = torch.tensor(list(batch.input_ids.shape) if batch is not None else [0, 0])
    dist.broadcast(shape, 0)
    b, n = shape.tolist()
    if batch is None:
        batch = PackedBatch(input_ids=torch.zeros(b, n, dtype=torch.long),
                            attention_mask=torch.zeros(b, n, dtype=torch.long),
                            completion_mask=torch.zeros(b, n - 1))
        advantages = torch.zeros(b)
    for t in (batch.input_ids, batch.attention_mask, batch.completion_mask, advantages):
        dist.broadcast(t, 0)
    return batch, advantages


def _slice(batch: Any, advantages: torch.Tensor, rows: torch.Tensor) -> tuple[Any, Any]:
    from weightsync.rl.grpo_math import PackedBatch

    return PackedBatch(input_ids=batch.input_ids[rows], attention_mask=batch.attention_mask[rows],
                       completion_mask=batch.completion_mask[rows]), advantages[rows]


class ShardedPolicy(Policy):
    """Rank 0 of a policy FSDP2-sharded over ``world`` ranks; ``start`` spawns the others."""

    @classmethod
    def start(cls, model_dir: Path, cfg: GrpoConfig, device: str, world: int) -> ShardedPolicy:
        import torch.distributed as dist
        import torch.multiprocessing as mp

        from weightsync.errors import ConfigError

        if not device.startswith("cpu"):  # the step messages are CPU tensors (gloo)
            raise ConfigError("--trainer-ranks > 1 runs on CPU (gloo) for now")

        # rank 0's store listens before the others start: its port is taken, not picked free
        # and released (another process could bind it in between)
        store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False,
                              timeout=timedelta(seconds=TIMEOUT_S))
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_follower, args=(r, world, store.port, str(model_dir),
                                                      cfg.model_dump_json(), device),
                             name=f"grpo-rank-{r}", daemon=True) for r in range(1, world)]
        for p in procs:
            p.start()
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", store=store,
                                rank=0, world_size=world, timeout=timedelta(seconds=TIMEOUT_S))
        policy = cls(model_dir, cfg, device)
        _shard(policy, world, device)
        policy.world, policy.procs = world, procs
        return policy

    def update(self, batch: Any, advantages: Any) -> tuple[Any, Any]:
        """Every rank's share of one update; the pre-update logprobs of the whole batch."""
        import torch.distributed as dist

        dist.broadcast(torch.tensor([_STEP]), 0)
        batch, advantages = _broadcast_step(batch, advantages)
        rows = _rows(batch.input_ids.shape[0], 0, self.world)
        old, stats = super().update(*_slice(batch, advantages, rows))
        full = torch.zeros(batch.completion_mask.shape, dtype=old.dtype)
        full[rows] = old
        for r in range(1, self.world):  # the other ranks' rows
            theirs = _rows(full.shape[0], r, self.world)
            part = torch.empty(len(theirs), full.shape[1], dtype=old.dtype)
            dist.recv(part, src=r)
            full[theirs] = part
        return full, stats

    def syncing(self, coordinator: Any) -> RankedCoordinator:
        return RankedCoordinator(coordinator)

    def close(self, failed: bool = False) -> None:
        """Stop the other ranks: between steps they wait for rank 0's next command. After a
        failure (``failed``) they may wait anywhere in a step (a follower inside a sync waits up
        to ``TIMEOUT_S`` for a message that will not come): they are killed instead, and the
        group is left to the process's exit (gloo's teardown over dead peers can abort it)."""
        import torch.distributed as dist

        if failed:
            for p in self.procs:
                p.kill()
                p.join(10)
            return
        try:
            dist.broadcast(torch.tensor([_STOP]), 0)
        except RuntimeError:
            logger.warning("could not stop the other trainer ranks", exc_info=True)
        for p in self.procs:
            p.join(60)
            if p.is_alive():
                p.kill()
        dist.destroy_process_group()


class RankedCoordinator:
    """The coordinator as ``grpo_step`` uses it, its syncs made with every trainer rank."""

    def __init__(self, coordinator: Any) -> None:
        from weightsync.sources.sharded import ShardedSync

        self.coordinator = coordinator
        self.sharded = ShardedSync(coordinator, timeout_s=TIMEOUT_S)

    @property
    def version(self) -> int:
        return self.coordinator.version

    def sync(self, model: torch.nn.Module, **kwargs: Any) -> Any:
        return self.sharded.sync(model, **kwargs)

    def __getattr__(self, name: str) -> Any:  # sleep, wake_up, close, ...: rank 0's alone
        return getattr(self.coordinator, name)


def _follower(rank: int, world: int, port: int, model_dir: str, cfg_json: str,
              device: str) -> None:
    """Rank ``rank``: its share of every update, then its part of every sync."""
    import torch.distributed as dist

    from weightsync.sources.sharded import ShardedSync

    store = dist.TCPStore("127.0.0.1", port, world, is_master=False,
                          timeout=timedelta(seconds=TIMEOUT_S))
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", store=store,
                            rank=rank, world_size=world, timeout=timedelta(seconds=TIMEOUT_S))
    if device.startswith("cuda"):
        device = f"cuda:{rank % torch.cuda.device_count()}"
    torch.set_num_threads(1)
    policy = Policy(Path(model_dir), GrpoConfig.model_validate_json(cfg_json), device)
    _shard(policy, world, device)
    sharded = ShardedSync(None, timeout_s=TIMEOUT_S)  # created with rank 0's, in order
    while True:
        cmd = torch.tensor([_STOP])
        dist.broadcast(cmd, 0)
        if cmd.item() == _STOP:
            break
        batch, advantages = _broadcast_step(None, None)
        rows = _rows(batch.input_ids.shape[0], rank, world)
        old, _ = policy.update(*_slice(batch, advantages, rows))
        dist.send(old.contiguous(), dst=0)
        sharded.sync(policy.model)
    dist.destroy_process_group()
