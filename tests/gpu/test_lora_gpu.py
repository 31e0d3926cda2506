"""LoRA adapters on the GPU (#31): a rank-16 peft adapter on every linear layer of a
0.5B-shaped bf16 model (tied embeddings), synced into an engine with CUDA graphs on.

The trainer is this process, its peft model on the GPU. Adapter versions go in the engine
calls, over CUDA IPC (``leg="ipc"``: packed on the trainer's GPU, mapped by the engine's
worker), over the transfer group (``leg="broadcast"``, gloo: the packed adapter is on the
CPU) and, last, over IPC into the engine asleep at level 1 for the coordinator (it wakes
serving the new version). Warm == cold, bit for bit, against two oracles: the same engine
loading peft's ``save_pretrained`` files through vLLM's own path (``ColdAdapterEngine``),
and a fresh engine of the same spec, started after the syncs, loading those files the same
way. Then sleep level 2 (the base discarded): the adapter sync is refused, nothing staged.

The engines run with ``EngineSpec.batch_invariant`` (``VLLM_BATCH_INVARIANT=1``). Without it vLLM
0.24's LoRA shrink kernel splits K 64 ways for batches under 128 and sums the parts with
``tl.atomic_add`` (``lora/ops/triton_ops/kernel_utils.py``, ``utils.get_lora_op_configs``), so
the same engine, adapter and prompts answer differently run to run: measured on an H100 at
7224cbc, logprobs up to 0.12 apart on the same engine and a token apart on a fresh one, and
the warm engine not repeatable. Batch-invariant mode makes that split 1 (a plain store).
A full sync of the base into the LoRA engine is tried last and recorded.
"""

from __future__ import annotations

import pytest
import ray
import torch

from tests.gpu.parity import PROMPTS, SHARED_KV_GIB, max_diff, stop_engine
from weightsync.adapters import AdapterPayload
from weightsync.coordinator import SyncCoordinator
from weightsync.errors import ConfigError

pytestmark = pytest.mark.gpu

QWEN05_BF16 = dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864,
                   vocab_size=151936, tie_word_embeddings=True, dtype="bfloat16")
RANK = 16


def _engine(name: str, path):
    from weightsync.config import EngineSpec
    from weightsync.engine.actor import start_engines
    from weightsync.testing.engines import cold_adapter_engine

    spec = EngineSpec(name=name, model=str(path), dtype="bfloat16", num_gpus=0.5,
                      gpu_memory_utilization=0.25, max_model_len=512, enforce_eager=False,
                      # max_num_seqs 8: vLLM captures graphs for batch sizes up to it (with LoRA
                      # the default 256 made each engine take ~2 min to start on an H100)
                      engine_args={"enable_lora": True, "max_lora_rank": RANK, "max_loras": 4,
                                   "max_num_seqs": 8}, batch_invariant=True,
                      gpu_kvcache_gib=SHARED_KV_GIB)
    (actor,) = start_engines([spec], timeout_s=300, make_engine=cold_adapter_engine)
    return actor


def _generate(actor, **kw):
    out = ray.get(actor.generate.remote(PROMPTS, max_tokens=16, logprobs=True, ignore_eos=True,
                                        **kw), timeout=300)
    return [(list(o.token_ids), list(o.logprobs)) for o in out], {o.adapter for o in out}


