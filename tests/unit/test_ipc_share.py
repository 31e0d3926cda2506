"""The IPC share of a sync, keyed by GPU (pure: no CUDA needed to build or parse one)."""

from __future__ import annotations

import pydantic
import pytest

from weightsync.errors import TransferError
from weightsync.transport.ipc import IpcBucketHandle, IpcDeviceShare, IpcShare


def _handle(index: int, uuid: str) -> IpcBucketHandle:
    return IpcBucketHandle(index=index, nbytes=64, device_uuid=uuid, tensor_offset=0,
                           storage_cls="UntypedStorage", handle=b"h", storage_size=64,
                           storage_offset=0, ref_counter_handle=b"r", ref_counter_offset=0,
                           event_handle=b"e", event_sync_required=True)


def _on(uuid: str) -> IpcDeviceShare:
    return IpcDeviceShare(device_uuid=uuid, buckets=(_handle(0, uuid),),
                          terms=_handle(-1, uuid), event=b"ev-" + uuid.encode())


def test_each_worker_finds_its_own_gpus_copy_through_json():
    share = IpcShare(devices=(_on("GPU-a"), _on("GPU-b")))
    back = IpcShare.model_validate_json(share.model_dump_json())
    assert back.on("GPU-b").buckets[0].device_uuid == "GPU-b"
    assert back.on("GPU-a").event == b"ev-GPU-a"


def test_a_worker_on_a_gpu_without_a_copy_gets_a_typed_error():
    with pytest.raises(TransferError, match="no IPC buckets on this worker's GPU GPU-c"):
        IpcShare(devices=(_on("GPU-a"),)).on("GPU-c")


def test_a_share_has_one_copy_per_gpu_and_at_least_one():
    with pytest.raises(pydantic.ValidationError):
        IpcShare(devices=(_on("GPU-a"), _on("GPU-a")))
    with pytest.raises(pydantic.ValidationError):
        IpcShare(devices=())


def test_a_direct_share_carries_storages_and_pieces_through_json_and_never_both_kinds():
    direct = IpcDeviceShare(device_uuid="GPU-a", storages=(_handle(0, "GPU-a"),),
                            pieces=((((0, 0, 32), (0, 32, 32)),),),
                            terms=_handle(-1, "GPU-a"),
                            event=b"ev")
    back = IpcShare.model_validate_json(IpcShare(devices=(direct,)).model_dump_json())
    assert back.on("GPU-a").pieces == ((((0, 0, 32), (0, 32, 32)),),)
    assert back.on("GPU-a").buckets == ()
    for kw in [{}, {"buckets": (_handle(0, "GPU-a"),), "storages": (_handle(0, "GPU-a"),),
                    "pieces": (((0, 0, 64),),)},
               {"storages": (_handle(0, "GPU-a"),)}]:  # storages without pieces
        with pytest.raises(pydantic.ValidationError):
            IpcDeviceShare(device_uuid="GPU-a", terms=_handle(-1, "GPU-a"), event=b"ev", **kw)
