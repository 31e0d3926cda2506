"""GRPO arithmetic: rewards, group advantages, sequence packing and the clipped loss."""

from __future__ import annotations

import pytest
import torch

from weightsync.rl.grpo_math import (
    group_advantages,
    grpo_loss,
    kl_k3,
    pack_sequences,
    sequence_logprobs,
    token_fraction_reward,
)


def test_reward_is_the_fraction_of_target_tokens():
    assert token_fraction_reward([1, 2, 3, 1], frozenset({1})) == 0.5
    assert token_fraction_reward([], frozenset({1})) == 0.0


def test_advantages_are_normalised_per_group_and_zero_for_ties():
    adv = group_advantages(torch.tensor([[0.0, 1.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]]))
    assert torch.allclose(adv[0], torch.tensor([-1.0, 1.0, -1.0, 1.0]), atol=1e-3)
    assert torch.equal(adv[1], torch.zeros(4))
    with pytest.raises(ValueError):
        group_advantages(torch.ones(3))


def test_packing_marks_exactly_the_logits_that_predict_completion_tokens():
    b = pack_sequences([[5, 6], [7]], [[8, 9, 10], [11]], pad_id=0)
    assert b.input_ids.tolist() == [[5, 6, 8, 9, 10], [7, 11, 0, 0, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    # row 0: logits at 1, 2, 3 predict 8, 9, 10; row 1: logit at 0 predicts 11
    assert b.completion_mask.tolist() == [[0, 1, 1, 1], [1, 0, 0, 0]]


def test_sequence_logprobs_pick_the_next_token():
    logits = torch.log(torch.tensor([[[0.1, 0.9], [0.6, 0.4], [0.5, 0.5]]]))
    lp = sequence_logprobs(logits, torch.tensor([[0, 1, 0]]))
    assert torch.allclose(lp.exp(), torch.tensor([[0.9, 0.6]]))


def test_kl_k3_is_zero_at_the_reference_and_positive_elsewhere():
    x = torch.tensor([-1.0, -2.0])
    assert torch.equal(kl_k3(x, x), torch.zeros(2))
    assert (kl_k3(x, x + 0.3) > 0).all()


def test_loss_gradient_raises_the_logprob_of_positive_advantage_tokens():
    logp = torch.tensor([[-1.0, -1.0], [-1.0, -1.0]], requires_grad=True)
    old = logp.detach().clone()
    mask = torch.ones(2, 2)
    loss, stats = grpo_loss(logp, old, old, torch.tensor([1.0, -1.0]), mask, beta=0.0)
    loss.backward()
    assert (logp.grad[0] < 0).all() and (logp.grad[1] > 0).all()  # descent raises row 0
    assert stats.clip_fraction == 0.0 and stats.kl == 0.0


def test_ratio_is_clipped_and_masked_tokens_do_not_count():
    old = torch.zeros(1, 2)
    logp = torch.tensor([[1.0, 5.0]], requires_grad=True)  # ratio e >> 1.2 on token 0
    loss, stats = grpo_loss(logp, old, old, torch.tensor([1.0]), torch.tensor([[1.0, 0.0]]),
                            clip_eps=0.2, beta=0.0)
    assert stats.policy_loss == pytest.approx(-1.2)
    assert stats.clip_fraction == 1.0
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros(1, 2))  # clipped and masked: no gradient
