"""A small Qwen3-MoE held by transformers 5 (experts fused in memory: ``mlp.experts.gate_up_proj``)
syncs from its in-memory module into a real vLLM GPU engine over CUDA IPC, in bf16.

Engine against engine, so bit for bit: after the sync the engine generates exactly (token ids
and logprobs) what it generates after loading the same weights, written by ``save_pretrained``,
with its own loader (``reload_checkpoint``). From the second sync on the sync takes the
kernel-layout fast path, and leaves the same parameters (fingerprint) as a checkpoint-layout
sync of the same weights. The layouts and their notes go to gpu_results either way.
"""

from __future__ import annotations

import pytest
import ray
import torch

from tests.gpu.parity import (
    PROMPTS,
    changed,
    engine_generate,
    plain,
    start_colocated,
    stop_engine,
)
from weightsync.config import TransferConfig
from weightsync.coordinator import SyncCoordinator
from weightsync.testing.reference import perturb_, scored

pytestmark = pytest.mark.gpu

# GQA 2:1, head_dim 64, 16 experts top-4: small, but every MoE code path a real one takes
MOE = dict(hidden=256, layers=2, heads=4, kv_heads=2, head_dim=64, experts=16, top_k=4,
           moe_intermediate=128, vocab_size=512, dtype="bfloat16")


@pytest.fixture(scope="module")
def moe_model(model_root):
    from weightsync.testing.models import build_moe_model

    return build_moe_model(model_root / "small-qwen3-moe-bf16", **MOE)


@pytest.fixture(scope="module")
def moe_engine(gpu_ray, moe_model):
    actor = start_colocated("gpu-moe", moe_model, "bfloat16", gpu_memory_utilization=0.3)
    yield actor
    stop_engine(actor)


def _trainer(moe_model):
    from transformers import Qwen3MoeForCausalLM

    model = Qwen3MoeForCausalLM.from_pretrained(moe_model, dtype=torch.bfloat16).cuda().eval()
    assert "model.layers.0.mlp.experts.gate_up_proj" in dict(model.named_parameters())
    return model


def _gap_to_hf(trainer, moe_model, outputs) -> float:
    """The largest teacher-forced logprob gap to HF (bf16 both sides: recorded, not asserted)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(moe_model)
    return max(abs(a - b) for p, (toks, lps) in zip(PROMPTS, outputs, strict=True)
               for a, b in zip(lps, scored(trainer, tok, p, toks), strict=True))


def _phases(res) -> dict:
    s = res.engines[0].seconds
    return {"layout": res.layout, "layout_note": res.layout_note,
            "transfer": s.get("transfer"), "reload": s.get("reload"),
            "transfer+reload": s.get("transfer+reload"), "total": res.seconds.get("total")}


def test_moe_module_syncs_and_equals_the_engines_own_load_of_save_pretrained(
        moe_engine, moe_model, tmp_path, gpu_results):
    trainer = _trainer(moe_model)
    original = engine_generate(moe_engine, PROMPTS)
    perturb_(trainer, scale=0.05, seed=77)
    coord = SyncCoordinator([moe_engine], TransferConfig(bucket_bytes=64 << 20))
    torch.cuda.synchronize()
    res = coord.sync(trainer, ipc=True)  # the in-memory module, converted by transformers
    data = gpu_results["moe_sync"] = {"sync": _phases(res), "nbytes": res.nbytes,
                                      "fingerprint_sync": res.engines[0].fingerprint}
    assert res.ok and all(e.checksum_ok for e in res.engines), res
    synced = engine_generate(moe_engine, PROMPTS)
    data["output_changed"] = changed(original, synced)
    data["gap_to_hf_after_sync"] = _gap_to_hf(trainer, moe_model, plain(synced))
    assert data["output_changed"]

    trainer.save_pretrained(tmp_path / "ckpt")  # per-expert names, written by transformers
    loaded = coord.reload_checkpoint(str(tmp_path / "ckpt"))
    reloaded = plain(engine_generate(moe_engine, PROMPTS))
    data.update(fingerprint_reload=loaded.engines[0].fingerprint,
                bit_identical_to_own_load=reloaded == plain(synced))
    assert loaded.ok
    assert reloaded == plain(synced)  # token ids and logprobs: the same weights, loaded two ways
    assert res.engines[0].fingerprint == loaded.engines[0].fingerprint  # parameters, bit for bit
    coord.reload_checkpoint(None)


def test_moe_kernel_layout_after_the_first_sync_loads_what_the_checkpoint_layout_loads(
        moe_engine, moe_model, gpu_results):
    trainer = _trainer(moe_model)
    auto = SyncCoordinator([moe_engine], TransferConfig(bucket_bytes=64 << 20,
                                                        ipc_reuse_buffers=True,
                                                        ipc_direct=True))
    ckpt = SyncCoordinator([moe_engine], TransferConfig(bucket_bytes=64 << 20,
                                                        layout="checkpoint"))
    try:
        _kernel_layout_syncs(moe_engine, trainer, auto, ckpt, gpu_results)
    finally:
        auto.close()
        ckpt.close()


def _kernel_layout_syncs(moe_engine, trainer, auto, ckpt, gpu_results) -> None:
    rows: list[dict] = []
    data = gpu_results["moe_fast_path"] = {"syncs": rows}  # filled as it goes: kept on failure
    first = auto.sync(trainer, ipc=True)
    data["first"] = _phases(first)
    status = ray.get(moe_engine.kernel_layout.remote())
    data["kernel_layout"] = {"candidate": status.candidate, "verified": status.verified,
                             "reason": status.reason}
    assert first.ok, first
    for i in range(4):
        perturb_(trainer, scale=0.01, seed=900 + i)
        before = engine_generate(moe_engine, PROMPTS)
        torch.cuda.synchronize()
        fast = auto.sync(trainer, ipc=True)
        row = {"auto": _phases(fast)}
        rows.append(row)
        assert fast.ok, fast
        after = engine_generate(moe_engine, PROMPTS)
        slow = ckpt.sync(trainer, ipc=True)  # the same weights through vLLM's loaders
        row["checkpoint"] = _phases(slow)
        row["same_fingerprint"] = fast.engines[0].fingerprint == slow.engines[0].fingerprint
        assert slow.ok and slow.layout == "checkpoint"
        assert changed(before, after)
        assert fast.layout == "kernel", fast.layout_note  # the MoE fast path, second sync on
        row["packed_because"] = auto._leg("ipc").direct_note
        assert row["packed_because"] is None  # copied from the fused experts where they lie
        # both paths leave bit-identical parameters in the engine
        assert fast.engines[0].fingerprint == slow.engines[0].fingerprint
        assert plain(engine_generate(moe_engine, PROMPTS)) == plain(after)
