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

import torch

logger = logging.getLogger(__name__)

_BAND_ROWS = 256  # rows per program
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
