"""The fingerprint of an engine's loaded weights: equal across a verified fleet.

Each parameter's bytes are checksummed where they live (``packing.digest_terms``), and the
checksums hashed with every parameter's name, dtype and shape (a parameter that is a dense
permuted view, as FP8's transposed weights are, is read in memory order: ``in_memory_order``).
The parameters stay where they are from sync to sync (sleep level 2 maps them back at the
same addresses), so on CUDA all of them are one kernel (``digest_cuda.ManyDigests``) replayed
as a graph (``transport.graphs``), and the names are hashed once: what remains is one pass
over the weights at memory bandwidth and one device-to-host copy of the checksums.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Any

import torch

from weightsync.transport.digest_cuda import ManyDigests
from weightsync.transport.packing import digest_terms, dtype_name, fold_terms


def in_memory_order(t: torch.Tensor) -> torch.Tensor:
    """``t`` with its dimensions permuted into memory order (strides decreasing): contiguous
    for any dense permuted view, such as the ``qweight.t()`` vLLM's online FP8 keeps as each
    linear layer's weight, so such a parameter is checksummed where it lives, in the order
    its bytes lie, instead of copied first (every FP8 fingerprint took ~70 ms on an H100 for
    the 0.5B shape, 5x the bf16 one). Warm and cold engines of one spec lay out their
    parameters alike, so their fingerprints still agree."""
    if t.dim() < 2 or t.is_contiguous():
        return t
    order = sorted(range(t.dim()), key=lambda d: (-t.stride(d), d))
    return t.permute(order)


def memory_bytes(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bytes as one flat uint8 tensor, in memory order (``in_memory_order``): read in
    place where ``t`` is dense, copied otherwise."""
    return in_memory_order(t.detach()).contiguous().view(-1).view(torch.uint8)


class Fingerprinter:
    """One worker's fingerprints, with the views, names' hash and kernel kept while the
    parameters stay where they are. ``replay(key, run)`` runs ``run`` as a graph kept under
    ``key`` (the worker's ``Replay``)."""

    def __init__(self, replay: Callable[[Any, Callable[[], torch.Tensor]], torch.Tensor]) -> None:
        self._replay = replay
        self._kept: tuple | None = None

    def digest(self, params: Mapping[str, torch.Tensor]) -> str:
        key = tuple((p.data_ptr(), p.numel(), p.dtype, in_memory_order(p).is_contiguous())
                    for p in params.values())
        kept = self._kept
        if kept is None or kept[0] != key or not all(k[3] for k in key):  # (a copy is stale)
            order = sorted(params)
            head = hashlib.sha256()
            for name in order:
                p = params[name]
                head.update(f"{name}:{dtype_name(p.dtype)}{tuple(p.shape)};".encode())
            flats = [memory_bytes(params[n]) for n in order]
            many = ManyDigests(flats) if flats and flats[0].is_cuda and \
                all(k[3] for k in key) else None
            kept = self._kept = (key, head, flats, many)
        _, head, flats, many = kept
        with torch.no_grad():
            if many is not None:  # one launch, replayed as a graph
                terms = self._replay((key, many), many.terms)
            else:
                terms = digest_terms(flats)
            sums = fold_terms([f.numel() for f in flats], terms.tolist())
        h = head.copy()
        h.update(",".join(map(str, sums)).encode())
        return h.hexdigest()[:32]
