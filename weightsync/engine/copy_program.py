"""Kernel-layout copies into vLLM's parameters: which tensor goes where, kept across syncs.

A kernel-layout plan is copied straight into vLLM's parameters (what
``reload_weights(is_checkpoint_format=False)`` does, ``param.copy_`` per tensor, done as batched
copies: ``packing.copy_tensors``). Resolving ~300 names and views each sync costs more than the
copy itself, so the resolved targets (a ``CopyProgram``) are kept while the plan and the
(reused, still mapped) buffers stay the same (``CopyPrograms``). vLLM keeps its parameter
tensors across sleep/wake and reloads (it copies into them), so kept targets stay valid; any
checkpoint reload drops them anyway. This is the rare path's cache, kept out of the appliers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch

from weightsync.engine.finite import non_finite_message, require_finite, typed_pieces
from weightsync.errors import ConfigError, ReloadError, TransferError, VerificationError
from weightsync.transport.digest_cuda import ManyDigests
from weightsync.transport.layout import fp8_views
from weightsync.transport.packing import (
    Spans,
    copy_split,
    copy_tensors,
    span_targets,
    unpack_bucket,
)
from weightsync.types import Bucket

Params = Callable[[], Mapping[str, torch.Tensor]]
ProgramKey = tuple[str, tuple[int, ...]]  # (the plan's key, the buffers' addresses)


class Fp8Write(NamedTuple):
    """One online-FP8 weight written from its unquantized stack: ``src`` (the model's dtype:
    ``[N, K]``, or experts' ``[E, N, K]``) quantized into ``weight`` (the parameter's data:
    ``transport.layout.fp8_views`` pairs them, one scale each) and its scales copied into
    ``scales`` (the scale parameter, then any other tensor vLLM's kernels read the same
    scales from: ``vllm_fp8.scale_mirrors``)."""

    src: torch.Tensor
    weight: torch.Tensor
    scales: tuple[torch.Tensor, ...]

    def run(self) -> None:
        """One ``scaled_fp8_quant`` per view, as vLLM's own load does, straight into the
        parameter's storage (a gloo bucket is in host memory: quantized on the device)."""
        from weightsync.engine import vllm_fp8

        views = fp8_views(self.src.to(self.weight.device), self.weight)
        made = [vllm_fp8.fp8_quantize(src, out)[1].view(-1) for src, out in views]
        scale = made[0] if len(made) == 1 else torch.cat(made)
        for dst in self.scales:
            dst.copy_(scale.view(dst.shape), non_blocking=True)


class CopyProgram(NamedTuple):
    """Destinations (parameter views), sources, and how they are launched: ``copy_split``'s
    batching for packed buckets, or a ``ManyDigests`` that copies direct pieces as it
    checksums them; and the FP8 weights quantized from packed buckets (``fp8``). ``run()``
    runs a packed one."""

    dsts: list[torch.Tensor]
    srcs: list[torch.Tensor]
    launch: Any
    fp8: tuple[Fp8Write, ...] = ()

    def run(self) -> None:
        """Copy, then quantize each FP8 weight in place (``Fp8Write.run``)."""
        copy_tensors(self.dsts, self.srcs, self.launch)
        for w in self.fp8:
            w.run()


def kernel_targets(params: Mapping[str, torch.Tensor],
                   weights: Iterable[tuple[str, torch.Tensor]],
                   fp8: Mapping[str, str] | None = None,
                   mirrors: Mapping[str, Sequence[torch.Tensor]] | None = None) -> CopyProgram:
    """The program that loads kernel-layout tensors straight into vLLM's parameters. Only
    used once a checkpoint-format load verified the layout bit for bit
    (``LayoutCheck.calibrate``), and every plan was checked against the live parameters'
    names, shapes and dtypes (``ws_validate``). Measured on an H100 (0.5B shape, 170
    parameters): 0.9 ms batched vs 1.2 ms one ``copy_`` each. ``fp8``: the weights vLLM's
    online FP8 quantized on load, by name, with their scale parameters'
    (``vllm_fp8.fp8_targets``): each arrives as its unquantized stack (a linear weight's
    ``[N, K]``, the transpose of its parameter; experts' ``[E, N, K]``, its parameter's shape)
    and is quantized into the parameter (``Fp8Write``); ``mirrors``: by scale name, the other
    tensors vLLM's kernels read that scale from (``vllm_fp8.scale_mirrors``)."""
    fp8, mirrors = fp8 or {}, mirrors or {}
    dsts, srcs, writes = [], [], []
    for name, t in weights:
        p = params.get(name)
        if p is not None and name in fp8 and fp8[name] in params and (
                (t.dim() == 2 and tuple(p.shape) == tuple(reversed(t.shape)))
                or (t.dim() == 3 and p.shape == t.shape)):
            scale = fp8[name]
            writes.append(Fp8Write(t, p.data, (params[scale].data, *mirrors.get(scale, ()))))
            continue
        if p is None or p.shape != t.shape or p.dtype != t.dtype:
            raise ReloadError(f"kernel-layout tensor {name} {tuple(t.shape)} {t.dtype} does "
                              "not match the engine's parameter")
        dsts.append(p.data)
        srcs.append(t)
    return CopyProgram(dsts, srcs, copy_split(dsts, srcs), tuple(writes))


