"""Online FP8 in the kernel layout (#32): a weight vLLM quantizes per tensor on load travels as
its unquantized stack and is quantized on the engine, straight into its parameter's storage.

The planning, the calibration's comparison and the in-place writes are pure logic and run
here with a torch reference of vLLM's per-tensor quantizer (its ``scaled_fp8_quant`` is a CUDA
kernel); the GPU suite proves the real one bit for bit against a cold FP8 engine
(``tests/gpu/test_fp8_gpu.py``)."""

from __future__ import annotations

import pytest
import torch

from weightsync.engine import vllm_fp8
from weightsync.engine.copy_program import kernel_targets
from weightsync.errors import TransferError
from weightsync.transport.layout import Fp8Target, LayoutUnavailable, derive_layout, first_mismatch
from weightsync.transport.packing import pack_bucket, plan_buckets, unpack_bucket
from weightsync.types import TensorSpec

PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
A = "model.layers.0.self_attn"
QKV, SCALE = f"{A}.qkv_proj.weight", f"{A}.qkv_proj.weight_scale"
FP8_MAX = 448.0


def reference_quantize(src: torch.Tensor, out: torch.Tensor | None = None):
    """Per-tensor dynamic FP8 (e4m3) as vLLM's kernel computes it: scale = amax / 448."""
    scale = (src.abs().max().float() / FP8_MAX).reshape(1)
    q = (src.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    if out is None:
        return q, scale
    out.copy_(q)
    return out, scale


def _s(name, shape, dtype="bfloat16"):
    return TensorSpec(name=name, dtype=dtype, shape=shape)


def _model(h=16, q=16, kv=8):
    ckpt = {n: _s(n, sh) for n, sh in {f"{A}.q_proj.weight": (q, h), f"{A}.k_proj.weight": (kv, h),
                                       f"{A}.v_proj.weight": (kv, h)}.items()}
    n = q + 2 * kv
    live = {QKV: _s(QKV, (h, n), "float8_e4m3fn"), SCALE: _s(SCALE, (1,), "float32")}
    fp8 = {QKV: Fp8Target(SCALE, _s(QKV, (n, h)))}
    return live, ckpt, fp8


def test_an_online_fp8_weight_is_planned_as_its_unquantized_stack():
    live, ckpt, fp8 = _model()
    (p,) = derive_layout(live, ckpt, PACKED, fp8=fp8).params
    assert (p.name, p.dtype, p.shape, p.fp8_scale) == (QKV, "bfloat16", (32, 16), SCALE)
    assert [r for _, r in p.parts] == [16, 8, 8]
    with pytest.raises(LayoutUnavailable, match="quantized"):  # not one vLLM quantizes per tensor
        derive_layout(live, ckpt, PACKED)


def _loaded(fp8_targets):
    """The checkpoint tensors, and a parameter as vLLM's online FP8 leaves it: the FP8 result
    transposed, and its scale."""
    g = torch.Generator().manual_seed(0)
    live, ckpt, fp8 = fp8_targets
    sent = {n: torch.randn(s.shape, generator=g).to(torch.bfloat16) for n, s in ckpt.items()}
    stack = torch.cat([sent[f"{A}.{x}_proj.weight"] for x in "qkv"])
    q, scale = reference_quantize(stack)
    params = {QKV: torch.nn.Parameter(q.t(), requires_grad=False),
              SCALE: torch.nn.Parameter(scale, requires_grad=False)}
    return sent, params


def test_the_calibration_compares_weight_and_scale_as_quantized():
    live, ckpt, fp8 = _model()
    layout = derive_layout(live, ckpt, PACKED, fp8=fp8)
    sent, params = _loaded((live, ckpt, fp8))
    assert first_mismatch(layout, sent, params, reference_quantize) is None
    assert first_mismatch(layout, sent, params) == QKV  # no quantizer: nothing to compare with
    params[SCALE].data.mul_(2)
    assert first_mismatch(layout, sent, params, reference_quantize) == QKV


def test_a_kernel_load_quantizes_into_the_parameters_storage(monkeypatch):
    monkeypatch.setattr(vllm_fp8, "fp8_quantize", reference_quantize)
    live, ckpt, fp8 = _model()
    layout = derive_layout(live, ckpt, PACKED, fp8=fp8)
    _, params = _loaded((live, ckpt, fp8))
    weight_at, scale_at = params[QKV].data_ptr(), params[SCALE].data_ptr()
    g = torch.Generator().manual_seed(1)
    new = {n: torch.randn(s.shape, generator=g).to(torch.bfloat16) for n, s in ckpt.items()}
    plan = plan_buckets([layout.spec(p) for p in layout.params], 1 << 20, 1)
    (bucket,) = plan.buckets
    buf = pack_bucket(bucket, {QKV: [new[n] for n, _ in layout.params[0].parts]}, "cpu")
    program = kernel_targets(params, unpack_bucket(bucket, buf), {QKV: SCALE})
    assert not program.dsts and len(program.fp8) == 1
    program.run()
    want_q, want_scale = reference_quantize(torch.cat([new[f"{A}.{x}_proj.weight"] for x in "qkv"]))
    assert (params[QKV].data_ptr(), params[SCALE].data_ptr()) == (weight_at, scale_at)
    assert torch.equal(params[QKV].data.t().view(torch.uint8), want_q.view(torch.uint8))
    assert torch.equal(params[SCALE].data, want_scale)
    assert first_mismatch(layout, new, params, reference_quantize) is None


# ---- fused experts (Fp8OnlineMoEMethod: one scale per expert, kept stacked [E, N, K]) ----------
M = "model.layers.0.mlp.experts.routed_experts"
W13, W2 = f"{M}.w13_weight", f"{M}.w2_weight"
S13, S2 = f"{M}.w13_weight_scale", f"{M}.w2_weight_scale"


def _experts(e=3, h=8, inter=4):
    """A MoE layer as vLLM's online FP8 leaves it (FP8 ``[E, N, K]`` and one fp32 scale per
    expert), its per-expert checkpoint tensors, and vLLM's expert mapping."""
    from tests.unit.test_layout import _moe_like

    vllm, ckpt, mapping = _moe_like(experts=e, h=h, inter=inter)
    fp8 = {W13: Fp8Target(S13, vllm[W13]), W2: Fp8Target(S2, vllm[W2])}
    live = {n: (s.model_copy(update={"dtype": "float8_e4m3fn"}) if n in fp8 else s)
            for n, s in vllm.items()}
    live |= {S13: _s(S13, (e,), "float32"), S2: _s(S2, (e,), "float32")}
    return live, ckpt, mapping, fp8


def _quantized_experts(stack):
    qs, scales = zip(*(reference_quantize(x) for x in stack), strict=True)
    return torch.stack(qs), torch.cat(scales)


def _expert_tensors(seed, e=3, h=8, inter=4):
    g = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(e, 2 * inter, h, generator=g).to(torch.bfloat16)
    down = torch.randn(e, h, inter, generator=g).to(torch.bfloat16)
    gate_up[1] *= 9  # experts of other ranges: other scales
    router = torch.randn(e, h, generator=g).to(torch.bfloat16)
    sent = {"model.layers.0.mlp.gate.weight": router}
    for x in range(e):
        sent[f"model.layers.0.mlp.experts.{x}.gate_proj.weight"] = gate_up[x, :inter]
        sent[f"model.layers.0.mlp.experts.{x}.up_proj.weight"] = gate_up[x, inter:]
        sent[f"model.layers.0.mlp.experts.{x}.down_proj.weight"] = down[x]
    return sent, gate_up, down


def _loaded_experts(seed=0):
    sent, gate_up, down = _expert_tensors(seed)
    (q13, s13), (q2, s2) = _quantized_experts(gate_up), _quantized_experts(down)
    params = {n: torch.nn.Parameter(t, requires_grad=False) for n, t in {
        W13: q13, W2: q2, S13: s13, S2: s2,
        "model.layers.0.mlp.gate.weight": sent["model.layers.0.mlp.gate.weight"]}.items()}
    return sent, params


def test_online_fp8_experts_are_planned_as_their_unquantized_stacks():
    live, ckpt, mapping, fp8 = _experts()
    by = {p.name: p for p in derive_layout(live, ckpt, PACKED, experts=mapping, fp8=fp8).params}
    assert (by[W13].dtype, by[W13].shape, by[W13].fp8_scale) == ("bfloat16", (3, 8, 8), S13)
    assert (by[W2].dtype, by[W2].shape, by[W2].fp8_scale) == ("bfloat16", (3, 8, 4), S2)
    assert S13 not in by and S2 not in by  # made on the engine
    with pytest.raises(LayoutUnavailable, match="quantized"):  # experts no method quantizes
        derive_layout(live, ckpt, PACKED, experts=mapping)


def test_the_calibration_compares_each_experts_weight_and_scale():
    live, ckpt, mapping, fp8 = _experts()
    layout = derive_layout(live, ckpt, PACKED, experts=mapping, fp8=fp8)
    sent, params = _loaded_experts()
    assert first_mismatch(layout, sent, params, reference_quantize) is None
    params[S2].data[2] *= 2  # one expert's scale
    assert first_mismatch(layout, sent, params, reference_quantize) == W2
    sent, params = _loaded_experts()
    params[W13].data[1, 0, 0] = torch.tensor(0.0).to(torch.float8_e4m3fn)  # one element
    assert first_mismatch(layout, sent, params, reference_quantize) == W13


def test_a_kernel_load_quantizes_each_expert_into_storage_and_updates_the_kernels_scales(
        monkeypatch):
    """Each expert quantized into its slice of the parameter, its scale into the scale
    parameter and into the tensor vLLM's MoE kernel reads it from after a checkpoint-format
    reload (``vllm_fp8.scale_mirrors``), all in place."""
    monkeypatch.setattr(vllm_fp8, "fp8_quantize", reference_quantize)
    live, ckpt, mapping, fp8 = _experts()
    layout = derive_layout(live, ckpt, PACKED, experts=mapping, fp8=fp8)
    _, params = _loaded_experts(seed=0)
    held = params[S13].data.clone()  # the reload's own copy, which eager forwards read
    at = {n: params[n].data_ptr() for n in (W13, W2, S13, S2)}
    new, gate_up, down = _expert_tensors(seed=5)
    plan = plan_buckets([layout.spec(p) for p in layout.params], 1 << 20, 1)
    (bucket,) = plan.buckets
    buf = pack_bucket(bucket, {p.name: [new[n] for n, _ in p.parts] for p in layout.params}, "cpu")
    program = kernel_targets(params, unpack_bucket(bucket, buf), {W13: S13, W2: S2},
                             {S13: [held]})
    assert len(program.dsts) == 1 and len(program.fp8) == 2  # the router copied, experts quantized
    program.run()
    assert {n: params[n].data_ptr() for n in at} == at
    for w, s, stack in ((W13, S13, gate_up), (W2, S2, down)):
        want_q, want_s = _quantized_experts(stack)
        assert torch.equal(params[w].data.view(torch.uint8), want_q.view(torch.uint8)), w
        assert torch.equal(params[s].data, want_s), s
    assert torch.equal(held, params[S13].data)
    assert len(set(params[S13].data.tolist())) == 3  # one scale per expert, not one for all
    assert first_mismatch(layout, new, params, reference_quantize) is None


# ---- which FP8 expert layers the kernel layout may write (vllm_fp8._plain_moe) ------------------
class _Backend:
    def __init__(self, value):
        self.value = value


class _Config:  # as vLLM's FusedMoEQuantConfig exposes them
    def __init__(self, w1_scale, w2_scale):
        self.w1_scale, self.w2_scale = w1_scale, w2_scale


class _Method:  # stands for vLLM's online FP8 MoE method (its type is passed as the one known)
    def __init__(self, backend, config):
        self.fp8_backend, self.moe_quant_config = _Backend(backend), config


def _moe_module(e=3, backend="TRITON", held="params"):
    """A module laid out as vLLM's online FP8 experts: FP8 ``[E, N, K]`` weights, one scale per
    expert, its quant method's config holding the scale parameters themselves (``held=
    "params"``, as after the first load) or copies (``"copies"``, as after a checkpoint-format
    reload)."""
    m = torch.nn.Module()
    for w, shape in (("w13", (e, 8, 4)), ("w2", (e, 4, 4))):
        m.register_parameter(f"{w}_weight", torch.nn.Parameter(
            torch.zeros(shape).to(torch.float8_e4m3fn), requires_grad=False))
        m.register_parameter(f"{w}_weight_scale", torch.nn.Parameter(
            torch.ones(e), requires_grad=False))
    m.local_num_experts = e
    m._already_called_process_weights_after_loading = True
    scales = (m.w13_weight_scale, m.w2_weight_scale)
    if held == "copies":
        scales = tuple(s.detach().clone() for s in scales)
    m.quant_method = _Method(backend, _Config(*scales))
    return m


def test_fp8_experts_are_written_only_where_every_copy_of_their_scales_is_known(monkeypatch):
    plain = vllm_fp8._plain_moe
    assert plain(_moe_module(), (_Method,)) == {}  # the config reads the parameters
    m = _moe_module(held="copies")
    config = m.quant_method.moe_quant_config
    assert {n: id(t) for n, t in plain(m, (_Method,)).items()} == {
        "w13_weight_scale": id(config.w1_scale), "w2_weight_scale": id(config.w2_scale)}
    assert plain(_moe_module(backend="MARLIN"), (_Method,)) is None  # repacked
    assert plain(_moe_module(), ()) is None  # no online FP8 MoE method known
    m = _moe_module()
    m.quant_method.kernel_scales = torch.ones(3)  # a copy no write would reach
    assert plain(m, (_Method,)) is None
    m = _moe_module()
    m.quant_method.moe_quant_config.w2_scale = None
    assert plain(m, (_Method,)) is None

    class Worker:  # (vllm_compat.model reads worker.model_runner.get_model())
        def __init__(self, model):
            self.model_runner = type("Runner", (), {"get_model": lambda _: model})()

    root = torch.nn.Module()
    root.experts = _moe_module(held="copies")
    monkeypatch.setattr(vllm_fp8, "_online_moe_methods", lambda: (_Method,))
    worker = Worker(root)
    assert sorted(vllm_fp8.scale_mirrors(worker, {"experts.w13_weight_scale"})) == [
        "experts.w13_weight_scale", "experts.w2_weight_scale"]
    assert vllm_fp8.scale_mirrors(worker, set()) == {}
    root.experts.quant_method.fp8_backend = _Backend("MARLIN")  # changed since the layout
    with pytest.raises(TransferError, match="no longer"):
        vllm_fp8.scale_mirrors(worker, {"experts.w13_weight_scale"})