@pytest.mark.timeout(600)  # two LoRA engines with CUDA graphs start in it (300 s was cut)
def test_adapter_synced_into_a_graphs_engine_equals_a_cold_load(gpu_ray, model_root, tmp_path,
                                                                gpu_results):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from weightsync.testing.engines import COLD_ADAPTER
    from weightsync.testing.models import build_text_model

    path = build_text_model(model_root / "qwen2.5-0.5b-shaped-bf16", **QWEN05_BF16)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    model = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=32, target_modules="all-linear",
                                            lora_dropout=0.0))
    warm = _engine("lora-warm", path)
    coord = SyncCoordinator([warm])
    data = gpu_results.setdefault("lora", {})
    try:
        base_out, _ = _generate(warm)
        syncs = []
        for i, leg in enumerate([None, "ipc", "broadcast", None, "ipc", "sleep+ipc"]):
            g = torch.Generator().manual_seed(500 + i)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.copy_((torch.randn(p.shape, generator=g) * 0.05).to(p))
            if leg == "sleep+ipc":
                coord.sleep(level=1)
                assert {s.state.value for s in coord.statuses()} == {"asleep"}
            if leg and leg.endswith("ipc"):  # packed on the trainer's GPU, shared over IPC
                res = coord.sync_adapter(model, name="policy", leg="ipc")
            else:
                res = coord.sync_adapter(AdapterPayload.from_peft("policy", model), leg=leg)
            assert res.ok and res.version == i + 1, res
            syncs.append({"leg": leg or "calls", "seconds": res.seconds,
                          "phases": res.phases,
                          "nbytes": next(iter(res.replies.values())).nbytes})
            if i == 0:  # the engine's own spread, before anything else loads
                first = _generate(warm, lora="policy")[0]
                data["repeatable_after_sync1"] = _generate(warm, lora="policy")[0] == first
                print(f"\nrepeatable after sync 1: {data['repeatable_after_sync1']}; "
                      f"phases {res.phases}", flush=True)
        assert {s.state.value for s in coord.statuses()} == {"serving"}  # woke with v6
        warm_out, served = _generate(warm, lora="policy")
        assert served == {"policy@v6"}
        adapter_dir = tmp_path / "adapter"
        model.save_pretrained(adapter_dir)
        same_engine, _ = _generate(warm, sampling={"extra_args": {COLD_ADAPTER: str(adapter_dir)}})
    finally:
        coord.close()
    try:
        cold = _engine("lora-cold", path)
        try:
            cold_out, _ = _generate(cold,
                                    sampling={"extra_args": {COLD_ADAPTER: str(adapter_dir)}})
            again, _ = _generate(warm, lora="policy")
        finally:
            stop_engine(cold)
        data.update(syncs=syncs, max_logprob_diff_same_engine=max_diff(warm_out, same_engine),
                    max_logprob_diff_fresh_engine=max_diff(warm_out, cold_out),
                    tokens_equal=[w[0] == c[0] for w, c in zip(warm_out, cold_out,
                                                               strict=True)],
                    differs_from_base=[w[1] != b[1] for w, b in zip(warm_out, base_out,
                                                                    strict=True)],
                    warm_repeatable=again == warm_out)
        print(f"\nlora: { {k: v for k, v in data.items() if k != 'syncs'} }", flush=True)
        coord = SyncCoordinator([warm])  # sleep level 2 discards the base: refused
        try:
            coord.sleep(level=2)
            with pytest.raises(Exception, match="level 2") as refused:
                coord.sync_adapter(model, name="policy", leg="ipc")
            data["level2_refusal"] = str(refused.value)[:300]
            staged = ray.get(warm.adapter_state.remote(), timeout=60).staged
            # then a full sync of the base into the LoRA engine asleep at level 2: vLLM 0.24's
            # in-place reload cannot load into LoRA-wrapped layers (it raised a KeyError on
            # qkv_proj.weight at e0b5133), so the engine refuses it before anything changes
            plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda()
            try:
                full = coord.sync(plain, ipc=True)
                data["full_sync"] = {"ok": full.ok, "layout": full.layout,
                                     "seconds": full.engines[0].seconds}
            except ConfigError as e:
                data["full_sync"] = {"ok": False, "refused": str(e)[:500], "states_after": [
                    s.state.value for s in coord.statuses()]}
            print(f"\nfull sync into the LoRA engine: {data['full_sync']}", flush=True)
        finally:
            coord.close()
        assert again == warm_out, "the warm engine is not repeatable run to run"
        assert all(data["differs_from_base"]), data
        assert warm_out == same_engine, data
        assert warm_out == cold_out, data
        assert staged == ()
        full = data["full_sync"]
        assert full["ok"] or ("LoRA" in full["refused"] and full["states_after"] == ["asleep"]), \
            full
    finally:
        stop_engine(warm)