class CopyPrograms:
    """One worker's kept ``CopyProgram`` (and the typed views of its direct pieces, for the
    finite check), by the plan's key and the buffers' addresses."""

    def __init__(self) -> None:
        self._kept: tuple[ProgramKey, CopyProgram] | None = None  # (what it depends on, it)
        # programs made so far: a copy graph captured from one program must never replay for
        # another made over the same addresses (its launches read the old one's own tensors,
        # e.g. ``ManyDigests``' tables and outputs, freed once that program goes)
        self._made = 0
        self._finite: tuple[CopyProgram, list[tuple[str, torch.Tensor]]] | None = None

    def program(self, staged: list[tuple[Bucket, Any]], key: str | None,
                params: Params, fp8: Mapping[str, str] | None = None,
                mirrors: Callable[[], Mapping[str, Sequence[torch.Tensor]]] | None = None
                ) -> CopyProgram:
        """``kernel_targets`` for staged buckets (or ``span_targets`` for direct ones), kept
        while ``key`` (None: not kept) and the buffers stay the same. ``params()``: the live
        parameters by name (read only when the program is resolved); ``fp8``: the weights
        quantized on load (``kernel_targets``), which direct pieces cannot fill; ``mirrors()``:
        the other tensors their scales are read from (read only when the program is
        resolved)."""
        ck = (key, tuple(buf.data_ptr() for _, buf in staged)) if key is not None else None
        kept = self._kept
        if ck is not None and kept is not None and kept[0] == ck:
            return kept[1]
        if any(isinstance(buf, Spans) for _, buf in staged):  # direct: from the trainer's
            if fp8:  # (its pieces would be copied, unquantized, into the FP8 weights)
                raise TransferError("the engine quantizes its weights on load (online FP8): "
                                    "direct IPC pieces cannot be quantized as they are "
                                    "copied; sync packed IPC buckets instead")
            live = {n: p.data for n, p in params().items()}  # memory, piece by piece
            dsts, srcs = [], []
            try:
                for b, spans in staged:
                    d, s = span_targets(b, spans, live)
                    dsts += d
                    srcs += s
            except ConfigError as e:
                raise TransferError(str(e)) from e  # (nothing copied yet)
            # copied by the launch that checksums them (CheckedByCopyApplier)
            program = CopyProgram(dsts, srcs, ManyDigests(srcs, copy_to=dsts))
        else:
            program = kernel_targets(params(), (t for b, buf in staged
                                                for t in unpack_bucket(b, buf)), fp8,
                                     mirrors() if fp8 and mirrors is not None else None)
        self._made += 1
        self._kept = (ck, program) if ck is not None else None
        return program

    def graph_key(self, program: CopyProgram
                  ) -> tuple[int, ProgramKey, tuple[int, ...]] | None:
        """What a kept program's copy graph depends on (which program it is, its key, and
        where the parameters are); None when no program is kept (nothing to replay)."""
        kept = self._kept
        if kept is None or kept[1] is not program:
            return None
        return (self._made, kept[0], tuple(d.data_ptr() for d in program.dsts))

    def require_finite(self, program: CopyProgram, params: Params,
                       flags: torch.Tensor | None = None) -> None:
        """Refuse direct pieces holding NaN or Inf before any is copied: as the sender found
        them when it checksummed them (``flags``, ``Incoming.sender_nonfinite``: one read-back,
        and what is copied is then checked against those checksums), or, where it did not
        look, by reading them here (``typed_pieces``)."""
        seen = flags.tolist() if flags is not None else None
        if seen is not None and len(seen) != len(program.srcs):
            raise TransferError(f"the sender's finite flags cover {len(seen)} pieces, "
                                f"not {len(program.srcs)}")
        if seen is not None and min(seen, default=0) >= 0:
            if any(seen):  # (names, in order, once each: pieces of one parameter share it)
                bad = list(dict.fromkeys(n for (n, _), f in zip(
                    self._typed(program, params), seen, strict=True) if f))
                raise VerificationError(non_finite_message(bad, "the sender's tensors"))
            return
        require_finite(self._typed(program, params), "the sender's tensors")

    def _typed(self, program: CopyProgram, params: Params) -> list[tuple[str, torch.Tensor]]:
        kept = self._finite
        if kept is None or kept[0] is not program:
            kept = self._finite = (program, typed_pieces(params(), program.dsts, program.srcs))
        return kept[1]

    def forget(self) -> None:
        """The buffers the kept program points into are gone."""
        self._kept = None
