"""Every tensor an engine's kernels read, each with its own checksum: what "equal to a cold
engine" means below the outputs.

The fingerprint (``engine.fingerprint``) is one digest over the parameters, enough to show a
fleet agrees. When a warm engine answers apart from a cold one, the question is *which*
tensor differs, and the parameters are not all a kernel reads: vLLM's quantized methods keep
objects built after loading (an FP8 MoE's ``moe_quant_config`` holds its weight scales, its
``moe_kernel`` the experts' GEMMs) whose tensors may be the parameters, or copies of them, or
tensors a reload created and left there. So ``tensor_digests`` lists:

- every parameter and buffer of the model, by its name;
- every other tensor a module holds (``vllm_kernels.kernel_objects``: its quantization method
  and whatever else loading left on it), found by walking those objects' attributes, named by
  the path to it
  (``<module>.quant_method.moe_quant_config._w1.scale``), and marked *unregistered* when its
  storage is no parameter's or buffer's: state a load left beside the parameters, which a
  sync that writes the parameters does not reach.

Two engines of one spec and the same weights give the same names and the same digests; the
names whose digests differ say where a reload went wrong. What Python cannot see into is
named, not compared (``opaque``): vLLM's CPU GEMMs over oneDNN keep their packed weights in a
C++ handle, so a stale packed copy there (a tied head's, after the embedding changed) shows
only in the outputs.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import itertools
import types
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from weightsync.engine.fingerprint import memory_bytes
from weightsync.messages import TensorDigests
from weightsync.transport.packing import checksums, dtype_name

_MAX_DEPTH = 4  # quant method -> config -> descriptor -> tensor, and one more
# what holds no tensor: walked past, never reported
_PLAIN = (types.MethodType, types.BuiltinFunctionType, types.ModuleType, type, torch.nn.Module,
          torch.dtype, torch.device, enum.Enum, str, bytes, int, float, bool, complex, range,
          slice)


def _children(obj: Any) -> Iterator[tuple[str, Any]] | None:
    """What ``obj`` holds, by name; None for an object whose state Python cannot see (a
    C++ handle: vLLM's CPU oneDNN GEMM keeps its packed weights in one)."""
    if isinstance(obj, functools.partial):  # a kernel bound to its packed weights
        return itertools.chain(((f"args.{i}", v) for i, v in enumerate(obj.args)),
                               obj.keywords.items())
    if isinstance(obj, types.FunctionType):  # a closure over packed weights, or nothing
        cells = obj.__closure__ or ()
        return ((name, _cell(c)) for name, c in zip(obj.__code__.co_freevars, cells,
                                                    strict=False))
    if isinstance(obj, dict):
        return ((str(k), v) for k, v in obj.items())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return ((str(i), v) for i, v in enumerate(obj))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return ((f.name, getattr(obj, f.name, None)) for f in dataclasses.fields(obj))
    if hasattr(obj, "__dict__"):
        attrs: dict[str, Any] = vars(obj)
        return iter(attrs.items())
    return None


def _cell(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None


def held_tensors(root: Any, prefix: str, opaque: list[str] | None = None,
                 handles: tuple[type, ...] = ()) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors ``root`` holds through its attributes (dicts, lists, dataclasses, plain
    objects, partials and closures; not through modules, whose tensors are the model's own),
    each once, by path. The paths of objects whose state cannot be seen go to ``opaque``:
    those Python cannot look into, and ``handles`` (wrappers of a C++ object's address)."""
    seen: set[int] = set()
    stack: list[tuple[str, Any, int]] = [(prefix, root, 0)]
    while stack:
        path, obj, depth = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            yield path, obj
            continue
        if obj is None or isinstance(obj, _PLAIN) or depth >= _MAX_DEPTH:
            continue
        children = None if isinstance(obj, handles) else _children(obj)
        if children is None:
            if opaque is not None:
                opaque.append(path)
            continue
        stack.extend((f"{path}.{name}", child, depth + 1) for name, child in children)


def tensor_digests(model: torch.nn.Module, kernel_objects: Iterable[tuple[str, Any]],
                   handles: tuple[type, ...] = ()) -> TensorDigests:
    """Checksums of the model's parameters and buffers and of the tensors its kernel objects
    hold (``kernel_objects``: ``(path, object)`` pairs), each as ``dtype[shape]:checksum``;
    ``handles``: types that wrap a C++ object (named as opaque, not looked into)."""
    named: dict[str, torch.Tensor] = {}
    registered: set[int] = set()  # the parameter and buffer objects themselves
    storages: set[int] = set()
    for mname, module in model.named_modules():
        for table in (module._parameters, module._buffers):
            for attr, t in table.items():
                if t is not None and t.device.type != "meta":
                    named[f"{mname}.{attr}" if mname else attr] = t
                    registered.add(id(t))
                    storages.add(t.untyped_storage().data_ptr())
    unregistered: list[str] = []
    opaque: list[str] = []
    for path, obj in kernel_objects:
        for name, t in held_tensors(obj, path, opaque, handles):
            if t.device.type == "meta" or id(t) in registered or name in named:
                continue
            named[name] = t
            if t.untyped_storage().data_ptr() not in storages:
                unregistered.append(name)
    order = sorted(named)
    with torch.no_grad():  # one checksum per tensor (a diagnosis, not the sync's hot path)
        sums = checksums([memory_bytes(named[n]) for n in order])
    return TensorDigests(
        digests={n: f"{dtype_name(named[n].dtype)}{list(named[n].shape)}:{s}"
                 for n, s in zip(order, sums, strict=True)},
        unregistered=tuple(sorted(unregistered)), opaque=tuple(sorted(opaque)))


def differing(a: TensorDigests, b: TensorDigests) -> dict[str, list[str]]:
    """Where two engines' ``tensor_digests`` differ: names in both with other digests, and
    names only one has."""
    return {"differ": sorted(n for n in a.digests.keys() & b.digests.keys()
                             if a.digests[n] != b.digests[n]),
            "only_first": sorted(a.digests.keys() - b.digests.keys()),
            "only_second": sorted(b.digests.keys() - a.digests.keys())}
