import pytest
import torch

from weightsync.transport.layout import LayoutUnavailable, derive_layout
from weightsync.transport.packing import pack_bucket, plan_buckets, unpack_bucket
from weightsync.types import TensorSpec

PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def _s(name, shape, dtype="bfloat16"):
    return TensorSpec(name=name, dtype=dtype, shape=shape)


def _qwen2_like(h=8, q=8, kv=4, inter=16):
    a = "model.layers.0.self_attn"
    m = "model.layers.0.mlp"
    ckpt = {n: _s(n, sh) for n, sh in {
        "model.embed_tokens.weight": (32, h), f"{a}.q_proj.weight": (q, h),
        f"{a}.k_proj.weight": (kv, h), f"{a}.v_proj.weight": (kv, h), f"{a}.q_proj.bias": (q,),
        f"{a}.k_proj.bias": (kv,), f"{a}.v_proj.bias": (kv,), f"{a}.o_proj.weight": (h, q),
        f"{m}.gate_proj.weight": (inter, h), f"{m}.up_proj.weight": (inter, h),
        f"{m}.down_proj.weight": (h, inter), "model.norm.weight": (h,)}.items()}
    vllm = {n: _s(n, sh) for n, sh in {
        "model.embed_tokens.weight": (32, h), f"{a}.qkv_proj.weight": (q + 2 * kv, h),
        f"{a}.qkv_proj.bias": (q + 2 * kv,), f"{a}.o_proj.weight": (h, q),
        f"{m}.gate_up_proj.weight": (2 * inter, h), f"{m}.down_proj.weight": (h, inter),
        "model.norm.weight": (h,)}.items()}
    return vllm, ckpt


def test_derives_fused_rows_from_vllm_mapping():
    vllm, ckpt = _qwen2_like()
    layout = derive_layout(vllm, ckpt, PACKED)
    by = {p.name: p for p in layout.params}
    qkv = by["model.layers.0.self_attn.qkv_proj.weight"]
    assert [r for _, r in qkv.parts] == [8, 4, 4]
    assert qkv.parts[1][0] == "model.layers.0.self_attn.k_proj.weight"
    assert [n for n, _ in by["model.layers.0.mlp.gate_up_proj.weight"].parts] == [
        "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"]
    assert by["model.norm.weight"].parts == (("model.norm.weight", 8),)
    assert len(layout.signature) == 16


def test_kernel_bucket_stacks_parts_in_place():
    vllm, ckpt = _qwen2_like()
    layout = derive_layout(vllm, ckpt, PACKED)
    g = torch.Generator().manual_seed(0)
    tensors = {n: torch.randn(s.shape, generator=g) for n, s in ckpt.items()}  # fp32 master
    sources = {p.name: [tensors[n] for n, _ in p.parts] for p in layout.params}
    plan = plan_buckets([layout.spec(p) for p in layout.params], 1 << 20, 1)
    got = {}
    for b in plan.buckets:
        got.update(unpack_bucket(b, pack_bucket(b, sources, "cpu")))
    a = "model.layers.0.self_attn"
    want = torch.cat([tensors[f"{a}.{x}_proj.weight"] for x in "qkv"]).to(torch.bfloat16)
    assert got[f"{a}.qkv_proj.weight"].dtype == torch.bfloat16
    assert torch.equal(got[f"{a}.qkv_proj.weight"], want)


@pytest.mark.parametrize("case,match", [
    ("repacked", "repacked"), ("unmapped", "no checkpoint source"),
    ("rows", "rows"), ("unused", "no vLLM parameter")])
def test_refuses_what_it_cannot_explain(case, match):
    vllm, ckpt = _qwen2_like()
    a = "model.layers.0.self_attn"
    if case == "repacked":  # vLLM's CPU GEMM dispatch swaps weights for empty params
        vllm[f"{a}.o_proj.weight"] = _s(f"{a}.o_proj.weight", (0,))
    elif case == "unmapped":
        vllm["model.extra.weight"] = _s("model.extra.weight", (2,))
    elif case == "rows":
        vllm[f"{a}.qkv_proj.weight"] = _s(f"{a}.qkv_proj.weight", (17, 8))
    else:
        ckpt["model.unused.weight"] = _s("model.unused.weight", (2,))
    with pytest.raises(LayoutUnavailable, match=match):
        derive_layout(vllm, ckpt, PACKED)


def test_tied_checkpoint_names_may_be_ignored():
    vllm, ckpt = _qwen2_like()
    ckpt["lm_head.weight"] = _s("lm_head.weight", (32, 8))
    derive_layout(vllm, ckpt, PACKED, ignored={"lm_head.weight"})


def test_kernel_plan_keeps_its_buckets_across_versions():
    """The IPC leg caches packing views per bucket object: the coordinator must hand out the
    same buckets every sync of one layout, and plan again for another layout."""
    from types import SimpleNamespace

    from weightsync.config import TransferConfig
    from weightsync.coordinator import SyncCoordinator

    layout = derive_layout(*_qwen2_like(), PACKED)
    coord = SimpleNamespace(_kernel_plan_of=None, transfer=TransferConfig(bucket_bytes=1 << 20))
    first = SyncCoordinator._kernel_plan(coord, layout, 3)
    second = SyncCoordinator._kernel_plan(coord, layout, 4)
    assert (first.version, second.version) == (3, 4)
    assert first.format == second.format == "kernel"
    assert second.buckets is first.buckets
    other = SyncCoordinator._kernel_plan(coord, layout.model_copy(), 5)
    assert other.buckets is not first.buckets and other.buckets == first.buckets
