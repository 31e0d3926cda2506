import pytest
import torch

from weightsync.transport.layout import LayoutUnavailable, derive_layout
from weightsync.transport.packing import copy_tensors, pack_bucket, plan_buckets, unpack_bucket
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


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "int8"])
def test_quantized_parameters_are_refused_even_where_their_shapes_would_stack(dtype):
    """An FP8 (or int8) engine quantizes what it loads: its weight may keep the checkpoint's
    (out, in) shape, and the kernel layout would then copy bf16 into it, cast and unscaled.
    The layout is refused by dtype, not left to shapes or scale parameters to trip it
    (#32; on the H100 an online-FP8 engine's qkv weight was (in, out) and refused by shape)."""
    vllm, ckpt = _qwen2_like()
    name = "model.layers.0.self_attn.qkv_proj.weight"
    vllm[name] = _s(name, vllm[name].shape, dtype)
    with pytest.raises(LayoutUnavailable, match=f"quantized \\({dtype}\\).*checkpoint format"):
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
    from weightsync.coordination.layout import LayoutNegotiator

    layout = derive_layout(*_qwen2_like(), PACKED)
    plans = LayoutNegotiator(SimpleNamespace(transfer=TransferConfig(bucket_bytes=1 << 20)))
    first = plans.kernel_plan(layout, 3)
    second = plans.kernel_plan(layout, 4)
    assert (first.version, second.version) == (3, 4)
    assert first.format == second.format == "kernel"
    assert second.buckets is first.buckets
    other = plans.kernel_plan(layout.model_copy(), 5)
    assert other.buckets is not first.buckets and other.buckets == first.buckets


