"""Whether this worker may load kernel-layout plans: a derived layout, verified bit for bit.

A layout derived from the model's mappings (``transport.layout.derive_layout``) is only a
candidate until a checkpoint-format load shows that vLLM's own loader produces exactly our
stacking of the tensors it was sent (``LayoutCheck.calibrate``, after a staged or atomic
checkpoint-format sync of every parameter); for a weight vLLM quantizes on load (online FP8),
exactly our quantization of that stack, weight and scale. A checkpoint reload from files drops
it (re-derived and re-verified on the next sync).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from weightsync.messages import LayoutStatus
from weightsync.transport.layout import KernelLayout, LayoutUnavailable, first_mismatch
from weightsync.transport.packing import unpack_bucket
from weightsync.types import Bucket


class LayoutCheck:
    """One worker's kernel layout and its status. ``derive()`` derives the layout from the
    model as loaded (``LayoutUnavailable`` when it cannot be explained)."""

    def __init__(self, derive: Callable[[], KernelLayout],
                 quantize: Callable[[Any], tuple[Any, Any]] | None = None) -> None:
        self._derive = derive
        self._quantize = quantize  # the engine's FP8 quantizer (vllm_fp8.fp8_quantize)
        self.layout: KernelLayout | None = None
        self._status: LayoutStatus | None = None

    def fp8_scales(self) -> dict[str, str]:
        """The layout's online-FP8 weights, by name, with their scale parameters' names:
        these arrive unquantized and are quantized on the engine."""
        if self.layout is None:
            return {}
        return {p.name: p.fp8_scale for p in self.layout.params if p.fp8_scale is not None}

    def status(self) -> tuple[LayoutStatus, KernelLayout | None]:
        """The status (derived on first use) and the layout, if one was derived."""
        if self._status is None:
            try:
                self.layout = self._derive()
                self._status = LayoutStatus(
                    candidate=True, verified=False,
                    reason="not yet verified by a checkpoint-format load")
            except LayoutUnavailable as e:
                self._status = LayoutStatus(candidate=False, verified=False, reason=str(e))
        return self._status, self.layout

    def calibrate(self, staged: list[tuple[Bucket, Any]],
                  params: Callable[[], Mapping[str, torch.Tensor]]) -> None:
        """Compare vLLM's own load of ``staged`` with our stacking of it, bit for bit
        (``params()``: the live parameters, read only when there is a layout to verify)."""
        status, layout = self.status()
        if not status.candidate or status.verified or layout is None:
            return
        sent = {n: t for b, buf in staged for n, t in unpack_bucket(b, buf)}
        if any(name not in sent for p in layout.params for name, _ in p.parts):
            return  # a partial sync cannot verify every parameter; wait for a full one
        mismatch = first_mismatch(layout, sent, dict(params()), self._quantize)
        self._status = LayoutStatus(candidate=True, verified=True, reason="verified") \
            if mismatch is None else LayoutStatus(
                candidate=False, verified=False,
                reason=f"{mismatch}: vLLM's loader does not produce a plain row stack of the "
                       "checkpoint tensors")

    def forget(self) -> None:
        """Re-derive and re-verify on the next sync (the model was reloaded from files)."""
        self.layout = self._status = None
