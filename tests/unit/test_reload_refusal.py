"""Engines whose in-place reload vLLM gets wrong refuse syncs before anything changes
(``vllm_compat.reload_refusal``): LoRA-enabled engines on a vLLM that cannot reload base
weights into LoRA-wrapped layers (0.24). MoE experts quantized to FP8 are not refused: their
tensors equal a cold engine's after syncs (``benchmarks/results/gpu-suite.json``; the GPU suite's
``test_fp8_engine_synced_from_bf16_equals_a_cold_fp8_engine[moe]``). The module tree here
stands in for a worker's model; vLLM's own method classes are used, so the check is the one a
real engine runs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from vllm.model_executor.layers.fused_moe import FusedMoEMethodBase

from weightsync.engine import vllm_compat


def _method(name: str) -> FusedMoEMethodBase:
    """An instance of a ``FusedMoEMethodBase`` subclass called ``name`` (vLLM's constructor,
    which needs a whole MoE config, is not run)."""
    cls = type(name, (FusedMoEMethodBase,),
               {m: lambda *a, **k: None for m in FusedMoEMethodBase.__abstractmethods__})
    return object.__new__(cls)


def _worker(method: object | None, lora: bool = False) -> SimpleNamespace:
    experts = torch.nn.Module()
    experts.quant_method = method
    model = torch.nn.Module()
    model.add_module("experts", experts)
    runner = SimpleNamespace(get_model=lambda: model, lora_manager=object() if lora else None)
    return SimpleNamespace(model_runner=runner)


@pytest.mark.parametrize("name", ["UnquantizedFusedMoEMethod", "Fp8MoEMethod",
                                  "Fp8OnlineMoEMethod", "Fp8PerTensorOnlineMoEMethod"])
def test_experts_quantized_or_not_are_not_refused(name):
    assert vllm_compat.reload_refusal(_worker(_method(name))) is None


def test_no_experts_and_lora_on_this_vllm_are_not_refused():
    assert vllm_compat.reload_refusal(_worker(None)) is None
    # vLLM 0.32 (CI's) reloads base weights into LoRA-wrapped layers (reload.inplace)
    assert vllm_compat.reload_refusal(_worker(None, lora=True)) is None


def test_lora_on_a_vllm_without_the_inplace_reload_is_refused(monkeypatch):
    """vLLM 0.24 (the GPU box's) has no ``reload.inplace``: its reload cannot reach the base
    weights of LoRA-wrapped layers (measured there: ``KeyError`` on ``qkv_proj.weight``)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.endswith(
        "model_loader.reload.inplace") else real(name, *a))
    why = vllm_compat.reload_refusal(_worker(None, lora=True))
    assert why is not None and "LoRA" in why and "sync_adapter" in why, why
    assert vllm_compat.reload_refusal(_worker(None)) is None
