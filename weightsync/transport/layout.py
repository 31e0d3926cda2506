"""Kernel layout: how checkpoint tensors map onto vLLM's (fused) parameters. Pure logic.

vLLM fuses checkpoint tensors at load time (``q_proj``/``k_proj``/``v_proj`` -> ``qkv_proj``,
``gate_proj``/``up_proj`` -> ``gate_up_proj``), declared per model in its own
``packed_modules_mapping``, and stacks MoE experts into fused 3-D parameters (``experts.{e}
.gate_proj``/``up_proj`` -> ``w13_weight[e]``, ``down_proj`` -> ``w2_weight[e]``), declared by the
model's ``get_expert_mapping()``. From those mappings, the engine's parameter specs and the
checkpoint headers we derive, once, which checkpoint tensors make up each vLLM parameter and in
which row ranges (a part of lower rank than its parameter stacks along the parameter's
flattened leading dimensions: 128 experts' ``[768, 2048]`` gate and up rows make a
``[128, 1536, 2048]`` ``w13_weight``). The trainer then packs buckets already in vLLM's layout
and the engine copies them straight into its parameters (what
``reload_weights(is_checkpoint_format=False)`` does, as batched copies:
``engine.copy_program.kernel_targets``), skipping the per-tensor weight loaders.

A derived layout is only a candidate: the engine verifies it bit for bit against what vLLM's
own loader produced on a checkpoint-format sync (see ``worker_ext``) before it is used.
Anything it cannot explain (repacked weights, renamed modules, interleaved shards, quantized
weights other than online FP8's per-tensor and per-expert ones) means no layout, and syncs
keep the checkpoint-format path. Online FP8 weights travel as the unquantized stack vLLM's
loader builds, and the engine quantizes each into its parameter and scale in place
(``engine.copy_program``), as vLLM's ``process_weights_after_loading`` does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from weightsync.types import KernelLayout, KernelParam, TensorSpec

__all__ = ["Expert", "Fp8Target", "KernelLayout", "KernelParam", "LayoutUnavailable",
           "derive_layout", "expert_parts", "first_mismatch", "fp8_views", "kernel_specs"]


class LayoutUnavailable(ValueError):
    """The kernel layout cannot be derived; the message says why."""


Expert = tuple[str, str, int, str]  # vLLM's (param prefix, checkpoint prefix, expert, shard)
_SHARD_ORDER = {"w1": 0, "w3": 1, "w2": 0}  # gate rows before up rows within an expert


def expert_parts(name: str, experts: Sequence[Expert]) -> list[str] | None:
    """The checkpoint tensors vLLM's expert mapping stacks into the fused expert parameter
    ``name`` (``...mlp.experts.w13_weight``: every expert's gate rows then up rows, experts in
    order), or None if no entry of the mapping names it."""
    matches: dict[str, list[tuple[int, int, str]]] = {}
    for param_prefix, ckpt_prefix, expert, shard in experts:
        head, sep, tail = name.partition("." + param_prefix)
        if sep and tail and "." not in tail:
            order = _SHARD_ORDER.get(shard, len(_SHARD_ORDER))
            matches.setdefault(head, []).append((expert, order, f"{head}.{ckpt_prefix}{tail}"))
    if len(matches) != 1:
        return None
    return [n for _, _, n in sorted(next(iter(matches.values())))]



_QUANTIZED = frozenset({"float8_e4m3fn", "float8_e5m2", "int8", "uint8"})


class Fp8Target(NamedTuple):
    """A parameter vLLM's online FP8 quantizes on load (``vllm_fp8.fp8_targets``), one
    dynamic scale per tensor or per expert (``fp8_views``): its scale parameter, and what it
    holds before quantizing (``source``: the model's dtype in the unquantized layout its
    loader fills, ``[N, K]`` or experts' ``[E, N, K]``)."""

    scale: str
    source: TensorSpec


def kernel_specs(vllm_params: Mapping[str, TensorSpec],
                 fp8: Mapping[str, Fp8Target]) -> dict[str, TensorSpec]:
    """The parameters as kernel-layout plans carry them: an online-FP8 weight as its
    unquantized stack (``Fp8Target.source``), its scale not at all (both made on the
    engine)."""
    scales = {t.scale for t in fp8.values()}
    return {n: fp8[n].source if n in fp8 else s
            for n, s in vllm_params.items() if n not in scales}


def derive_layout(vllm_params: dict[str, TensorSpec], checkpoint: dict[str, TensorSpec],
                  packed: dict[str, list[str]], ignored: set[str] = frozenset(),
                  experts: Sequence[Expert] = (),
                  fp8: Mapping[str, Fp8Target] | None = None) -> KernelLayout:
    """Explain every vLLM parameter as a row-stack of checkpoint tensors, or raise why not.

    ``fp8``: the parameters vLLM quantizes on load (online FP8), by name. Each is explained by
    its ``source`` (the stack travels unquantized and the engine quantizes it); its scale is
    derived from it, so it needs no checkpoint source. Any other quantized parameter means no
    layout."""
    fp8 = fp8 or {}
    used: set[str] = set()
    params = []
    for name, spec in kernel_specs(vllm_params, fp8).items():
        if 0 in spec.shape and spec.shape != ():
            raise LayoutUnavailable(f"{name} was repacked by the backend (shape {spec.shape})")
        module, _, leaf = name.rpartition(".")
        prefix, _, mod_leaf = module.rpartition(".")
        if spec.dtype in _QUANTIZED:  # the engine quantizes on load: bf16 bytes copied in
            raise LayoutUnavailable(  # would be cast, unscaled (silently wrong weights)
                f"{name} is quantized ({spec.dtype}): the engine quantizes what it loads, so "
                "syncs go in the checkpoint format")
        if name in checkpoint:
            parts = [name]
        elif mod_leaf in packed:
            parts = [f"{prefix}.{p}.{leaf}" if prefix else f"{p}.{leaf}" for p in packed[mod_leaf]]
        elif (found := expert_parts(name, experts)) is not None:
            parts = found
        else:
            raise LayoutUnavailable(f"{name} has no checkpoint source")
        rows = []
        for part in parts:
            src = checkpoint.get(part)
            if src is None:
                raise LayoutUnavailable(f"{name}: checkpoint has no {part}")
            if len(src.shape) != len(checkpoint[parts[0]].shape):
                raise LayoutUnavailable(f"{name}: its parts differ in rank")
            rows.append((part, _rows_in(name, spec.shape, part, src.shape)))
        total = _rows_of(spec.shape, checkpoint[parts[0]].shape)
        if sum(r for _, r in rows) != total:
            raise LayoutUnavailable(f"{name}: parts have {sum(r for _, r in rows)} rows, "
                                    f"parameter has {total}")
        used.update(parts)
        params.append(KernelParam(name=name, dtype=spec.dtype, shape=spec.shape, parts=tuple(rows),
                                  fp8_scale=fp8[name].scale if name in fp8 else None))
    unused = set(checkpoint) - used - set(ignored)
    if unused:
        raise LayoutUnavailable(f"checkpoint tensors with no vLLM parameter: {sorted(unused)[:5]}")
    return KernelLayout(params=tuple(params))


def _rows_of(shape: tuple[int, ...], part: tuple[int, ...]) -> int:
    """Rows of ``shape`` viewed as ``(-1, *part[1:])``."""
    lead = len(shape) - max(len(part), 1) + 1
    return math.prod(shape[:lead]) if shape else 1


def _rows_in(name: str, shape: tuple[int, ...], part: str, part_shape: tuple[int, ...]) -> int:
    """The rows ``part`` contributes to the parameter ``name``, if its trailing dims fit."""
    if len(part_shape) > max(len(shape), 1) or (
            len(part_shape) > 1 and tuple(part_shape[1:]) != tuple(shape[len(shape) -
                                                                         len(part_shape) + 1:])):
        raise LayoutUnavailable(f"{name}: {part} shape {part_shape} does not stack into "
                                f"{shape}")
    return part_shape[0] if part_shape else 1


def fp8_views(src: Any, weight: Any) -> list[tuple[Any, Any]]:
    """The (unquantized ``[N, K]`` source, ``[N, K]`` view of the FP8 parameter) pairs vLLM's
    online FP8 quantizes with one dynamic scale each, in the order of its scales: a linear
    weight (2-D, kept as the transpose ``[K, N]`` of its quantized stack) is one pair; fused
    experts (3-D ``[E, N, K]``, quantized expert by expert and kept as stacked:
    ``Fp8OnlineMoEMethod``) are one pair per expert."""
    if weight.dim() == 2:
        return [(src, weight.t())]
    return [(src[e], weight[e]) for e in range(weight.shape[0])]


def first_mismatch(layout: KernelLayout, sent: dict, live: dict,
                   quantize: Callable[[Any], tuple[Any, Any]] | None = None) -> str | None:
    """Compare vLLM's own load (``live`` parameters) with a plain row stack of the checkpoint
    tensors ``sent`` (every part of every parameter), bit for bit: the first parameter that
    differs, or None. A parameter with an ``fp8_scale`` is compared as ``quantize`` (the
    engine's FP8 quantizer: ``[N, K]`` -> (FP8 ``[N, K]``, scale)) makes it, view by view
    (``fp8_views``): its weight and its scales."""
    import torch

    for p in layout.params:
        want = live[p.name]
        dtype = getattr(torch, p.dtype) if p.fp8_scale is not None else want.dtype
        # on the parameter's device: over gloo the buckets arrive in host memory while a GPU
        # engine's parameters are on the GPU (compared, and quantized, where they live)
        parts = [sent[name].to(want.device, dtype) for name, _ in p.parts]
        stacked = torch.cat(parts) if len(parts) > 1 else parts[0]
        if p.fp8_scale is None:
            if not torch.equal(stacked.view(want.shape), want.data):
                return p.name
            continue
        if quantize is None:
            return p.name
        views = fp8_views(stacked.reshape(p.shape), want.data)
        scales = []
        for src, kept in views:
            q, scale = quantize(src.contiguous())
            if not torch.equal(q.view(torch.uint8), kept.view(torch.uint8)):
                return p.name
            scales.append(scale.view(-1))
        if not torch.equal(torch.cat(scales), live[p.fp8_scale].data.view(-1)):
            return p.name
    return None
