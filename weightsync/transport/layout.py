"""Kernel layout: how checkpoint tensors map onto vLLM's (fused) parameters. Pure logic.

vLLM fuses checkpoint tensors at load time (``q_proj``/``k_proj``/``v_proj`` -> ``qkv_proj``,
``gate_proj``/``up_proj`` -> ``gate_up_proj``), declared per model in its own
``packed_modules_mapping``. From that mapping, the engine's parameter specs and the checkpoint
headers we derive, once, which checkpoint tensors make up each vLLM parameter and in which row
ranges. The trainer then packs buckets already in vLLM's layout and the engine copies them
straight into its parameters (what ``reload_weights(is_checkpoint_format=False)`` does, as
batched copies: ``worker_ext._kernel_targets``), skipping the
per-tensor weight loaders.

A derived layout is only a candidate: the engine verifies it bit for bit against what vLLM's
own loader produced on a checkpoint-format sync (see ``worker_ext``) before it is used.
Anything it cannot explain (quantized or repacked weights, renamed modules, interleaved
shards) means no layout, and syncs keep the checkpoint-format path.
"""

from __future__ import annotations

import hashlib

from pydantic import BaseModel, ConfigDict

from weightsync.types import TensorSpec


class KernelParam(BaseModel):
    """One vLLM parameter and the checkpoint tensors stacked (dim 0) to form it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    dtype: str
    shape: tuple[int, ...]
    parts: tuple[tuple[str, int], ...]  # (checkpoint name, rows), in order


class KernelLayout(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    params: tuple[KernelParam, ...]

    @property
    def signature(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]

    def spec(self, p: KernelParam) -> TensorSpec:
        return TensorSpec(name=p.name, dtype=p.dtype, shape=p.shape)


class LayoutUnavailable(ValueError):
    """The kernel layout cannot be derived; the message says why."""


def derive_layout(vllm_params: dict[str, TensorSpec], checkpoint: dict[str, TensorSpec],
                  packed: dict[str, list[str]], ignored: set[str] = frozenset()) -> KernelLayout:
    """Explain every vLLM parameter as a row-stack of checkpoint tensors, or raise why not."""
    used: set[str] = set()
    params = []
    for name, spec in vllm_params.items():
        if 0 in spec.shape and spec.shape != ():
            raise LayoutUnavailable(f"{name} was repacked by the backend (shape {spec.shape})")
        module, _, leaf = name.rpartition(".")
        prefix, _, mod_leaf = module.rpartition(".")
        if name in checkpoint:
            parts = [name]
        elif mod_leaf in packed:
            parts = [f"{prefix}.{p}.{leaf}" if prefix else f"{p}.{leaf}" for p in packed[mod_leaf]]
        else:
            raise LayoutUnavailable(f"{name} has no checkpoint source")
        rows = []
        for part in parts:
            src = checkpoint.get(part)
            if src is None:
                raise LayoutUnavailable(f"{name}: checkpoint has no {part}")
            if tuple(src.shape[1:]) != tuple(spec.shape[1:]) or len(src.shape) != len(spec.shape):
                raise LayoutUnavailable(f"{name}: {part} shape {src.shape} does not stack into "
                                        f"{spec.shape}")
            rows.append((part, src.shape[0] if src.shape else 1))
        if sum(r for _, r in rows) != (spec.shape[0] if spec.shape else 1):
            raise LayoutUnavailable(f"{name}: parts have {sum(r for _, r in rows)} rows, "
                                    f"parameter has {spec.shape[0]}")
        used.update(parts)
        params.append(KernelParam(name=name, dtype=spec.dtype, shape=spec.shape, parts=tuple(rows)))
    unused = set(checkpoint) - used - set(ignored)
    if unused:
        raise LayoutUnavailable(f"checkpoint tensors with no vLLM parameter: {sorted(unused)[:5]}")
    return KernelLayout(params=tuple(params))
