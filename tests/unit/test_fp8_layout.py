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
