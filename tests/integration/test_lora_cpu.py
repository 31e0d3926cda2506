"""LoRA adapters synced from memory into a real vLLM CPU engine (#31, first slice).

One LoRA-enabled engine for the module, built by ``ColdAdapterEngine`` so that the same engine
can also load an adapter from disk through vLLM's own path: the cold-load oracle. Adapters are
real peft LoRAs (rank 8 on every linear layer of the tiny model) with random non-zero B, so
they change what the model says. Each test uses an adapter name of its own.
"""

from __future__ import annotations

import pytest
import ray
import torch

from weightsync.adapters import AdapterPayload
from weightsync.errors import ManifestError, VerificationError

pytestmark = pytest.mark.integration

PROMPTS = ["the quick brown fox", "weights move from the trainer to", "one two three four"]
TIMEOUT = 120


@pytest.fixture(scope="module")
def lora_engine(ray_session, tiny_model):
    from weightsync.config import EngineSpec
    from weightsync.engine.actor import start_engines, stop_engines
    from weightsync.testing.engines import cold_adapter_engine

    # max_loras 8: the kept versions of the tests' four names (pinned, 7 at most), the one
    # being loaded, and room for the cold oracle's adapter (vLLM loads it unpinned, in test 1)
    spec = EngineSpec(name="engine-lora", model=str(tiny_model), dtype="float32",
                      max_model_len=512, enforce_eager=True,
                      engine_args={"enable_lora": True, "max_lora_rank": 16, "max_loras": 8})
    actors = start_engines([spec], make_engine=cold_adapter_engine)
    yield actors[0]
    stop_engines(actors, timeout_s=30)


