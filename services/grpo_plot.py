"""The GRPO job's plot: ``services.grpo``'s step records, one PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from weightsync.types import exclusive_phases


def write_plot(records: Sequence[Any], path: Path, title: str) -> None:
    """Reward per step, each sync's phases, and (colocated on a GPU) the memory sleep freed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r.step for r in records]
    mean = [r.reward_mean for r in records]
    std = [r.reward_std for r in records]
    memory = [r for r in records if r.freed_bytes is not None]
    fig, axes = plt.subplots(3 if memory else 2, 1, figsize=(9, 10 if memory else 7),
                             sharex=True)
    top, bottom = axes[0], axes[1]
    top.plot(steps, mean, marker="o", ms=3, label="mean reward (all groups)")
    top.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                     alpha=0.2, label="± std")
    top.set_ylabel("reward")
    top.set_ylim(bottom=min(0.0, min(mean)))
    top.grid(alpha=0.3)
    top.legend(loc="upper left")
    top.set_title(title)
    first = next(iter(records[0].engine_seconds))
    phases = list(dict.fromkeys(p for r in records
                                for p in exclusive_phases(r.engine_seconds.get(first, {}))))
    stack = [[r.engine_seconds.get(first, {}).get(p, 0.0) * 1e3 for r in records] for p in phases]
    if phases:  # (an adapter sync reports its total only)
        bottom.stackplot(steps, stack, labels=[f"{first}: {p}" for p in phases], alpha=0.7)
    bottom.plot(steps, [r.sync_seconds * 1e3 for r in records], color="black", lw=1.5,
                label="coordinator total")
    first, rest = records[0].sync_seconds * 1e3, [r.sync_seconds * 1e3 for r in records[1:]]
    if rest and first > 1.2 * max(rest):  # the first sync also sets up the transfer group
        bottom.set_ylim(0, 1.2 * max(rest))
        bottom.annotate(f"step 1: {first:.0f} ms (off scale: first sync)", xy=(1, 1.2 * max(rest)),
                        xytext=(4, -12), textcoords="offset points", fontsize=8)
    bottom.set_xlabel("step (one sync after each)")
    bottom.set_ylabel("sync time (ms)")
    bottom.grid(alpha=0.3)
    bottom.legend(loc="upper right", fontsize=7, ncol=2)
    if memory:  # colocated on a GPU: what each sleep gave the trainer, and what it used
        mem = axes[2]
        mem.bar([r.step for r in memory], [r.freed_bytes / (1 << 30) for r in memory],
                alpha=0.5, label="freed by the engines' sleep")
        mem.plot([r.step for r in memory], [(r.trainer_peak_bytes or 0) / (1 << 30)
                                            for r in memory], "k.-", label="train step peak")
        mem.set_ylabel("GiB")
        mem.set_xlabel("step")
        mem.grid(alpha=0.3)
        mem.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
