"""``engine.kernel_reads``: every tensor a model's kernels read, found through its modules'
parameters, buffers and the objects loading left on them, each with its own checksum."""

from __future__ import annotations

import dataclasses
import functools

import torch

from weightsync.engine.kernel_reads import differing, held_tensors, tensor_digests


@dataclasses.dataclass
class _Desc:
    scale: torch.Tensor | None


class _QuantMethod:
    """Like vLLM's FP8 MoE method after loading: a quant config holding the layer's scale,
    and a kernel bound to a tensor of its own."""

    def __init__(self, layer: torch.nn.Module, extra: torch.Tensor) -> None:
        self.moe_quant_config = {"_w1": _Desc(layer.scale), "_w2": _Desc(None)}
        self.moe_kernel = functools.partial(torch.matmul, extra)
        self.name = "fp8"


def _model(seed: int) -> tuple[torch.nn.Module, list[tuple[str, object]]]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    layer = model[0]
    layer.register_parameter("scale", torch.nn.Parameter(torch.ones(2), requires_grad=False))
    layer.register_buffer("steps", torch.arange(3))
    method = _QuantMethod(layer, extra=torch.full((4, 4), 2.0))
    return model, [("0.quant_method", method)]


def test_parameters_buffers_and_what_kernel_objects_hold_are_each_named_once():
    model, objects = _model(0)
    found = tensor_digests(model, objects)
    assert set(found.digests) == {"0.weight", "0.bias", "0.scale", "0.steps",
                                  "0.quant_method.moe_kernel.args.0"}
    # the config's scale is the parameter itself: listed once, under its parameter's name
    assert found.unregistered == ("0.quant_method.moe_kernel.args.0",)
    assert found.digests["0.scale"].startswith("float32[2]:")


def test_two_models_with_the_same_tensors_agree_and_one_changed_tensor_is_named():
    (a, objs_a), (b, objs_b) = _model(0), _model(0)
    assert differing(tensor_digests(a, objs_a), tensor_digests(b, objs_b)) == \
        {"differ": [], "only_first": [], "only_second": []}
    objs_b[0][1].moe_kernel.args[0][0, 0] = 3.0  # a stale copy beside the parameters
    with torch.no_grad():
        b[0].scale[1] = 0.5
    found = differing(tensor_digests(a, objs_a), tensor_digests(b, objs_b))
    assert found["differ"] == ["0.quant_method.moe_kernel.args.0", "0.scale"]


def test_a_permuted_view_is_read_in_memory_order_and_depth_is_bounded():
    weight = torch.arange(12.0).reshape(3, 4)
    deep = {"a": {"b": {"c": {"d": {"e": torch.zeros(1)}}}}}
    names = dict(held_tensors({"w": weight.t(), "deep": deep}, "m"))
    assert set(names) == {"m.w"}  # the tensor five levels down is past the walk's depth
    model = torch.nn.Module()
    model.register_buffer("t", weight.t())
    other = torch.nn.Module()
    other.register_buffer("t", weight.t().contiguous())
    # the same values in another memory order are another layout: they differ
    assert differing(tensor_digests(model, []), tensor_digests(other, []))["differ"] == ["t"]


class _Handle:
    """Like vLLM's CPU oneDNN GEMM handler: a C++ object's address in an int64 tensor."""

    def __init__(self) -> None:
        self.handler_tensor = torch.tensor(id(self), dtype=torch.int64)


def test_closures_are_looked_into_and_handles_are_named_not_read():
    packed = torch.ones(2, 2)
    handle = _Handle()
    model = torch.nn.Linear(2, 2)
    model.cpu_linear = lambda x, weight, bias: x @ packed  # vLLM's sgl path: a closure
    model.other_linear = lambda x, weight, bias: (handle, x)  # its oneDNN path
    found = tensor_digests(model, [("cpu_linear", model.cpu_linear),
                                   ("other_linear", model.other_linear)], (_Handle,))
    assert "cpu_linear.packed" in found.digests and found.unregistered == ("cpu_linear.packed",)
    # an address differs from engine to engine: named as opaque, never compared
    assert found.opaque == ("other_linear.handle",)
    assert not any(n.startswith("other_linear") for n in found.digests)
