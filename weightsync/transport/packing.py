"""Pure bucket planning, packing, unpacking and checksums. No I/O, no process groups.

Tensors are packed back to back into flat ``uint8`` buffers at ``ALIGN``-byte offsets, so
every tensor in a received bucket is a zero-copy view of it. Padding is zero on the sender, so
sender and receiver checksum identical bytes.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from weightsync.errors import ConfigError, TransferError
from weightsync.types import Bucket, ParamSlot, TensorSpec, TransferPlan

ALIGN = 256  # bytes; a multiple of every dtype's size and of the CUDA allocator's granularity
_MOD = (1 << 61) - 1  # Mersenne prime folding (length, sums) into one int
_U64 = 1 << 64
_ROW_WORDS = 512  # 64-bit words per checksum row
_ROW_BYTES = 8 * _ROW_WORDS


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ConfigError(f"unknown dtype {name!r}")
    return dt


def spec_of(name: str, tensor: torch.Tensor) -> TensorSpec:
    return _spec(name, dtype_name(tensor.dtype), tuple(tensor.shape))


@functools.lru_cache(maxsize=1 << 16)
def _spec(name: str, dtype: str, shape: tuple[int, ...]) -> TensorSpec:
    """One frozen spec per (name, dtype, shape): a trainer's tensors are described again every
    sync (a 0.5B model's 290 validations took ~1.2 ms of each sync)."""
    return TensorSpec(name=name, dtype=dtype, shape=shape)


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def plan_buckets(specs: Sequence[TensorSpec], bucket_bytes: int, version: int) -> TransferPlan:
    """Group tensors, in the given order, into buckets of about ``bucket_bytes``.

    A tensor larger than ``bucket_bytes`` gets a bucket of its own; nothing is split, so a
    receiver can hand out whole tensors as soon as their bucket lands.
    """
    buckets: list[Bucket] = []
    slots: list[ParamSlot] = []
    used = 0

    def close() -> None:
        nonlocal slots, used
        if slots:
            buckets.append(Bucket(index=len(buckets), nbytes=_align(used), slots=tuple(slots)))
        slots, used = [], 0

    for spec in specs:
        size = spec.nbytes
        if slots and used + size > bucket_bytes:
            close()
        slots.append(ParamSlot(**spec.model_dump(), offset=used))
        used = _align(used + size)
    close()
    return TransferPlan(version=version, buckets=tuple(buckets))


def pack_bucket(bucket: Bucket, tensors: dict[str, torch.Tensor | Sequence[torch.Tensor]],
                device: torch.device | str, out: torch.Tensor | None = None,
                views: dict | None = None) -> torch.Tensor:
    """Copy the bucket's tensors into one new flat uint8 buffer on ``device``.

    A value may be a sequence of tensors: they are stacked along dim 0 straight into the slot
    (kernel layout: ``q``/``k``/``v`` into ``qkv``; parts of lower rank stack along the slot's
    flattened leading dims: experts into ``w13``) with no intermediate concatenation.
    Sources in another dtype are cast by the copy (e.g. fp32 master weights to bf16).
    ``out``: a buffer of the bucket's size to pack into again; ``views``: a dict the caller
    keeps with ``out``, where the destination views are cached for the same bucket object.
    """
    if out is not None and out.numel() == bucket.nbytes:
        buf = out  # padding is left as it is: whatever it holds, both ends checksum it
    else:
        buf = torch.zeros(bucket.nbytes, dtype=torch.uint8, device=device)
    srcs = bucket_sources(bucket, tensors)
    kinds = [(s.shape, s.dtype, s.device) for s in srcs]  # what the views depend on
    cached = views.get("dsts") if views is not None else None
    if cached is not None and cached[0] is bucket and cached[1] is buf and cached[2] == kinds:
        dsts = cached[3]
    else:
        dsts = _destinations(bucket, buf, tensors)
        if views is not None:
            views["dsts"] = (bucket, buf, kinds, dsts)
    where = [(s.data_ptr(), s.stride()) for s in srcs]  # what merging copies depends on too
    merged = views.get("merged") if views is not None else None
    if merged is None or merged[0] is not dsts or merged[1] != where:
        runs = copy_runs(dsts, srcs)
        merged_dsts = [_span(dsts, r) for r in runs]
        merged = (dsts, where, runs, merged_dsts, copy_split(merged_dsts, _spans(srcs, runs)))
        if views is not None:
            views["merged"] = merged  # no source is kept: a bucket's tensors may be transient
    with torch.no_grad():
        copy_tensors(merged[3], _spans(srcs, merged[2]), merged[4])
    return buf


def copy_runs(dsts: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor]) -> list[list[int]]:
    """The copies grouped into runs that are one copy each: consecutive copies whose sources
    follow each other in one tensor's memory, as their destinations do in the bucket. The
    per-expert slices a fused ``[experts, 2 * inter, hidden]`` tensor is split into for its
    checkpoint names (256 per layer for 128 experts) are packed back into the same fused
    layout, so each layer's experts are one copy, not hundreds of launches."""
    runs: list[list[int]] = []
    for i, (d, s) in enumerate(zip(dsts, srcs, strict=True)):
        if runs and _follows(dsts[runs[-1][-1]], d) and _follows(srcs[runs[-1][-1]], s):
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def _span(ts: Sequence[torch.Tensor], run: list[int]) -> torch.Tensor:
    """One flat view over the tensors of ``run`` (they follow each other), or the tensor."""
    if len(run) == 1:
        return ts[run[0]]
    t0 = ts[run[0]]
    return t0.as_strided((sum(ts[i].numel() for i in run),), (1,), t0.storage_offset())


