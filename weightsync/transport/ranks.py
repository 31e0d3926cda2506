"""Ranks of a transfer group: the trainer is rank 0, then every worker of every engine.

An engine is as many vLLM workers as its parallel config says (``parallel_config.world_size``:
tensor x pipeline (x prefill-context) parallel), and every one of them joins the group, because
each loads its own slice of every parameter from the full checkpoint tensors. vLLM numbers an
engine's workers ``0 .. world_size - 1`` (``parallel_config.rank``, pipeline-major:
``pp_rank * tp_size + tp_rank``), so engine ``i``'s workers sit at ``offset_i + that rank`` and
``offset_{i+1} = offset_i + workers_i``. vLLM's own weight transfer does the same
(``rank_offset + worker rank``, trainer at 0). This module is the only place that does this
arithmetic; the sender legs and the workers both go through it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from weightsync.errors import ConfigError, TransferError

SENDER_RANK = 0


@dataclass(frozen=True)
class GroupRanks:
    """Where every engine's workers sit in one group, engines in the order given."""

    offsets: tuple[tuple[str, int], ...]  # (engine, rank of its worker 0), in group order
    workers: tuple[tuple[str, int], ...]  # (engine, its number of workers)

    @classmethod
    def of(cls, workers: Mapping[str, int]) -> GroupRanks:
        """Ranks for engines with ``workers[name]`` workers each (insertion order = rank
        order: the chain broadcast visits engines in this order)."""
        if not workers:
            raise ConfigError("a transfer group needs at least one engine")
        bad = {n: w for n, w in workers.items() if w < 1}
        if bad:
            raise ConfigError(f"every engine has at least one worker, not {bad}")
        offsets, nxt = [], SENDER_RANK + 1
        for name, w in workers.items():
            offsets.append((name, nxt))
            nxt += w
        return cls(offsets=tuple(offsets), workers=tuple(workers.items()))

    @property
    def world_size(self) -> int:
        """The trainer plus every worker of every engine."""
        return 1 + sum(w for _, w in self.workers)

    def offset(self, engine: str) -> int:
        return dict(self.offsets)[engine]

    def ranks(self, engine: str) -> range:
        """The group ranks of ``engine``'s workers, its worker 0 first."""
        first = self.offset(engine)
        return range(first, first + dict(self.workers)[engine])

    def owner(self, rank: int) -> tuple[str, int]:
        """(engine, its worker's own rank) of a group rank (for error messages)."""
        for name, first in self.offsets:
            if rank in self.ranks(name):
                return name, rank - first
        raise ConfigError(f"rank {rank} is no engine worker's in a group of {self.world_size}")


def worker_group_rank(rank_offset: int, worker_rank: int, workers: int,
                      world_size: int) -> int:
    """A worker's rank in the group: its engine's offset plus its own rank in the engine
    (vLLM's ``parallel_config.rank``). Raises ``TransferError`` if that does not fit the
    group the sender sized (an engine whose worker count the sender got wrong)."""
    if not 0 <= worker_rank < workers:
        raise TransferError(f"worker rank {worker_rank} outside its engine's {workers} "
                            "workers")
    rank = rank_offset + worker_rank
    if not SENDER_RANK < rank < world_size:
        raise TransferError(f"group rank {rank} (offset {rank_offset} + worker "
                            f"{worker_rank}) outside a group of {world_size}")
    return rank
