"""What vLLM's model modules hold beside their parameters, buffers and submodules, for
``engine.kernel_reads``: a compat module, as ``vllm_compat`` (the names below are vLLM's own
attributes, read in 0.24's and 0.32's source)."""

from __future__ import annotations

from typing import Any

from weightsync.engine.vllm_compat import model

# what attention layers hold per request, and torch.compile's own artifacts: not weights
_RUNTIME_STATE = {"kv_cache", "aot_compiled_fn"}
# an attention layer's activation ranges, read only to calculate its KV-cache scales, once
# (``Attention.calc_kv_scales``, the first forward with ``calculate_kv_scales``). They are
# plain attributes, not buffers, so vLLM's level-2 sleep does not keep them (measured: they
# read back as garbage after a level-2 sleep and wake, at e13edc2); a layer that does not
# calculate its scales never reads them again.
_KV_SCALE_RANGES = {"q_range", "k_range", "v_range"}


def kernel_objects(worker: Any) -> list[tuple[str, Any]]:
    """What the model's modules hold besides their parameters, buffers and submodules
    (``engine.kernel_reads``), as ``(path, object)``: each quantization method (with the
    quant configs and kernels its ``process_weights_after_loading`` built) and any other
    attribute loading left (``cpu_linear``'s packed GEMM weights), without torch's own module
    internals, the attention layers' KV cache, torch.compile's artifacts (the example inputs
    a compiled graph keeps) and the activation ranges of layers that no longer calculate
    their KV-cache scales."""
    import torch

    internal = set(vars(torch.nn.Module())) | _RUNTIME_STATE
    found = []
    for prefix, module in model(worker).named_modules():
        skip = internal if getattr(module, "calculate_kv_scales", True) else \
            internal | _KV_SCALE_RANGES
        found += [(f"{prefix}.{attr}" if prefix else attr, value)
                  for attr, value in vars(module).items() if attr not in skip]
    return found


def kernel_handles() -> tuple[type, ...]:
    """The types vLLM wraps a C++ kernel object in, whose state Python cannot read
    (``engine.kernel_reads`` names them as opaque): the CPU oneDNN GEMM's handler, which holds
    the packed weights behind an address kept in an int64 tensor."""
    try:
        from vllm._custom_ops import CPUDNNLGEMMHandler
    except ImportError:
        return ()
    return (CPUDNNLGEMMHandler,)
