"""vLLM's FP8 quantization, the one place weightsync touches it (a compat module beside
``weightsync.engine.vllm_compat``, as ``vllm_lora`` is for LoRA): whether this GPU can run an
engine's ``quantization``, which weights vLLM's online FP8 quantized on load (linear weights
and fused experts), where else its kernels read their scales, and vLLM's own quantizer, which
the FP8 kernel layout runs on the engine (``engine.copy_program.Fp8Write``). Read against vLLM
0.24's ``quantization/online/fp8.py``, ``quantization/fp8.py`` (``Fp8OnlineMoEMethod``),
``fused_moe/oracle/fp8.py`` and ``_custom_ops.scaled_fp8_quant``.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch

from weightsync.engine.kernel_reads import held_tensors
from weightsync.engine.vllm_compat import model
from weightsync.errors import TransferError


def quantization_refusal(args: dict[str, Any], device: str) -> str | None:
    """Why this engine's device cannot run its ``quantization``, or None: the CPU rule of
    ``weightsync.engine_args.device_refusal``, and on a GPU vLLM's own minimum compute
    capability for the method (``get_min_capability``) against this GPU's."""
    from weightsync.engine_args import device_refusal

    why = device_refusal(args, device)
    method = args.get("quantization")
    if why is not None or device != "cuda" or not method:
        return why
    from vllm.model_executor.layers.quantization import get_quantization_config
    from vllm.platforms import current_platform

    need = int(get_quantization_config(str(method)).get_min_capability())
    cap = current_platform.get_device_capability()
    have = cap.to_int() if cap is not None else 0
    if have < need:
        return (f"quantization {method!r} needs a GPU of compute capability "
                f"{need // 10}.{need % 10} or above (vLLM's minimum for it); this GPU is "
                f"{have // 10}.{have % 10}")
    return None


def _online_moe_methods() -> tuple[type, ...]:
    """vLLM's online FP8 MoE methods that quantize each expert with one dynamic scale
    (0.24: ``Fp8OnlineMoEMethod`` for ``"fp8"``, ``Fp8PerTensorOnlineMoEMethod`` for
    ``"fp8_per_tensor"``; the same ``process_weights_after_loading``)."""
    found: list[type] = []
    try:
        from vllm.model_executor.layers.quantization.fp8 import Fp8OnlineMoEMethod
        found.append(Fp8OnlineMoEMethod)
    except ImportError:
        pass
    try:
        from vllm.model_executor.layers.quantization.online.fp8 import (
            Fp8PerTensorOnlineMoEMethod,
        )
        found.append(Fp8PerTensorOnlineMoEMethod)
    except ImportError:
        pass
    return tuple(found)


# the FP8 MoE backends whose kernel format is the quantized stack as is
# (``convert_to_fp8_moe_kernel_format`` in 0.24: the identity for these; Marlin, FlashInfer,
# DeepGEMM and AITER repack, so their experts keep syncs in the checkpoint format)
_PLAIN_MOE_BACKENDS = frozenset({"TRITON", "BATCHED_TRITON", "VLLM_CUTLASS",
                                 "BATCHED_VLLM_CUTLASS"})
_EXPERT_WEIGHTS = ("w13", "w2")


def _plain_moe(module: Any, moe: tuple[type, ...]) -> dict[str, Any] | None:
    """If ``module`` holds experts vLLM's online FP8 quantized per expert on load and kept in
    the plain layout (``[E, N, K]`` FP8, one fp32 scale per expert): the scale tensors its
    quant config holds apart from the scale parameters, by parameter name (``scale_mirrors``);
    else None. Also None, so that its experts keep the checkpoint format, when the quant
    method holds any other tensor shaped as one of its FP8 weights or scales: a copy a
    kernel-layout write would not reach."""
    method = getattr(module, "quant_method", None)
    backend = getattr(getattr(method, "fp8_backend", None), "value", None)
    if not moe or not isinstance(method, moe) or backend not in _PLAIN_MOE_BACKENDS or \
            not getattr(module, "_already_called_process_weights_after_loading", False):
        return None
    config = getattr(method, "moe_quant_config", None)
    mirrors: dict[str, Any] = {}
    for w, held in zip(_EXPERT_WEIGHTS, (getattr(config, "w1_scale", None),
                                         getattr(config, "w2_scale", None)), strict=True):
        weight = module._parameters.get(f"{w}_weight")
        scale = module._parameters.get(f"{w}_weight_scale")
        if weight is None or scale is None or weight.dim() != 3 or \
                not weight.is_contiguous() or tuple(scale.shape) != (weight.shape[0],) or \
                weight.shape[0] != getattr(module, "local_num_experts", -1) or \
                not isinstance(held, torch.Tensor) or held.shape != scale.shape or \
                held.dtype != scale.dtype:
            return None
        if held.data_ptr() != scale.data_ptr():
            mirrors[f"{w}_weight_scale"] = held
    ours = [t for t in module._parameters.values() if t is not None] + list(mirrors.values())
    known = {t.data_ptr() for t in ours}
    shapes = {(t.dtype, tuple(t.shape)) for t in ours}
    for _, t in held_tensors(method, "quant_method"):
        if (t.dtype, tuple(t.shape)) in shapes and t.data_ptr() not in known:
            return None
    return mirrors


