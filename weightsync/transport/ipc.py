"""CUDA IPC for a trainer and an engine sharing one GPU (colocated mode).

The trainer packs buckets on its GPU and shares each as a typed ``IpcBucketHandle`` — plain
fields, no pickle — that travels through Ray to the colocated engine actor and on to its
worker, which maps the same memory without a copy. A handle cannot be opened in the process
that made it, so trainer and vLLM worker must be different processes.

The trainer never waits for its own packing: it records an interprocess CUDA event after the
packing and its checksums (kept on the device, in a shared buffer), and sends at once. The
worker's stream waits on that event on the GPU, so the device work overlaps the calls that
carry the handles, and the worker still reads only finished bytes and finished checksums.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from weightsync.errors import TransferError


class IpcBucketHandle(BaseModel):
    """Everything ``rebuild_cuda_tensor`` needs for a flat uint8 buffer, as plain values."""

    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_bytes="base64",
                              val_json_bytes="base64")

    index: int
    nbytes: int
    device_uuid: str
    tensor_offset: int
    storage_cls: str  # "TypedStorage" | "UntypedStorage", as reduce_tensor reported it
    handle: bytes
    storage_size: int
    storage_offset: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool
    reusable: bool = False  # the trainer keeps this allocation for later syncs


def device_uuid(device: torch.device | int) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


def share_bucket(index: int, buf: torch.Tensor, reusable: bool = False) -> IpcBucketHandle:
    """Describe ``buf`` (a flat uint8 CUDA tensor) for another process on the same GPU."""
    from torch.multiprocessing.reductions import reduce_tensor

    if buf.device.type != "cuda" or buf.dtype != torch.uint8 or buf.dim() != 1:
        raise TransferError("IPC shares flat uint8 CUDA buffers only")
    _, args = reduce_tensor(buf)
    # args: (cls, size, stride, offset, storage_cls, dtype, device, handle, storage_size,
    #        storage_offset, requires_grad, ref_counter_handle, ref_counter_offset,
    #        event_handle, event_sync_required)
    return IpcBucketHandle(
        index=index, nbytes=buf.numel(), device_uuid=device_uuid(buf.device),
        tensor_offset=args[3], storage_cls=args[4].__name__, handle=args[7],
        storage_size=args[8], storage_offset=args[9],
        ref_counter_handle=args[11], ref_counter_offset=args[12],
        event_handle=args[13], event_sync_required=args[14], reusable=reusable,
    )


class IpcDeviceShare(BaseModel):
    """One GPU's copy of a sync's buckets: the buckets, the sender's checksum terms (an
    ``(n, 3)`` int64 buffer, ``packing.digest_terms`` of the buckets) and the event that
    follows both, all on the GPU ``device_uuid``.

    Direct (no packed copy): ``storages`` are the trainer's own tensors' storages and
    ``pieces`` every bucket's slots as ``(storage, offset, nbytes)`` runs of them
    (``packing.direct_pieces``); ``buckets`` is empty and the terms are one row per piece."""

    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_bytes="base64",
                              val_json_bytes="base64")

    device_uuid: str
    buckets: tuple[IpcBucketHandle, ...] = ()
    storages: tuple[IpcBucketHandle, ...] = ()
    pieces: tuple[tuple[tuple[tuple[int, int, int], ...], ...], ...] = ()
    terms: IpcBucketHandle
    event: bytes  # cudaIpcEventHandle of an interprocess event, recorded after terms

    @model_validator(mode="after")
    def _buckets_or_storages(self) -> IpcDeviceShare:
        if bool(self.buckets) == bool(self.storages) or bool(self.storages) != bool(self.pieces):
            raise ValueError("a share holds packed buckets, or storages with their pieces")
        return self


class IpcShare(BaseModel):
    """One sync's colocated transfer: a copy of the buckets on every GPU an engine worker
    uses, keyed by the GPU's UUID. Each worker of a tensor-parallel engine opens only the copy
    on its own GPU (``on``): mapping another GPU's memory would read across the interconnect
    for every byte, and a worker may not see that GPU at all."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    devices: tuple[IpcDeviceShare, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_per_device(self) -> IpcShare:
        uuids = [d.device_uuid for d in self.devices]
        if len(set(uuids)) != len(uuids):
            raise ValueError(f"one share per GPU, not {uuids}")
        return self

    def on(self, uuid: str) -> IpcDeviceShare:
        """The copy on GPU ``uuid``; ``TransferError`` when the trainer shared none there."""
        for d in self.devices:
            if d.device_uuid == uuid:
                return d
        raise TransferError(f"no IPC buckets on this worker's GPU {uuid} (the trainer shared "
                            f"{[d.device_uuid for d in self.devices]}): CUDA IPC needs a copy "
                            "on every GPU an engine worker uses")


def interprocess_event() -> torch.cuda.Event:
    return torch.cuda.Event(enable_timing=False, blocking=False, interprocess=True)


def open_event(handle: bytes, device: int) -> torch.cuda.Event:
    """The sender's event in this process (open once, wait on it every sync: CUDA lets the
    exporter record an IPC event again and again)."""
    return torch.cuda.Event.from_ipc_handle(device, handle)


_STORAGE = {"TypedStorage": torch.storage.TypedStorage, "UntypedStorage": torch.UntypedStorage}


def open_bucket(h: IpcBucketHandle) -> torch.Tensor:
    """Map a shared buffer in this process, on the local device with the same UUID."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    local = {device_uuid(i): i for i in range(torch.cuda.device_count())}
    if h.device_uuid not in local:
        raise TransferError(f"IPC bucket {h.index} lives on GPU {h.device_uuid}, "
                            "which this process cannot see (not colocated)")
    return rebuild_cuda_tensor(
        torch.Tensor, torch.Size((h.nbytes,)), (1,), h.tensor_offset, _STORAGE[h.storage_cls],
        torch.uint8, local[h.device_uuid], h.handle, h.storage_size, h.storage_offset,
        False, h.ref_counter_handle, h.ref_counter_offset, h.event_handle,
        h.event_sync_required,
    )


def cuda_uuid(device: object) -> str | None:
    """``device_uuid`` of a CUDA device; None for any other."""
    return device_uuid(device) if getattr(device, "type", None) == "cuda" else None