def _moe_like(experts=4, h=8, inter=6, prefix="experts.routed_experts."):
    """A Qwen3-MoE layer as vLLM 0.24 holds it (fused 3-D expert parameters) and its checkpoint
    (per-expert tensors), with vLLM's expert mapping (``get_expert_mapping``)."""
    m = "model.layers.0.mlp"
    ckpt = {f"{m}.gate.weight": _s(f"{m}.gate.weight", (experts, h))}
    for e in range(experts):
        for w, sh in (("gate_proj", (inter, h)), ("up_proj", (inter, h)),
                      ("down_proj", (h, inter))):
            n = f"{m}.experts.{e}.{w}.weight"
            ckpt[n] = _s(n, sh)
    vllm = {f"{m}.gate.weight": _s(f"{m}.gate.weight", (experts, h)),
            f"{m}.{prefix}w13_weight": _s(f"{m}.{prefix}w13_weight", (experts, 2 * inter, h)),
            f"{m}.{prefix}w2_weight": _s(f"{m}.{prefix}w2_weight", (experts, h, inter))}
    mapping = [(f"{prefix}w13_" if w in ("gate_proj", "up_proj") else f"{prefix}w2_",
                f"experts.{e}.{w}.", e, shard)
               for e in range(experts)
               for shard, w in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj"))]
    return vllm, ckpt, mapping


def test_moe_experts_stack_into_vllms_fused_parameters():
    vllm, ckpt, mapping = _moe_like()
    m = "model.layers.0.mlp"
    by = {p.name: p for p in derive_layout(vllm, ckpt, PACKED, experts=mapping).params}
    w13 = by[f"{m}.experts.routed_experts.w13_weight"]
    assert [n for n, _ in w13.parts[:4]] == [
        f"{m}.experts.0.gate_proj.weight", f"{m}.experts.0.up_proj.weight",
        f"{m}.experts.1.gate_proj.weight", f"{m}.experts.1.up_proj.weight"]
    assert [r for _, r in w13.parts] == [6] * 8
    assert [n for n, _ in by[f"{m}.experts.routed_experts.w2_weight"].parts] == [
        f"{m}.experts.{e}.down_proj.weight" for e in range(4)]
    with pytest.raises(LayoutUnavailable, match="no checkpoint source"):  # no mapping known
        derive_layout(vllm, ckpt, PACKED)


def test_moe_expert_that_does_not_fit_its_fused_parameter_is_refused():
    vllm, ckpt, mapping = _moe_like()
    n = "model.layers.0.mlp.experts.2.up_proj.weight"
    ckpt[n] = _s(n, (6, 9))
    with pytest.raises(LayoutUnavailable, match="does not stack"):
        derive_layout(vllm, ckpt, PACKED, experts=mapping)
    vllm, ckpt, mapping = _moe_like()
    del ckpt["model.layers.0.mlp.experts.3.down_proj.weight"]
    with pytest.raises(LayoutUnavailable, match="checkpoint has no"):
        derive_layout(vllm, ckpt, PACKED, experts=mapping)


def _fused_moe_sources():
    """A fused-expert trainer (transformers 5), as a kernel-layout plan and its sources."""
    vllm, ckpt, mapping = _moe_like()
    layout = derive_layout(vllm, ckpt, PACKED, experts=mapping)
    m = "model.layers.0.mlp"
    g = torch.Generator().manual_seed(2)
    gate_up, down, router = (torch.randn(*sh, generator=g).to(torch.bfloat16)
                             for sh in ((4, 12, 8), (4, 8, 6), (4, 8)))
    tensors = {f"{m}.gate.weight": router}
    for e in range(4):
        tensors[f"{m}.experts.{e}.gate_proj.weight"] = gate_up[e, :6]
        tensors[f"{m}.experts.{e}.up_proj.weight"] = gate_up[e, 6:]
        tensors[f"{m}.experts.{e}.down_proj.weight"] = down[e]
    sources = {p.name: [tensors[n] for n, _ in p.parts] for p in layout.params}
    plan = plan_buckets([layout.spec(p) for p in layout.params], 1 << 20, 1)
    return plan, sources, (gate_up, down, router)


def test_fused_experts_pack_as_one_copy_and_equal_the_fused_tensor():
    """The trainer holds experts fused (transformers 5: ``gate_up_proj [E, 2I, H]``, gate rows
    then up rows per expert — vLLM's ``w13`` layout); split into per-expert checkpoint views
    and packed back in kernel layout, each fused tensor is one copy, not 2E."""
    from weightsync.transport.packing import copy_runs

    plan, sources, (gate_up, down, _) = _fused_moe_sources()
    m = "model.layers.0.mlp"
    views: dict = {}
    got = dict(unpack_bucket(plan.buckets[0],
                             pack_bucket(plan.buckets[0], sources, "cpu", views=views)))
    assert torch.equal(got[f"{m}.experts.routed_experts.w13_weight"], gate_up)
    assert torch.equal(got[f"{m}.experts.routed_experts.w2_weight"], down)
    assert [len(r) for r in views["merged"][2]] == [1, 8, 4]  # router, w13, w2: 3 copies
    # slices of separate tensors never merge, even when they happen to be adjacent
    a = torch.randn(8)
    assert [len(r) for r in copy_runs([a[:4], a[4:]], [torch.randn(4), torch.randn(4)])] == [1, 1]
    assert [len(r) for r in copy_runs([a[:4], a[4:]], [a[:4], a[4:]])] == [2]
    # the same parts in another order are copied one by one, into the right rows
    swapped = dict(sources)
    w13 = f"{m}.experts.routed_experts.w13_weight"
    swapped[w13] = [sources[w13][i ^ 1] for i in range(8)]  # up rows before gate rows
    got = dict(unpack_bucket(plan.buckets[0], pack_bucket(plan.buckets[0], swapped, "cpu",
                                                          views=views)))
    assert torch.equal(got[w13], gate_up.view(4, 2, 6, 8).flip(1).reshape(4, 12, 8))


def test_direct_pieces_are_the_trainers_own_storages_one_run_per_fused_tensor():
    """Direct (no packed copy): each slot is runs of the trainer's storages; the 8 per-expert
    views of ``gate_up_proj`` are one piece, and copying the pieces into the engine's
    parameters gives what packing and unpacking gives."""
    from weightsync.transport.packing import direct_pieces, piece_views, span_targets

    plan, sources, fused = _fused_moe_sources()
    storages, pieces = direct_pieces(plan, sources, torch.device("cpu"))
    assert len(storages) == 3 and [len(s) for s in pieces[0]] == [1, 1, 1]  # no copy of any
    assert {s.data_ptr() for s in storages} == {t.data_ptr() for t in fused}
    packed = dict(unpack_bucket(plan.buckets[0], pack_bucket(plan.buckets[0], sources, "cpu")))
    params = {n: torch.zeros_like(t) for n, t in packed.items()}
    (spans,) = piece_views(storages, pieces)
    dsts, srcs = span_targets(plan.buckets[0], spans, params)
    copy_tensors(dsts, srcs)
    assert all(torch.equal(params[n], packed[n]) for n in packed)
    empty = {**sources, "model.layers.0.mlp.gate.weight": [sources[
        "model.layers.0.mlp.gate.weight"][0], torch.empty(0, 8, dtype=torch.bfloat16)]}
    assert direct_pieces(plan, empty, torch.device("cpu"))[1] == pieces  # an empty part: no piece
    gate_up = fused[0]
    gate_up.add_(1)  # the pieces are the trainer's memory, not a copy of it (slot 1: w13)
    assert torch.equal(spans.slots[1][0], gate_up.view(-1).view(torch.uint8))


def test_what_cannot_be_read_in_place_is_named():
    from weightsync.transport.packing import NotDirect, direct_pieces

    plan, sources, _ = _fused_moe_sources()
    router = "model.layers.0.mlp.gate.weight"
    w2 = "model.layers.0.mlp.experts.routed_experts.w2_weight"
    for name, value, why in [
            (router, [sources[router][0].float()], "a cast needs a copy"),
            (w2, [t.t().contiguous().t() for t in sources[w2]], "not dense"),
            (router, [torch.zeros(40, dtype=torch.bfloat16)[1:33].view(4, 8)], "8-byte")]:
        with pytest.raises(NotDirect, match=why):
            direct_pieces(plan, {**sources, name: value}, torch.device("cpu"))


def test_a_direct_buckets_checksum_changes_with_any_piece():
    """One checksum per bucket over its pieces (each digested where it lies): a changed
    byte, two pieces swapped, or a piece missing changes it."""
    from weightsync.transport.packing import Spans, digest_terms, fold_spans, span_views

    a, b = torch.arange(64, dtype=torch.uint8), torch.arange(64, 128, dtype=torch.uint8)

    def sums(*bucket_pieces):
        spans = [Spans([list(p)]) for p in bucket_pieces]
        return fold_spans(spans, digest_terms(span_views(spans)).tolist())

    base = sums([a, b])
    assert sums([a, b]) == base
    assert sums([b, a]) != base and sums([a]) != base and sums([a], [b]) != sums([a, b])
    c = b.clone()
    c[7] ^= 1
    assert sums([a, c]) != base
