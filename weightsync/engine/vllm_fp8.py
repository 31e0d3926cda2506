"""vLLM's FP8 quantization, the one place weightsync touches it (a compat module beside
``weightsync.engine.vllm_compat``, as ``vllm_lora`` is for LoRA): whether this GPU can run an
engine's ``quantization``, which weights vLLM's online FP8 quantized on load, and vLLM's own
quantizer, which the FP8 kernel layout runs on the engine (``engine.copy_program.Fp8Write``).
Read against vLLM 0.24's ``quantization/online/fp8.py`` and ``_custom_ops.scaled_fp8_quant``.
"""

from __future__ import annotations

from typing import Any

from weightsync.engine.vllm_compat import model


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


def fp8_targets(worker: Any) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The linear weights vLLM's online FP8 quantized per tensor on load
    (``Fp8PerTensorOnlineLinearMethod.process_weights_after_loading`` in 0.24:
    ``scaled_fp8_quant(weight)``, the weight kept as the FP8 result's transpose ``[K, N]`` and
    its scale as ``weight_scale``), by name: ``(scale name, the unquantized [N, K] shape)``.
    Only weights laid out as that leaves them (dense transposed, a one-element scale, no
    Marlin repack, no padding) are listed; any other quantized weight keeps a sync in the
    checkpoint format."""
    try:
        from vllm.model_executor.layers.quantization.online.fp8 import (
            Fp8PerTensorOnlineLinearMethod,
        )
    except ImportError:  # (a vLLM without online FP8 methods)
        return {}
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for prefix, module in model(worker).named_modules():
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
        head = f"{prefix}." if prefix else ""
        out[f"{head}weight"] = (f"{head}weight_scale", (int(n), int(k)))
    return out


def fp8_quantize(src: Any, out: Any | None = None) -> tuple[Any, Any]:
    """``src`` (``[N, K]``, the model's dtype) quantized to FP8 with one dynamic scale, as vLLM's
    online FP8 quantizes a weight on load (``_custom_ops.scaled_fp8_quant``, scale None), into
    ``out`` if given: (the FP8 tensor, its scale)."""
    from vllm import _custom_ops as ops

    q, scale = ops.scaled_fp8_quant(src, scale=None, output=out)
    return q, scale
