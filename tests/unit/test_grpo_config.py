"""The GRPO job's configuration: what ``--lora`` combines with, and the engine arguments it
asks vLLM for."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.grpo import GrpoConfig
from services.grpo_sync import lora_args


@pytest.mark.parametrize(("extra", "named"), [
    ({"colocate": True, "sleep_level": 2}, "--sleep-level 2"),
    ({"trainer_ranks": 2}, "--trainer-ranks"),
])
def test_lora_refuses_what_it_does_not_combine_with_and_says_which(extra, named):
    GrpoConfig(lora=True, rollout="openai")  # the router serves adapters by name
    GrpoConfig(lora=True, colocate=True)  # level 1 (the default): the base stays in memory
    with pytest.raises(ValidationError, match=named):
        GrpoConfig(lora=True, **extra)
    GrpoConfig(**extra)  # each is fine without --lora


@pytest.mark.parametrize(("rank", "max_rank"), [(1, 1), (4, 8), (16, 16), (17, 32), (512, 512)])
def test_lora_engines_get_the_smallest_max_rank_vllm_accepts_and_three_slots(rank, max_rank):
    assert lora_args(GrpoConfig(lora=True, lora_rank=rank)) == {
        "enable_lora": True, "max_loras": 3, "max_lora_rank": max_rank}
    assert lora_args(GrpoConfig()) == {}


def test_fp8_rollouts_are_refused_on_cpu_and_ask_vllm_for_online_fp8_in_bf16():
    """``--quantization fp8`` (#32): a CPU job is refused when it is configured, naming why;
    on a GPU the engines get vLLM's online FP8 next to any LoRA arguments."""
    from services.grpo_sync import engine_args_of

    with pytest.raises(ValidationError, match="--quantization fp8: .*needs a CUDA GPU"):
        GrpoConfig(quantization="fp8", device="cpu")
    cfg = GrpoConfig(quantization="fp8", device="cuda", lora=True, lora_rank=8)
    assert engine_args_of(cfg) == {"enable_lora": True, "max_loras": 3, "max_lora_rank": 8,
                                   "quantization": "fp8"}
    assert engine_args_of(GrpoConfig()) == {}
