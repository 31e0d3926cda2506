"""The bucket checksum's two reductions in one pass over the bytes, on CUDA (Triton).

``packing.checksums`` needs, for a buffer read as rows of ``packing._ROW_WORDS`` 64-bit words,
every row's sum and every column's sum. Two torch reductions read the buffer twice; this
kernel reads it once: each program sums a band of rows, storing each row's sum and adding up
its band's column sums, which torch then adds across bands. Integer sums wrap mod 2**64 and
are order-independent, so the result is bit-identical to the torch reductions (and to the CPU
path): ``tests/gpu/test_digest_gpu.py`` checks that.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import torch

logger = logging.getLogger(__name__)

_BAND_ROWS = 256  # rows per program
# copying as it reads: shorter bands keep more programs in flight (benchmarks.digest on the
# H200, 2 GiB: 1.13 ms at 64 rows against 1.19 ms at 256, the copy floor 1.02 ms)
_COPY_BAND_ROWS = 64
_TILE_ROWS = 8  # rows per load
_WARPS = 4


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def row_col_sums(x_ptr, row_ptr, col_ptr, n_rows, BAND: tl.constexpr, TILE: tl.constexpr,
                     C: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, C)
        col_acc = tl.zeros([C], dtype=tl.int64)
        for r in range(0, BAND, TILE):
            rows = pid * BAND + r + tl.arange(0, TILE)
            mask = rows < n_rows
            tile = tl.load(x_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :],
                           mask=mask[:, None], other=0)
            tl.store(row_ptr + rows, tl.sum(tile, axis=1), mask=mask)
            col_acc += tl.sum(tile, axis=0)
        tl.store(col_ptr + pid.to(tl.int64) * C + cols, col_acc)

    return row_col_sums


def row_col_sums(rows: torch.Tensor, band: int | None = None, tile: int | None = None,
                 warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(row sums, column sums) of a contiguous int64 CUDA matrix, or None where Triton is
    missing or fails (the caller then uses torch's reductions: same values). ``band``,
    ``tile``, ``warps``: the launch shape (``benchmarks.digest`` sweeps them)."""
    try:
        kernel = _kernel()
        n_rows, c = rows.shape
        band = band or _BAND_ROWS
        bands = -(-n_rows // band)
        row_sums = torch.empty(n_rows, dtype=torch.int64, device=rows.device)
        col_parts = torch.empty((bands, c), dtype=torch.int64, device=rows.device)
        kernel[(bands,)](rows, row_sums, col_parts, n_rows, BAND=band, TILE=tile or _TILE_ROWS,
                         C=c, num_warps=warps or _WARPS)
        return row_sums, col_parts.sum(dim=0)
    except Exception as e:  # noqa: BLE001 - no Triton, or no compiler: torch does the same sums
        _warn_once(e)
        return None


@functools.cache
def _warn_once(e: Exception) -> None:
    logger.warning("one-pass CUDA checksum unavailable (%s: %s); using torch reductions",
                   type(e).__name__, e)


@functools.cache
def _many_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def band_terms(addr_ptr, words_ptr, item_buf_ptr, item_row_ptr, part_ptr, dst_ptr,
                   exp_ptr, low_ptr, high_ptr, BAND: tl.constexpr, TILE: tl.constexpr,
                   C: tl.constexpr, COPY: tl.constexpr, FINITE: tl.constexpr,
                   W: tl.constexpr):
        # one band of BAND rows of one buffer: its share of the buffer's three terms (COPY:
        # and the band written to the buffer's destination, from the same loads; FINITE: and
        # how many of its words hold an element whose exponent bits are all set, NaN or Inf)
        pid = tl.program_id(0)
        buf = tl.load(item_buf_ptr + pid)
        row0 = tl.load(item_row_ptr + pid)
        base = tl.load(addr_ptr + buf).to(tl.pointer_type(tl.int64))
        dst = tl.load(dst_ptr + buf).to(tl.pointer_type(tl.int64))
        n_words = tl.load(words_ptr + buf)
        cols = tl.arange(0, C).to(tl.int64)
        row_acc = tl.zeros([TILE], dtype=tl.int64)
        weighted = tl.zeros([TILE], dtype=tl.int64)
        col_acc = tl.zeros([C], dtype=tl.int64)
        bad_acc = tl.zeros([TILE], dtype=tl.int64)
        # per buffer: its elements' exponent mask in every lane of a word, and each lane's
        # lowest and highest bit (no mask: not a floating dtype; read but unused unless FINITE)
        emask = tl.load(exp_ptr + buf)
        low = tl.load(low_ptr + buf)
        high = tl.load(high_ptr + buf)
        for r in range(0, BAND, TILE):
            rows = row0 + r + tl.arange(0, TILE).to(tl.int64)
            idx = rows[:, None] * C + cols[None, :]
            tile = tl.load(base + idx, mask=idx < n_words, other=0)
            if COPY:
                tl.store(dst + idx, tile, mask=idx < n_words)
            sums = tl.sum(tile, axis=1)
            row_acc += sums
            weighted += sums * (rows + 1)
            col_acc += tl.sum(tile, axis=0)
            if FINITE:  # a lane of y is zero where all its exponent bits are set; y's lanes
                # never have their top bit set (the sign is not in the mask), so the
                # zero-lane test below borrows only out of a zero lane: exact
                y = (tile & emask) ^ emask
                hit = ((y - low) & ~y & high) != 0
                bad_acc += tl.sum(hit.to(tl.int64), axis=1)
        tl.store(part_ptr + pid * W, tl.sum(row_acc))
        tl.store(part_ptr + pid * W + 1, tl.sum(weighted))
        tl.store(part_ptr + pid * W + 2, tl.sum(col_acc * (cols + 1)))
        if FINITE:
            tl.store(part_ptr + pid * W + 3, tl.where(emask != 0, tl.sum(bad_acc), 0))

    return band_terms


class ManyDigests:
    """``packing.digest_terms`` of one fixed list of CUDA byte buffers, again and again, in one
    launch: each program sums one band of rows of one buffer into its share of that buffer's
    three terms (all three are sums over words, rows or columns: bands add up), and one
    ``index_add_`` folds the shares. A model's few hundred parameters are then one kernel
    instead of a dozen small ones each (0.5B-shaped on the H200: ~8 ms of launches, as a
    replayed graph too). The same values as ``digest_terms`` (integer sums wrap mod 2**64);
    buffers whose length is not whole 64-bit words, or that start unaligned, go through
    ``digest_terms`` itself. Build it outside a CUDA graph capture; ``terms()`` may be
    captured.

    ``copy_to``: a destination byte buffer per buffer, as long; ``terms()`` then also writes
    every buffer to its destination from the same loads — one read of the bytes for both —
    and its terms are those of the bytes written.

    ``dtypes``: each buffer's element dtype; ``terms()`` then has a fourth column, from the
    same loads: 0 where every element is finite, above 0 where one is NaN or Inf (integer
    dtypes: 0), -1 where the dtype's encoding is not one this checks (``finite_masks``)."""

    def __init__(self, bufs: list[torch.Tensor], band: int | None = None,
                 copy_to: list[torch.Tensor] | None = None, tile: int | None = None,
                 warps: int | None = None, kernel_off_gpu: bool = False,
                 dtypes: Sequence[torch.dtype] | None = None) -> None:
        from weightsync.transport.packing import _ROW_WORDS

        if copy_to is not None and [d.numel() for d in copy_to] != [b.numel() for b in bufs]:
            raise ValueError("every buffer needs a destination as long as itself")
        if dtypes is not None and len(dtypes) != len(bufs):
            raise ValueError("every buffer needs its element dtype")
        self.bufs = bufs
        self.copy_to = copy_to
        self.band = band or (_COPY_BAND_ROWS if copy_to is not None else _BAND_ROWS)
        self.tile, self.warps = tile or _TILE_ROWS, warps or _WARPS  # (benchmarks.digest)
        whole = [b.numel() and b.numel() % 8 == 0 and b.data_ptr() % 8 == 0 and
                 (copy_to is None or copy_to[i].data_ptr() % 8 == 0)
                 for i, b in enumerate(bufs)]
        self.fast = [i for i, w in enumerate(whole) if w]
        self.rest = [i for i, w in enumerate(whole) if not w]
        items_buf, items_row = [], []
        for j, i in enumerate(self.fast):
            rows = -(-bufs[i].numel() // (8 * _ROW_WORDS))
            for r in range(0, rows, self.band):
                items_buf.append(j)
                items_row.append(r)
        device = bufs[0].device if bufs else torch.device("cuda")
        as_tensor = lambda xs: torch.tensor(xs, dtype=torch.int64, device=device)  # noqa: E731
        self.addrs = as_tensor([bufs[i].data_ptr() for i in self.fast])
        self.dsts = as_tensor([copy_to[i].data_ptr() for i in self.fast]) if copy_to \
            else self.addrs  # (not written to: the kernel copies only when asked)
        self.words = as_tensor([bufs[i].numel() // 8 for i in self.fast])
        self.item_buf, self.item_row = as_tensor(items_buf), as_tensor(items_row)
        self.fast_index, self.rest_index = as_tensor(self.fast), as_tensor(self.rest)
        self.columns = _ROW_WORDS
        self.dtypes = list(dtypes) if dtypes is not None else None
        self.width = 3 if dtypes is None else 4  # (the terms, and the finite count)
        masks = [finite_masks(d) for d in dtypes] if dtypes is not None else []
        # (-1: not checked)
        self.unchecked = as_tensor([i for i, m in enumerate(masks) if m is None])
        self.masks = [as_tensor([(masks[i] or (0, 0, 0))[k] for i in self.fast])
                      for k in range(3)] if dtypes is not None else [self.addrs] * 3
        # Triton missing, or no GPU: torch's launches, same values (``kernel_off_gpu``: the
        # kernel anyway — Triton's interpreter on CPU, in tests)
        self.broken = device.type != "cuda" and not kernel_off_gpu

    def terms(self) -> torch.Tensor:
        """``(n, 3)`` int64 on the device: ``digest_terms(bufs)`` (with ``copy_to``: of the
        destinations, once every buffer was written to its own; with ``dtypes``: ``(n, 4)``,
        the fourth column whether each buffer holds a non-finite element)."""
        out = self._terms()
        if self.unchecked.numel():
            out[:, 3].index_fill_(0, self.unchecked, -1)
        return out

    def _terms(self) -> torch.Tensor:
        if self.broken:
            return self._eager(range(len(self.bufs)))
        device = self.addrs.device
        out = torch.zeros((len(self.bufs), self.width), dtype=torch.int64, device=device)
        try:
            kernel = _many_kernel()
        except Exception as e:  # noqa: BLE001 - no Triton: torch's reductions, same values
            _warn_once(e)
            self.broken = True
            return self._eager(range(len(self.bufs)))
        if self.fast:
            parts = torch.empty((self.item_buf.numel(), self.width), dtype=torch.int64,
                                device=device)
            kernel[(self.item_buf.numel(),)](
                self.addrs, self.words, self.item_buf, self.item_row, parts, self.dsts,
                *self.masks, BAND=self.band, TILE=self.tile, C=self.columns,
                COPY=self.copy_to is not None, FINITE=self.dtypes is not None,
                W=self.width, num_warps=self.warps)
            shares = torch.zeros((len(self.fast), self.width), dtype=torch.int64,
                                 device=device)
            shares.index_add_(0, self.item_buf, parts)
            out.index_copy_(0, self.fast_index, shares)
        if self.rest:
            out.index_copy_(0, self.rest_index, self._eager(self.rest))
        return out

    def _eager(self, which) -> torch.Tensor:
        """``terms`` of some buffers by torch's own launches (copied first, if asked)."""
        from weightsync.transport.packing import digest_terms

        which = list(which)
        if self.copy_to is not None:
            for i in which:
                self.copy_to[i].copy_(self.bufs[i])
        read = self.copy_to if self.copy_to is not None else self.bufs
        terms = digest_terms([read[i] for i in which])
        if self.dtypes is None:
            return terms
        bad = [torch.zeros((), dtype=torch.int64, device=terms.device)]
        for i in which:  # (integer dtypes: never non-finite)
            dt, b = self.dtypes[i], read[i]
            bad.append((~torch.isfinite(b.view(dt))).sum() if dt.is_floating_point and
                       b.numel() else bad[0])
        return torch.cat([terms, torch.stack(bad[1:]).view(-1, 1)], dim=1)


def finite_masks(dtype: torch.dtype) -> tuple[int, int, int] | None:
    """For a 64-bit word of ``dtype`` elements, as int64: the exponent mask in every lane
    (an element is NaN or Inf where all of its bits are set; float8_e4m3fn, which has no
    infinity: exponent and mantissa, its NaN), each lane's lowest bit, each lane's highest.
    (0, 0, 0) for integer dtypes (nothing to check); None for a floating encoding not
    listed here (fp8 "fnuz": NaN is the negative zero)."""
    if not dtype.is_floating_point:
        return (0, 0, 0)
    lane = _EXPONENT_MASKS.get(dtype)
    if lane is None:
        return None
    bits, mask = lane
    lanes = range(64 // bits)
    signed = lambda v: v - (1 << 64) if v >= 1 << 63 else v  # noqa: E731
    return (signed(sum(mask << (bits * k) for k in lanes)),
            signed(sum(1 << (bits * k) for k in lanes)),
            signed(sum(1 << (bits * k + bits - 1) for k in lanes)))


_EXPONENT_MASKS = {torch.bfloat16: (16, 0x7F80), torch.float16: (16, 0x7C00),
                   torch.float32: (32, 0x7F800000), torch.float64: (64, 0x7FF0000000000000),
                   torch.float8_e5m2: (8, 0x7C), torch.float8_e4m3fn: (8, 0x7F)}