def _spans(ts: Sequence[torch.Tensor], runs: list[list[int]]) -> list[torch.Tensor]:
    return [_span(ts, r) for r in runs]


def _follows(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``b`` starts where ``a`` ends, both dense, in the same storage."""
    return a.is_contiguous() and b.is_contiguous() and a.device == b.device and \
        a.dtype == b.dtype and a.data_ptr() + a.numel() * a.element_size() == b.data_ptr() and \
        a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def bucket_sources(bucket: Bucket, tensors) -> list[torch.Tensor]:
    """The source tensors ``pack_bucket`` copies for ``bucket``, in order (parts flattened)."""
    srcs: list[torch.Tensor] = []
    for slot in bucket.slots:
        value = tensors[slot.name]
        srcs.extend([value] if isinstance(value, torch.Tensor) else value)
    return srcs


def _destinations(bucket: Bucket, buf: torch.Tensor, tensors) -> list[torch.Tensor]:
    """Views of ``buf`` for every source tensor of ``bucket``, in slot order."""
    dsts: list[torch.Tensor] = []
    for slot in bucket.slots:
        value = tensors[slot.name]
        parts = [value] if isinstance(value, torch.Tensor) else list(value)
        view = buf[slot.offset : slot.offset + slot.nbytes].view(torch_dtype(slot.dtype)).view(slot.shape)
        if len(parts) == 1:
            if tuple(parts[0].shape) != slot.shape:
                raise ConfigError(f"tensor {slot.name} has shape {tuple(parts[0].shape)}, "
                                  f"plan says {slot.shape}")
            dsts.append(view)
            continue
        if parts[0].dim() < view.dim():  # experts' 2-D parts into a 3-D slot: its rows
            view = view.view(-1, *parts[0].shape[1:])
        rows = sum(p.shape[0] if p.dim() else 1 for p in parts)
        if rows != view.shape[0] or any(tuple(p.shape[1:]) != tuple(view.shape[1:])
                                        for p in parts):
            raise ConfigError(f"parts of {slot.name} have {rows} rows of "
                              f"{tuple(parts[0].shape[1:])}, plan says {slot.shape}")
        r = 0
        for p in parts:
            dsts.append(view[r : r + p.shape[0]])
            r += p.shape[0]
    return dsts


_BATCH_BELOW = 4 << 20  # bytes: smaller copies share multi-tensor launches


def copy_split(dsts: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor]
               ) -> tuple[list[int], list[int]]:
    """Indices of the copies to batch (small, same dtype and device) and to run one by one."""
    small, single = [], []
    for i, (d, s) in enumerate(zip(dsts, srcs, strict=True)):
        batch = d.dtype == s.dtype and d.device == s.device and \
            d.numel() * d.element_size() < _BATCH_BELOW
        (small if batch else single).append(i)
    return small, single


def copy_tensors(dsts: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor],
                 split: tuple[list[int], list[int]] | None = None) -> None:
    """Copy each source into its destination (casting where dtypes differ).

    Small same-dtype copies are batched into multi-tensor launches (hundreds of biases and
    norms would otherwise be hundreds of launches); large ones go one by one, where a plain
    copy runs at memory bandwidth and the multi-tensor kernel does not (measured on an H100:
    7B-shaped, 14 GB, batched 16.7 ms vs one by one 10.4 ms; floor 9.4 ms). ``split``: a
    ``copy_split`` of the same lists, kept by callers that copy them again and again.
    """
    small, single = split if split is not None else copy_split(dsts, srcs)
    for i in single:
        dsts[i].copy_(srcs[i], non_blocking=True)
    if small:
        torch._foreach_copy_([dsts[i] for i in small], [srcs[i] for i in small],
                             non_blocking=True)


class NotDirect(Exception):
    """Why a plan's tensors cannot be read where they lie (``direct_pieces``): they are packed."""


@dataclass(frozen=True)
class Piece:
    """Bytes ``[offset, offset + nbytes)`` of storage ``storage`` (an index into the sync's
    storages): one contiguous run of a slot's bytes."""

    storage: int
    offset: int
    nbytes: int


def direct_pieces(plan: TransferPlan, tensors, device: torch.device
                  ) -> tuple[list[torch.Tensor], list[list[list[Piece]]]]:
    """Every slot of ``plan`` as runs of the source tensors' own storages, instead of a packed
    copy: (a flat uint8 view of each storage involved, per bucket per slot its pieces).
    Concatenated, a slot's pieces are the bytes ``pack_bucket`` would write into it; runs that
    follow each other in one storage are one piece (a fused expert tensor's per-expert views:
    one piece per layer). ``NotDirect`` says why not: a source on another device, in another
    dtype (a cast needs a copy), not dense, or not 8-byte aligned (the checksum reads words)."""
    index: dict[int, int] = {}  # storage address -> its index
    storages: list[torch.Tensor] = []
    out: list[list[list[Piece]]] = []
    for bucket in plan.buckets:
        slots: list[list[Piece]] = []
        for slot in bucket.slots:
            value = tensors[slot.name]
            pieces: list[Piece] = []
            for t in [value] if isinstance(value, torch.Tensor) else value:
                if t.device != device:
                    raise NotDirect(f"{slot.name}: a part lies on {t.device}, not {device}")
                if dtype_name(t.dtype) != slot.dtype:
                    raise NotDirect(f"{slot.name}: a part is {dtype_name(t.dtype)}, the slot "
                                    f"{slot.dtype} (a cast needs a copy)")
                if not t.is_contiguous():
                    raise NotDirect(f"{slot.name}: a part is not dense")
                if not t.numel():  # no bytes, and maybe no address
                    continue
                st = t.untyped_storage()
                k = index.get(st.data_ptr())
                if k is None:
                    k = index[st.data_ptr()] = len(storages)
                    storages.append(torch.empty(0, dtype=torch.uint8, device=t.device)
                                    .set_(st, 0, (st.nbytes(),), (1,)))
                offset, n = t.data_ptr() - st.data_ptr(), t.numel() * t.element_size()
                last = pieces[-1] if pieces else None
                if last is not None and last.storage == k and last.offset + last.nbytes == offset:
                    pieces[-1] = Piece(k, last.offset, last.nbytes + n)
                else:
                    if offset % 8:
                        raise NotDirect(f"{slot.name}: a part starts off an 8-byte boundary")
                    pieces.append(Piece(k, offset, n))
            if sum(p.nbytes for p in pieces) != slot.nbytes:
                raise NotDirect(f"{slot.name}: its parts hold {sum(p.nbytes for p in pieces)} "
                                f"bytes, the slot {slot.nbytes}")
            slots.append(pieces)
        out.append(slots)
    return storages, out


class Spans:
    """A bucket whose slots are pieces of other memory (``direct_pieces``), not one buffer:
    what a receiver copies each slot from. ``views``: every piece, in order; ``numel`` and
    ``data_ptr`` as for a packed bucket (its bytes, and a key for caches)."""

    def __init__(self, slots: list[list[torch.Tensor]]) -> None:
        self.slots = slots
        self.views = [v for pieces in slots for v in pieces]

    def numel(self) -> int:
        return sum(v.numel() for v in self.views)

    def data_ptr(self) -> tuple:
        return tuple(v.data_ptr() for v in self.views)


def span_views(spans: Sequence[Spans]) -> list[torch.Tensor]:
    """Every piece of every bucket, in order (what both ends digest)."""
    return [v for s in spans for v in s.views]


def piece_dtypes(plan: TransferPlan, pieces: list[list[list[Piece]]]) -> list[torch.dtype]:
    """Each piece's element dtype (its slot's), in ``span_views``' order."""
    return [torch_dtype(slot.dtype) for bucket, slots in zip(plan.buckets, pieces, strict=True)
            for slot, ps in zip(bucket.slots, slots, strict=True) for _ in ps]


def piece_views(storages: Sequence[torch.Tensor], pieces: list[list[list[Piece]]]
                ) -> list[Spans]:
    """Every bucket's ``Spans`` over ``storages`` (flat uint8 tensors)."""
    return [Spans([[storages[p.storage][p.offset:p.offset + p.nbytes] for p in slot]
                   for slot in bucket]) for bucket in pieces]


def span_targets(bucket: Bucket, spans: Spans, params: dict[str, torch.Tensor]
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(destinations, sources) that copy ``spans`` into the parameters named by ``bucket``'s
    slots (kernel layout: a slot is a parameter, byte for byte): each piece into its byte
    range of the parameter."""
    dsts, srcs = [], []
    for slot, pieces in zip(bucket.slots, spans.slots, strict=True):
        p = params.get(slot.name)
        if p is None or tuple(p.shape) != slot.shape or dtype_name(p.dtype) != slot.dtype \
                or not p.is_contiguous():
            raise ConfigError(f"kernel-layout slot {slot.name} {slot.shape} {slot.dtype} does "
                              "not match a dense parameter of the engine")
        flat = p.view(-1).view(torch.uint8)
        at = 0
        for v in pieces:
            dsts.append(flat[at:at + v.numel()])
            srcs.append(v)
            at += v.numel()
        if at != flat.numel():
            raise ConfigError(f"{slot.name}: {at} bytes sent for a parameter of {flat.numel()}")
    return dsts, srcs


def fold_spans(spans: Sequence[Spans], terms: Sequence[Sequence[int]]) -> list[int]:
    """Per-bucket checksums of direct buckets from the ``digest_terms`` rows of their pieces
    (``span_views`` order): every piece's checksum, folded in order into one per bucket, so a
    piece moved, missing or changed changes its bucket's."""
    views = span_views(spans)
    sums = fold_terms([v.numel() for v in views], terms)
    out, at = [], 0
    for s in spans:
        h = len(s.views)
        for c in sums[at:at + len(s.views)]:
            h = (h * 1_000_003 + c) % _MOD
        out.append(h)
        at += len(s.views)
    return out


def unpack_bucket(bucket: Bucket, buf: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, view)`` for each tensor in ``buf``. Views share ``buf``'s memory."""
    for slot in bucket.slots:
        raw = buf[slot.offset : slot.offset + slot.nbytes]
        yield slot.name, raw.view(torch_dtype(slot.dtype)).view(slot.shape)


def checksum(buf: torch.Tensor, *, kernel: bool = True) -> int:
    """Checksum of a flat uint8 buffer, computed where the buffer lives (see ``checksums``)."""
    return checksums([buf], kernel=kernel)[0]


def checksums(bufs: Sequence[torch.Tensor], *, kernel: bool = True) -> list[int]:
    """Checksums of flat uint8 buffers; CUDA ones share one device-to-host transfer.

    The digest reads the bytes as little-endian 64-bit words laid out in rows of
    ``_ROW_WORDS`` and combines, mod 2**64, the sum of all words, the row sums weighted by
    row number and the column sums weighted by column number, with the length. Any changed
    word changes the sum; two words swapped or offset against each other change a weighted
    term unless they share both row and column (the same word). It detects transport and
    staging faults (torn, stale, shifted or mixed-up bytes); it is not a cryptographic hash.

    Integer sums are exact and order-independent, so CPU and CUDA give the same value for the
    same bytes, and two whole-buffer reductions run at memory bandwidth on either (no
    per-byte loop, no temporary copy of the buffer).

    ``kernel``: on CUDA, the row and column sums in one pass of weightsync's own kernel
    (``digest_cuda``) where it runs; False: torch's two reductions. The values are the same
    (a test compares them).
    """
    for buf in bufs:
        if buf.dtype != torch.uint8 or buf.dim() != 1:
            raise ConfigError("checksum takes a flat uint8 buffer")
    by_device: dict[torch.device, list[int]] = {}
    for i, buf in enumerate(bufs):
        by_device.setdefault(buf.device, []).append(i)
    terms: list[list[int]] = [[] for _ in bufs]
    for idx in by_device.values():  # one host transfer per device
        rows = digest_terms([bufs[i] for i in idx], kernel=kernel).tolist()
        for i, row in zip(idx, rows, strict=True):
            terms[i] = row
    return fold_terms([b.numel() for b in bufs], terms)


def digest_terms(bufs: Sequence[torch.Tensor], *, kernel: bool = True) -> torch.Tensor:
    """The checksum's raw terms of buffers on one device, left there: an ``(n, 3)`` int64
    tensor (``_digest_terms`` per row). Nothing waits for the device; ``fold_terms`` of its
    rows gives ``checksums``. Lets a sender publish its checksums without a host sync."""
    if not bufs:
        return torch.zeros((0, 3), dtype=torch.int64)
    return torch.stack([_digest_terms(b, kernel) for b in bufs])


def fold_terms(lengths: Sequence[int], terms: Sequence[Sequence[int]]) -> list[int]:
    """Checksums from buffer lengths and their ``digest_terms`` rows (as Python ints)."""
    return [(n * 1_000_003 + (s % _U64) * 961 + (r % _U64) * 31 + (k % _U64)) % _MOD
            for n, (s, r, k) in zip(lengths, terms, strict=True)]


def _digest_terms(buf: torch.Tensor, kernel: bool = True) -> torch.Tensor:
    """``(sum, row-weighted sum, column-weighted sum)`` of ``buf``'s 64-bit words, as an int64
    tensor on ``buf``'s device. Only a partial last row (< ``_ROW_BYTES``) is copied, padded
    with zeros (which add nothing)."""
    if buf.data_ptr() % 8:  # 64-bit words need an aligned start (allocations always are)
        buf = buf.clone()
    n = buf.numel()
    full = n - n % _ROW_BYTES
    rows = [buf[:full].view(torch.int64).view(-1, _ROW_WORDS)] if full else []
    if full < n:
        tail = torch.zeros(_ROW_BYTES, dtype=torch.uint8, device=buf.device)
        tail[: n - full] = buf[full:]
        rows.append(tail.view(torch.int64).view(1, _ROW_WORDS))
    if not rows:
        return torch.zeros(3, dtype=torch.int64, device=buf.device)
    sums = [_row_col_sums(m, kernel) for m in rows]
    row_sums = torch.cat([r for r, _ in sums]) if len(sums) > 1 else sums[0][0]
    col_sums = sums[0][1] if len(sums) == 1 else sums[0][1] + sums[1][1]
    r_idx = torch.arange(1, row_sums.numel() + 1, dtype=torch.int64, device=buf.device)
    c_idx = torch.arange(1, _ROW_WORDS + 1, dtype=torch.int64, device=buf.device)
    return torch.stack([row_sums.sum(), (row_sums * r_idx).sum(), (col_sums * c_idx).sum()])


def _row_col_sums(rows: torch.Tensor, kernel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row's and every column's sum of an int64 matrix (wrapping mod 2**64); ``kernel``:
    in one pass on CUDA (``digest_cuda``), else torch's two reductions."""
    if kernel and rows.is_cuda and rows.shape[0] > 1:
        from weightsync.transport.digest_cuda import row_col_sums

        out = row_col_sums(rows)  # one pass instead of two; the same values
        if out is not None:
            return out
    return rows.sum(dim=1), rows.sum(dim=0)


def digest_tensors(tensors: Iterable[torch.Tensor], scratch_bytes: int = 64 << 20) -> list[int]:
    """Checksums of many tensors' bytes, in order, as a few large reductions.

    Small tensors are concatenated (one launch each group) into groups of up to
    ``scratch_bytes``; tensors that large are digested in place. The grouping depends only on
    the tensors' sizes, so equal tensor lists give equal digests on every engine.
    """
    groups: list[list[torch.Tensor]] = []
    size = 0
    for t in tensors:
        flat = t.detach().contiguous().view(-1).view(torch.uint8)
        if flat.numel() >= scratch_bytes:
            groups.append([flat])
            size = scratch_bytes  # close the open group too: the next one starts fresh
            continue
        if not groups or size + flat.numel() > scratch_bytes:
            groups.append([])
            size = 0
        groups[-1].append(flat)
        size += flat.numel()
    flats = [g[0] if len(g) == 1 else torch.cat(g) for g in groups]
    return checksums(flats)


def named_tensors(weights) -> Iterable[tuple[str, torch.Tensor]]:
    """Accept a ``torch.nn.Module``, a mapping of name -> tensor, or an iterable of pairs.

    For a module, ``named_parameters()`` plus persistent buffers are used; tied parameters
    appear once (PyTorch de-duplicates shared storage).
    """
    if isinstance(weights, torch.nn.Module):
        yield from weights.named_parameters()
        persistent = {n for n, _ in weights.named_buffers() if _is_persistent(weights, n)}
        for n, b in weights.named_buffers():
            if n in persistent:
                yield n, b
        return
    if hasattr(weights, "items"):
        yield from weights.items()
        return
    yield from weights


def _is_persistent(module: torch.nn.Module, name: str) -> bool:
    mod_name, _, buf_name = name.rpartition(".")
    mod = module.get_submodule(mod_name) if mod_name else module
    return buf_name not in mod._non_persistent_buffers_set


def packed_only(stream: Iterator[tuple[Bucket, Any]]) -> Iterator[tuple[Bucket, Any]]:
    """``stream`` as it is, refusing direct buckets (``Spans``): those are checked as they
    are copied, by a receiver that says so (``Incoming.checked_by_copy``)."""
    for bucket, buf in stream:
        if isinstance(buf, Spans):
            raise TransferError("a direct share (the sender's own storages) is checked as it "
                                "is copied, by a receiver that says so (checked_by_copy)")
        yield bucket, buf
