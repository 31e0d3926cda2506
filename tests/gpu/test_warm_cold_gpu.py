"""Warm == cold on the GPU: eager and CUDA graphs, a tied dense model, a MoE and an MLA + MoE
(DeepSeek-V2-shaped), syncs into an awake engine and into one asleep at levels 1 and 2, bf16.

The oracle is a cold engine of the same spec — the same model path, so vLLM's compile cache
(keyed by the model's path) hands it the same compiled kernels — started after the trainer's
weights were written there by ``save_pretrained``. After 4 colocated IPC syncs (checkpoint
format first, kernel layout after; in ``graphs-sleep`` into the engine asleep, at levels 1,
2, 1, 2), every tensor the warm engine's kernels read must equal the cold one's
(``engine.kernel_reads``), and its greedy tokens and logprobs the cold one's bit for bit.
Each sync's report says what the engine had to restore or rebuild (``engine.derived``).
The sync time and rollout throughput of an eager and a CUDA-graph engine side by side are a
benchmark: ``scripts/gpu_bench.sh graphs`` (``benchmarks/graphs_gpu.py``).
"""

from __future__ import annotations

import shutil

import pytest
import torch

from tests.gpu.parity import (
    PROMPTS,
    against_cold,
    engine_generate,
    plain,
    same_tensors,
    start_colocated,
)
from weightsync.config import TransferConfig
from weightsync.coordinator import SyncCoordinator
from weightsync.testing.reference import perturb_

pytestmark = pytest.mark.gpu

QWEN05_BF16 = dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864,
                   vocab_size=151936, tie_word_embeddings=True, dtype="bfloat16")
MLA = dict(hidden=256, layers=2, heads=4, experts=8, top_k=2, moe_intermediate=128,
           kv_lora_rank=512, vocab_size=512, dtype="bfloat16")
MOE = dict(hidden=256, layers=2, heads=4, kv_heads=2, head_dim=64, experts=16, top_k=4,
           moe_intermediate=128, vocab_size=512, dtype="bfloat16")


def _model(kind: str, root):
    from weightsync.testing.models import build_mla_model, build_moe_model, build_text_model

    if kind == "dense-tied":
        return build_text_model(root / "qwen2.5-0.5b-shaped-bf16", **QWEN05_BF16)
    if kind == "mla":
        return build_mla_model(root / "small-deepseek-v2-bf16", **MLA)
    return build_moe_model(root / "small-qwen3-moe-bf16", **MOE)


def _trainer(kind: str, path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()


@pytest.mark.parametrize("kind,mode", [("dense-tied", "eager"), ("dense-tied", "graphs"),
                                       ("dense-tied", "graphs-sleep"), ("moe", "graphs"),
                                       ("mla", "eager"), ("mla", "graphs"),
                                       ("moe", "eager"), ("moe", "graphs-checkpoint")])
def test_warm_engine_equals_cold_engine(gpu_ray, model_root, tmp_path, gpu_results, kind, mode):
    """``graphs-checkpoint``: every sync in the checkpoint format (vLLM's layerwise reload),
    where the other modes take the kernel layout after the first: the case that shows a
    MoE model's reload leaves nothing stale (bit for bit at e13edc2, as ``moe-eager``)."""
    src = _model(kind, model_root)
    path = tmp_path / "model"  # the engines' own copy: overwritten with the synced weights
    shutil.copytree(src, path)
    eager = mode == "eager"
    trainer = _trainer(kind, path)
    warm = start_colocated(f"warm-{kind}-{mode}", path, "bfloat16", enforce_eager=eager,
                           gpu_memory_utilization=0.25)
    data = gpu_results.setdefault("warm_cold", {})[f"{kind}-{mode}"] = {}
    layout = "checkpoint" if mode == "graphs-checkpoint" else "auto"
    coord = SyncCoordinator([warm], TransferConfig(bucket_bytes=256 << 20,
                                                   ipc_reuse_buffers=True, layout=layout))
    try:
        rebuilt: list[str] = []
        layouts = []
        for i in range(4):
            perturb_(trainer, scale=0.02, seed=300 + i)
            torch.cuda.synchronize()
            sleep = {"sleep_level": 1 + i % 2} if mode == "graphs-sleep" else {}
            res = coord.sync(trainer, ipc=True, **sleep)
            assert res.ok, res
            assert not sleep or "sleep" in res.engines[0].seconds, res.engines[0].skipped
            layouts.append(res.layout)
            rebuilt += [n for e in res.engines for n in e.rebuilt]
        data.update(layouts=layouts, rebuilt=sorted(set(rebuilt)))
        warm_out = plain(engine_generate(warm, PROMPTS))
        trainer.save_pretrained(path)
    finally:
        coord.close()
    found = against_cold(warm, warm_out, lambda: start_colocated(
        f"cold-{kind}-{mode}", path, "bfloat16", enforce_eager=eager,
        gpu_memory_utilization=0.25))
    cold_out = found.pop("cold_out")
    data.update(found)
    assert same_tensors(found), data  # every tensor the kernels read, as the cold engine's
    assert data["warm_repeatable"], "the warm engine is not repeatable run to run"
    assert warm_out == cold_out, data
