import pytest
import torch

from weightsync.errors import ConfigError
from weightsync.transport.packing import (ALIGN, checksum, pack_bucket, plan_buckets, spec_of,
                                          unpack_bucket)
from weightsync.types import TransferPlan


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(64, 32, generator=g),
        "a.bias": torch.randn(7, generator=g),
        "b.weight": torch.randn(300, 300, generator=g).to(torch.bfloat16),
        "c.ids": torch.arange(5, dtype=torch.int64),
        "empty": torch.empty(0, 3),
    }


def test_roundtrip_every_dtype_and_layout():
    ts = _tensors()
    plan = plan_buckets([spec_of(n, t) for n, t in ts.items()], bucket_bytes=16 << 10, version=1)
    seen = {}
    for b in plan.buckets:
        buf = pack_bucket(b, ts, "cpu")
        assert buf.numel() == b.nbytes and b.nbytes % ALIGN == 0
        for name, view in unpack_bucket(b, buf):
            seen[name] = view
    assert seen.keys() == ts.keys()
    for n, t in ts.items():
        assert seen[n].dtype == t.dtype and torch.equal(seen[n], t)


def test_large_tensor_gets_own_bucket_and_order_is_kept():
    ts = _tensors()
    plan = plan_buckets([spec_of(n, t) for n, t in ts.items()], bucket_bytes=1024, version=3)
    names = [s.name for b in plan.buckets for s in b.slots]
    assert names == list(ts)
    big = [b for b in plan.buckets if any(s.name == "b.weight" for s in b.slots)][0]
    assert len(big.slots) == 1 and big.nbytes >= 300 * 300 * 2
    assert plan.total_bytes == sum(b.nbytes for b in plan.buckets)


def test_checksum_detects_flip_and_swap_and_is_stable():
    buf = torch.randint(0, 255, (1 << 20,), dtype=torch.uint8)
    c = checksum(buf)
    assert c == checksum(buf.clone())
    flipped = buf.clone()
    flipped[12345] ^= 1
    assert checksum(flipped) != c
    swapped = buf.clone()
    swapped[:4], swapped[4:8] = buf[4:8].clone(), buf[:4].clone()
    if not torch.equal(swapped, buf):
        assert checksum(swapped) != c
    assert checksum(torch.empty(0, dtype=torch.uint8)) == 0
    with pytest.raises(ConfigError):
        checksum(torch.zeros(4, dtype=torch.float32))


def test_pack_rejects_tensor_that_differs_from_plan():
    ts = _tensors()
    plan = plan_buckets([spec_of(n, t) for n, t in ts.items()], bucket_bytes=1 << 20, version=1)
    ts["a.bias"] = torch.randn(8)
    with pytest.raises(ConfigError, match="a.bias"):
        pack_bucket(plan.buckets[0], ts, "cpu")


def test_plan_validation_rejects_duplicates_and_bad_dtypes():
    ts = _tensors()
    plan = plan_buckets([spec_of(n, t) for n, t in ts.items()], bucket_bytes=1 << 20, version=1)
    data = plan.model_dump()
    b0 = data["buckets"][0]
    b0["slots"] = list(b0["slots"]) + [dict(b0["slots"][0])]
    with pytest.raises(ValueError):
        TransferPlan.model_validate(data)
    with pytest.raises(ValueError, match="unsupported dtype"):
        spec = plan.buckets[0].slots[0].model_dump()
        spec["dtype"] = "complex64"
        type(plan.buckets[0].slots[0]).model_validate(spec)
    # JSON round trip is exact: the plan is the wire format
    assert TransferPlan.model_validate_json(plan.model_dump_json()) == plan


def test_device_digest_arithmetic_detects_flips_and_swaps():
    """The CUDA checksum's reduction, run on CPU tensors (same int64 wraparound rules)."""
    from weightsync.transport.packing import _device_digest

    buf = torch.randint(0, 255, (3_000_003,), dtype=torch.uint8)
    d = _device_digest(buf).tolist()
    flipped = buf.clone()
    flipped[777] ^= 4
    swapped = buf.clone()
    swapped[:4], swapped[4:8] = buf[4:8].clone(), buf[:4].clone()
    assert _device_digest(flipped).tolist() != d
    if not torch.equal(swapped, buf):
        assert _device_digest(swapped).tolist() != d
    assert _device_digest(buf.clone()).tolist() == d
