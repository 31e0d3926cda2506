"""Engines whose in-place reload vLLM gets wrong refuse syncs before anything changes
(``vllm_compat.reload_refusal``, #32): MoE experts vLLM quantizes to FP8 (measured warm !=
cold on an H100, ``benchmarks/results/gpu-fp8.json``). The module tree here stands in for a
worker's model (the GPU suite starts a real FP8 MoE engine,
``test_an_fp8_moe_engine_refuses_a_sync_before_anything_changes``); vLLM's own method classes
are used, so the check is the one a real engine runs."""

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


@pytest.mark.parametrize("name", ["Fp8MoEMethod", "Fp8OnlineMoEMethod",
                                  "Fp8PerTensorOnlineMoEMethod"])
def test_fp8_experts_are_refused_with_the_measurement(name):
    why = vllm_compat.reload_refusal(_worker(_method(name)))
    assert why is not None and "experts quantized to FP8" in why and "0.089" in why, why


def test_unquantized_experts_and_lora_on_this_vllm_are_not_refused():
    assert vllm_compat.reload_refusal(_worker(_method("UnquantizedFusedMoEMethod"))) is None
    assert vllm_compat.reload_refusal(_worker(None)) is None
    # vLLM 0.32 (CI's) reloads base weights into LoRA-wrapped layers (reload.inplace)
    assert vllm_compat.reload_refusal(_worker(None, lora=True)) is None