def peft_lora(tiny_model, seed: int, r: int = 8):
    """A peft LoRA on every linear layer of the tiny model, B random (peft starts it at 0)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=16, target_modules="all-linear",
                                            lora_dropout=0.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def sync(actor, payload: AdapterPayload):
    return ray.get(actor.sync_adapter.remote(payload.manifest.model_dump_json(), payload.buf),
                   timeout=TIMEOUT)


def generate(actor, prompts=PROMPTS, **kw):
    """Greedy tokens and their logprobs for each prompt, and the adapter version that served."""
    out = ray.get(actor.generate.remote(prompts, max_tokens=12, logprobs=True, ignore_eos=True,
                                        **kw), timeout=TIMEOUT)
    return [(r.token_ids, r.logprobs) for r in out], {r.adapter for r in out}


def test_adapter_synced_from_memory_equals_vllm_loading_it_from_disk(lora_engine, tiny_model,
                                                                     tmp_path):
    from weightsync.testing.engines import COLD_ADAPTER

    model = peft_lora(tiny_model, seed=1)
    model.save_pretrained(tmp_path / "adapter")  # peft's own files: what vLLM reads cold
    payload = AdapterPayload.from_peft("warm", model)
    slots = payload.manifest.bucket.slots  # peft's names, A and B of 7 modules x 2 layers
    assert len(slots) == 28 and all(s.name.startswith("base_model.model.model.") for s in slots)

    reply = sync(lora_engine, payload)
    assert (reply.served_as, reply.version, reply.removed) == ("warm@v1", 1, ())
    assert reply.nbytes == payload.buf.numel() > 0

    warm, served = generate(lora_engine, lora="warm")
    cold, cold_served = generate(lora_engine,
                                 sampling={"extra_args": {COLD_ADAPTER: str(tmp_path / "adapter")}})
    base, _ = generate(lora_engine)
    assert served == {"warm@v1"} and cold_served == {None}
    assert warm == cold  # bit for bit: tokens and every logprob
    assert all(w[1] != b[1] for w, b in zip(warm, base))  # the adapter changes every answer
    # served again (the pinned adapter, not a reload) and after the cold one: the same
    assert generate(lora_engine, lora="warm@v1")[0] == warm


def test_versions_resolve_to_the_latest_and_the_last_two_stay_served(lora_engine, tiny_model):
    first, second, third = (AdapterPayload.from_peft("policy", peft_lora(tiny_model, seed=s))
                            for s in (11, 12, 13))
    assert sync(lora_engine, first).served_as == "policy@v1"
    v1, _ = generate(lora_engine, lora="policy")

    reply = sync(lora_engine, second)
    assert (reply.served_as, reply.removed) == ("policy@v2", ())
    v2, served = generate(lora_engine, lora="policy")
    assert served == {"policy@v2"} and v2 != v1
    assert generate(lora_engine, lora="policy@v1") == (v1, {"policy@v1"})  # still served
    assert generate(lora_engine, lora="policy@v2") == (v2, {"policy@v2"})

    reply = sync(lora_engine, third)  # keeps 2: v1 goes
    assert (reply.served_as, reply.removed) == ("policy@v3", ("policy@v1",))
    v3, served = generate(lora_engine, lora="policy")
    assert served == {"policy@v3"} and v3 not in (v1, v2)
    assert generate(lora_engine, lora="policy@v2") == (v2, {"policy@v2"})
    with pytest.raises(Exception, match="no adapter 'policy@v1'"):
        generate(lora_engine, lora="policy@v1")


def test_versions_never_share_prefix_cache_entries(lora_engine, tiny_model):
    """A prompt of several KV blocks, cached under one version, is recomputed under the next
    (vLLM keys cached blocks by the adapter's name and path: each version has its own)."""
    long = ["the quick brown fox jumps over the lazy dog " * 40]
    for seed in (31, 32):
        assert sync(lora_engine, AdapterPayload.from_peft("kv", peft_lora(tiny_model, seed)))
    ray.get(lora_engine.reset_caches.remote(), timeout=TIMEOUT)
    v1, _ = generate(lora_engine, long, lora="kv@v1")  # its blocks cached
    v2_after_v1, _ = generate(lora_engine, long, lora="kv@v2")
    ray.get(lora_engine.reset_caches.remote(), timeout=TIMEOUT)
    v2_alone, _ = generate(lora_engine, long, lora="kv@v2")
    assert len(v1[0][0]) == 12 and v2_after_v1 != v1
    assert v2_after_v1 == v2_alone  # v1's cached blocks were not used for v2
    assert generate(lora_engine, long, lora="kv@v1")[0] == v1  # (both cached now)


def _renamed(payload: AdapterPayload, old: str, new: str) -> AdapterPayload:
    state = {k.replace(old, new): v for k, v in _tensors(payload).items()}
    return AdapterPayload.from_tensors(payload.manifest.name, state, payload.manifest.config)


def _tensors(payload: AdapterPayload) -> dict[str, torch.Tensor]:
    from weightsync.transport.packing import unpack_bucket

    return {k: v.clone() for k, v in unpack_bucket(payload.manifest.bucket, payload.buf)}


def test_bad_adapters_are_refused_and_the_name_stays_on_its_version(lora_engine, tiny_model):
    good = AdapterPayload.from_peft("guard", peft_lora(tiny_model, seed=21))
    assert sync(lora_engine, good).served_as == "guard@v1"
    before = generate(lora_engine, lora="guard")
    assert before[1] == {"guard@v1"}

    too_big = AdapterPayload.from_peft("guard", peft_lora(tiny_model, seed=22, r=32))
    with pytest.raises(ManifestError, match="greater than max_lora_rank 16"):
        sync(lora_engine, too_big)

    unknown = _renamed(good, ".self_attn.o_proj.", ".self_attn.x_proj.")
    with pytest.raises(ManifestError, match="x_proj: the model has no such module"):
        sync(lora_engine, unknown)

    lm_head = {**_tensors(good), "base_model.model.lm_head.lora_A.weight": torch.ones(8, 128),
               "base_model.model.lm_head.lora_B.weight": torch.ones(512, 8)}
    with pytest.raises(ManifestError, match="cannot adapt"):  # in the model, not one vLLM adapts
        sync(lora_engine, AdapterPayload.from_tensors("guard", lm_head, good.manifest.config))

    corrupt = AdapterPayload.from_peft("guard", peft_lora(tiny_model, seed=23))
    corrupt.buf[100] ^= 0xFF  # a byte changed after the checksum was made: in transit
    with pytest.raises(VerificationError, match="checksum"):
        sync(lora_engine, corrupt)

    diverged = _tensors(good)
    key = next(k for k in diverged if k.endswith("v_proj.lora_B.weight"))
    diverged[key] = diverged[key].clone()
    diverged[key][0, 0] = float("nan")  # a diverged trainer's adapter never goes live
    with pytest.raises(VerificationError, match="non-finite.*v_proj.lora_B"):
        sync(lora_engine, AdapterPayload.from_tensors("guard", diverged, good.manifest.config))

    shapes = _tensors(good)
    key = next(k for k in shapes if k.endswith("q_proj.lora_B.weight"))
    shapes[key] = torch.randn(shapes[key].shape[0] + 8, shapes[key].shape[1])
    with pytest.raises(ManifestError, match="do not fit its weight"):
        sync(lora_engine, AdapterPayload.from_tensors("guard", shapes, good.manifest.config))

    assert generate(lora_engine, lora="guard") == before  # still v1, answering as before
    # refusals used no version number: the next good sync is v2
    assert sync(lora_engine, AdapterPayload.from_peft(
        "guard", peft_lora(tiny_model, seed=24))).served_as == "guard@v2"
