"""GRPO arithmetic: verifiable rewards, group-normalised advantages, the clipped-ratio loss.

Pure functions over tensors so they are unit-tested without engines. Shapes: a batch holds
``groups * group_size`` sequences; per-token tensors are ``[batch, length]`` with a 0/1 mask
marking the completion tokens (prompt and padding are 0).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch


def token_fraction_reward(token_ids: Sequence[int], targets: frozenset[int]) -> float:
    """Fraction of a completion's tokens that are in ``targets`` (0 for an empty completion).

    Verifiable and dense: every completion scores in [0, 1], so a random policy already sees a
    signal when the targets are a few percent of the vocabulary.
    """
    if not token_ids:
        return 0.0
    return sum(t in targets for t in token_ids) / len(token_ids)


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """``(r - mean) / (std + eps)`` within each group (row) of a ``[groups, size]`` tensor.

    A group whose completions all scored the same carries no preference: its advantages are 0.
    """
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [groups, size>=2], got {tuple(rewards.shape)}")
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True, unbiased=False)
    return (rewards - mean) / (std + eps)


@dataclass(frozen=True)
class PackedBatch:
    """Prompt + completion token ids, right-padded, with the completion mask shifted by one
    so that ``mask[b, t]`` marks the logits at ``t`` that predict completion token ``t + 1``."""

    input_ids: torch.Tensor  # [B, L] long
    attention_mask: torch.Tensor  # [B, L] long
    completion_mask: torch.Tensor  # [B, L - 1] float

    def to(self, device: torch.device | str) -> PackedBatch:
        return PackedBatch(self.input_ids.to(device), self.attention_mask.to(device),
                           self.completion_mask.to(device))


def pack_sequences(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                   pad_id: int) -> PackedBatch:
    """Concatenate each prompt with its completion and right-pad the batch."""
    if len(prompts) != len(completions) or not prompts:
        raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
    rows = [list(p) + list(c) for p, c in zip(prompts, completions, strict=True)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    comp = torch.zeros((len(rows), width - 1), dtype=torch.float32)
    for b, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        if not p:
            raise ValueError("an empty prompt has no position to predict the first token from")
        n = len(p) + len(c)
        ids[b, :n] = torch.tensor(rows[b], dtype=torch.long)
        attn[b, :n] = 1
        comp[b, len(p) - 1:n - 1] = 1.0
    return PackedBatch(ids, attn, comp)


def sequence_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """``log p(input_ids[:, t+1] | ...)`` from ``logits[:, t]``: shape ``[B, L - 1]``."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(policy || reference) estimator ``exp(d) - d - 1`` with ``d = ref - logp``:
    unbiased, always >= 0, and exact in gradient at ``logp == ref_logp``."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


@dataclass(frozen=True)
class LossStats:
    loss: float
    policy_loss: float
    kl: float
    clip_fraction: float


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor,
              advantages: torch.Tensor, mask: torch.Tensor, *, clip_eps: float = 0.2,
              beta: float = 0.04) -> tuple[torch.Tensor, LossStats]:
    """The GRPO objective, token-level mean over completion tokens (DAPO-style averaging).

    ``advantages`` is one value per sequence ``[B]``; ``logp``/``old_logp``/``ref_logp``/``mask``
    are ``[B, T]``. The ratio ``exp(logp - old_logp)`` is clipped to ``1 +- clip_eps`` (PPO);
    ``beta`` weighs the k3 KL to the frozen reference.
    """
    if not (logp.shape == old_logp.shape == ref_logp.shape == mask.shape):
        raise ValueError("logp, old_logp, ref_logp and mask must have one shape")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages {tuple(advantages.shape)} != batch {logp.shape[0]}")
    adv = advantages.unsqueeze(1)
    ratio = torch.exp(logp - old_logp.detach())
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl = kl_k3(logp, ref_logp.detach())
    n = mask.sum().clamp_min(1.0)
    policy_loss = (per_token * mask).sum() / n
    kl_mean = (kl * mask).sum() / n
    loss = policy_loss + beta * kl_mean
    with torch.no_grad():
        clip_frac = (((ratio - clipped).abs() > 0).float() * mask).sum() / n
    return loss, LossStats(loss=loss.detach().item(), policy_loss=policy_loss.detach().item(),
                           kl=kl_mean.detach().item(), clip_fraction=clip_frac.item())


def mean(values: Iterable[float]) -> float:
    vals = list(values)
    return sum(vals) / len(vals) if vals else float("nan")