def fp8_targets(worker: Any) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The weights vLLM's online FP8 quantized on load, by name: ``(scale name, the
    unquantized shape)``.

    - Linear weights quantized per tensor
      (``Fp8PerTensorOnlineLinearMethod.process_weights_after_loading`` in 0.24:
      ``scaled_fp8_quant(weight)``, the weight kept as the FP8 result's transpose ``[K, N]``
      and its scale as ``weight_scale``): the shape is ``[N, K]``. Only weights laid out as
      that leaves them (dense transposed, a one-element scale, no Marlin repack, no padding).
    - Fused experts quantized per expert (``Fp8OnlineMoEMethod``: ``scaled_fp8_quant`` of each
      expert's ``[N, K]``, kept stacked ``[E, N, K]``, one scale per expert in
      ``w13_weight_scale``/``w2_weight_scale``), where the backend keeps that layout
      (``_PLAIN_MOE_BACKENDS``): the shape is the parameter's.

    Any other quantized weight keeps a sync in the checkpoint format."""
    try:
        from vllm.model_executor.layers.quantization.online.fp8 import (
            Fp8PerTensorOnlineLinearMethod,
        )
    except ImportError:  # (a vLLM without online FP8 methods)
        return {}
    moe = _online_moe_methods()
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for prefix, module in model(worker).named_modules():
        head = f"{prefix}." if prefix else ""
        if _plain_moe(module, moe) is not None:
            for w in _EXPERT_WEIGHTS:
                out[f"{head}{w}_weight"] = (f"{head}{w}_weight_scale",
                                            tuple(module._parameters[f"{w}_weight"].shape))
            continue
        method = getattr(module, "quant_method", None)
        if not isinstance(method, Fp8PerTensorOnlineLinearMethod) or method.use_marlin or \
                not getattr(module, "_already_called_process_weights_after_loading", False):
            continue
        w, scale = getattr(module, "weight", None), getattr(module, "weight_scale", None)
        n, k = (getattr(module, "output_size_per_partition", None),
                getattr(module, "input_size_per_partition", None))
        if w is None or scale is None or w.dim() != 2 or tuple(w.shape) != (k, n) or \
                not w.t().is_contiguous() or scale.numel() != 1:
            continue
        out[f"{head}weight"] = (f"{head}weight_scale", (int(n), int(k)))
    return out


def scale_mirrors(worker: Any, scales: Collection[str]) -> dict[str, list[Any]]:
    """By scale parameter name: the other tensors vLLM's kernels read the same scales from,
    which a kernel-layout write must update too, for the ``scales`` a plan writes. vLLM
    0.24's FP8 MoE methods build their ``moe_quant_config`` (which the experts kernel reads
    on every eager forward) over the scale tensors ``process_weights_after_loading`` made;
    after a checkpoint-format reload those are that reload's temporaries, while the
    parameters (which CUDA graphs read) are the originals, refilled with equal values
    (``reload/layerwise.py``). Writing the parameters alone would leave eager forwards on the
    old scales. ``TransferError`` (before anything is written) if a layer whose scales the
    plan writes no longer holds them as ``_plain_moe`` requires."""
    moe = _online_moe_methods()
    out: dict[str, list[Any]] = {}
    for prefix, module in model(worker).named_modules():
        head = f"{prefix}." if prefix else ""
        names = [f"{head}{w}_weight_scale" for w in _EXPERT_WEIGHTS]
        if not any(n in scales for n in names):
            continue
        mirrors = _plain_moe(module, moe)
        if mirrors is None:
            raise TransferError(f"{prefix}: its FP8 experts are no longer laid out as the "
                                "kernel layout was verified for; sync in the checkpoint format")
        out |= {f"{head}{n}": [t] for n, t in mirrors.items()}
    return out


def fp8_quantize(src: Any, out: Any | None = None) -> tuple[Any, Any]:
    """``src`` (``[N, K]``, the model's dtype) quantized to FP8 with one dynamic scale, as vLLM's
    online FP8 quantizes a weight on load (``_custom_ops.scaled_fp8_quant``, scale None), into
    ``out`` if given: (the FP8 tensor, its scale)."""
    from vllm import _custom_ops as ops

    q, scale = ops.scaled_fp8_quant(src, scale=None, output=out)
    return q, scale
