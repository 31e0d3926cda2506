"""Pure bucket planning, packing, unpacking and checksums. No I/O, no process groups.

Tensors are packed back to back into flat ``uint8`` buffers at ``ALIGN``-byte offsets, so
every tensor in a received bucket is a zero-copy view of it. Padding is zero on the sender, so
sender and receiver checksum identical bytes.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator, Sequence

import torch

from weightsync.errors import ConfigError
from weightsync.types import Bucket, ParamSlot, TensorSpec, TransferPlan

ALIGN = 256  # bytes; a multiple of every dtype's size and of the CUDA allocator's granularity
_MOD = (1 << 61) - 1  # Mersenne prime folding (length, sums) into one int
_ROW_WORDS = 1 << 15  # 32-bit words per checksum row
_DEVICE_BLOCK_ROWS = 1024  # rows reduced per step (128 MiB of input)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ConfigError(f"unknown dtype {name!r}")
    return dt


def spec_of(name: str, tensor: torch.Tensor) -> TensorSpec:
    return TensorSpec(name=name, dtype=dtype_name(tensor.dtype), shape=tuple(tensor.shape))


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
                device: torch.device | str, out: torch.Tensor | None = None) -> torch.Tensor:
    """Copy the bucket's tensors into one new flat uint8 buffer on ``device``.

    A value may be a sequence of tensors: they are stacked along dim 0 straight into the slot
    (kernel layout: ``q``/``k``/``v`` into ``qkv``) with no intermediate concatenation.
    Sources in another dtype are cast by the copy (e.g. fp32 master weights to bf16).
    """
    if out is not None and out.numel() == bucket.nbytes:
        buf = out  # padding bytes are zero from the first packing and never written since
    else:
        buf = torch.zeros(bucket.nbytes, dtype=torch.uint8, device=device)
    dsts: list[torch.Tensor] = []
    srcs: list[torch.Tensor] = []
    for slot in bucket.slots:
        value = tensors[slot.name]
        parts = [value] if isinstance(value, torch.Tensor) else list(value)
        view = buf[slot.offset : slot.offset + slot.nbytes].view(torch_dtype(slot.dtype)).view(slot.shape)
        if len(parts) == 1:
            if tuple(parts[0].shape) != slot.shape:
                raise ConfigError(f"tensor {slot.name} has shape {tuple(parts[0].shape)}, "
                                  f"plan says {slot.shape}")
            dsts.append(view)
            srcs.append(parts[0].detach())
            continue
        rows = sum(p.shape[0] if p.dim() else 1 for p in parts)
        if rows != slot.shape[0]:
            raise ConfigError(f"parts of {slot.name} have {rows} rows, plan says {slot.shape}")
        r = 0
        for p in parts:
            dsts.append(view[r : r + p.shape[0]])
            srcs.append(p.detach())
            r += p.shape[0]
    _copy_all(dsts, srcs)
    return buf


def _copy_all(dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
    """Batched copies: one multi-tensor launch per group of same dtype and device (hundreds
    of parameters would otherwise be hundreds of kernel launches); casts go one by one."""
    same = [(d, s) for d, s in zip(dsts, srcs, strict=True)
            if d.dtype == s.dtype and d.device == s.device]
    if same:
        torch._foreach_copy_([d for d, _ in same], [s for _, s in same], non_blocking=True)
    for d, s in zip(dsts, srcs, strict=True):
        if d.dtype != s.dtype or d.device != s.device:
            d.copy_(s, non_blocking=True)


def unpack_bucket(bucket: Bucket, buf: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, view)`` for each tensor in ``buf``. Views share ``buf``'s memory."""
    for slot in bucket.slots:
        raw = buf[slot.offset : slot.offset + slot.nbytes]
        yield slot.name, raw.view(torch_dtype(slot.dtype)).view(slot.shape)


def checksum(buf: torch.Tensor) -> int:
    """Checksum of a flat uint8 buffer, computed where the buffer lives.

    CPU: CRC-32 (zlib, GIL released, ~1.5 GB/s per core) with the length.
    CUDA: a position-weighted integer reduction on the device — integer sums are exact and
    order-independent, so it is deterministic — plus one small host transfer.
    Both ends of a transfer hold buckets on the same kind of device (gloo: CPU; NCCL and
    CUDA IPC: GPU), so they always run the same function.
    """
    return checksums([buf])[0]


def checksums(bufs: Sequence[torch.Tensor]) -> list[int]:
    """``checksum`` of many buffers; CUDA buffers share one device-to-host transfer."""
    out: list[int | None] = [None] * len(bufs)
    partial: list[tuple[int, int, torch.Tensor]] = []
    for i, buf in enumerate(bufs):
        if buf.dtype != torch.uint8 or buf.dim() != 1:
            raise ConfigError("checksum takes a flat uint8 buffer")
        n = buf.numel()
        if n == 0:
            out[i] = 0
        elif buf.device.type == "cpu":
            out[i] = (n << 32) | zlib.crc32(memoryview(buf.contiguous().numpy()))
        else:
            partial.append((i, n, _device_digest(buf)))
    if partial:  # one device-to-host transfer for every CUDA buffer
        host = torch.stack([d for _, _, d in partial]).tolist()
        for (i, n, _), (a, b) in zip(partial, host, strict=True):
            out[i] = (n * 1_000_003 + (a % (1 << 64)) * 31 + (b % (1 << 64))) % _MOD
    return out  # type: ignore[return-value]


def _device_digest(buf: torch.Tensor) -> torch.Tensor:
    """Two int64 on the device: the sum of the buffer's 32-bit words, and their sum weighted
    by position — word w in row r (of ``_ROW_WORDS``) counts ``w * (col + 1)`` (an int32
    product, wrapping mod 2**32) times ``r + 1``. Sums accumulate in int64 (wrapping mod
    2**64). Modular arithmetic is associative and commutative, so the result does not depend
    on reduction order: deterministic. No int64 copy of the buffer is made, and no per-row
    data leaves the device."""
    pad = (-buf.numel()) % (4 * _ROW_WORDS)
    if pad:
        buf = torch.cat([buf, torch.zeros(pad, dtype=torch.uint8, device=buf.device)])
    rows = buf.view(torch.int32).view(-1, _ROW_WORDS)
    weights = torch.arange(1, _ROW_WORDS + 1, dtype=torch.int32, device=buf.device)
    plain = torch.zeros((), dtype=torch.int64, device=buf.device)
    weighted = torch.zeros((), dtype=torch.int64, device=buf.device)
    for start in range(0, rows.shape[0], _DEVICE_BLOCK_ROWS):
        block = rows[start : start + _DEVICE_BLOCK_ROWS]
        idx = torch.arange(start + 1, start + 1 + block.shape[0], dtype=torch.int64,
                           device=buf.device)
        plain += block.sum(dtype=torch.int64)
        weighted += ((block * weights).sum(dim=1, dtype=torch.int64) * idx).sum()
    return torch.stack([plain, weighted])


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
