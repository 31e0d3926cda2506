import pytest
import torch

from weightsync.errors import ConfigError
from weightsync.transport.packing import (
    ALIGN,
    checksum,
    pack_bucket,
    plan_buckets,
    spec_of,
    unpack_bucket,
)
from weightsync.types import TensorSpec, TransferPlan


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


def _reference_checksum(data: bytes) -> int:
    """The checksum's definition, word by word in plain Python."""
    from weightsync.transport.packing import _MOD, _ROW_WORDS

    padded = data + bytes(-len(data) % 8)
    words = [int.from_bytes(padded[i:i + 8], "little", signed=True)
             for i in range(0, len(padded), 8)]
    s = sum(words)
    r = sum((i // _ROW_WORDS + 1) * w for i, w in enumerate(words))
    k = sum((i % _ROW_WORDS + 1) * w for i, w in enumerate(words))
    m = 1 << 64
    return (len(data) * 1_000_003 + (s % m) * 961 + (r % m) * 31 + (k % m)) % _MOD


def test_checksum_matches_its_definition_and_detects_flips_and_swaps():
    from weightsync.transport.packing import _ROW_BYTES

    buf = torch.randint(0, 255, (2 * _ROW_BYTES + 1000,), dtype=torch.uint8)
    c = checksum(buf)
    assert c == _reference_checksum(bytes(buf.numpy()))
    assert checksum(buf[8:1008]) == _reference_checksum(bytes(buf[8:1008].numpy()))
    assert checksum(buf[3:1003]) == checksum(buf[3:1003].clone())  # unaligned start
    flipped = buf.clone()
    flipped[777] ^= 4
    assert checksum(flipped) != c

    def swapped(i: int, j: int) -> torch.Tensor:  # swap 64-bit words i and j
        out = buf.clone()
        out[8 * i:8 * i + 8], out[8 * j:8 * j + 8] = buf[8 * j:8 * j + 8], buf[8 * i:8 * i + 8]
        return out

    rw = _ROW_BYTES // 8
    for i, j in [(0, 1), (0, rw), (3, rw + 7), (5, 2 * rw + 5)]:  # same row, same column, neither
        assert checksum(swapped(i, j)) != c
    assert checksum(torch.zeros(8, dtype=torch.uint8)) != checksum(torch.zeros(16, dtype=torch.uint8))


def test_device_terms_fold_to_the_same_checksums():
    """What an IPC sender publishes (raw terms, left on the device) folds to ``checksums``."""
    from weightsync.transport.packing import digest_terms, fold_terms

    bufs = [torch.randint(0, 255, (n,), dtype=torch.uint8) for n in (9000, 8, 123_457)]
    terms = digest_terms(bufs)
    assert terms.shape == (3, 3) and terms.dtype == torch.int64
    assert fold_terms([b.numel() for b in bufs], terms.tolist()) == [checksum(b) for b in bufs]
    assert fold_terms([], digest_terms([]).tolist()) == []


def test_digest_tensors_groups_by_size_only():
    from weightsync.transport.packing import digest_tensors

    ts = [torch.randn(10, 10), torch.randn(300, 300), torch.randn(7), torch.randn(200, 200)]
    a = digest_tensors(ts, scratch_bytes=200_000)
    assert a == digest_tensors([t.clone() for t in ts], scratch_bytes=200_000)
    assert len(a) == 3  # [10x10], [300x300] alone (>= scratch), [7 + 200x200]
    changed = [t.clone() for t in ts]
    changed[2][3] += 1
    assert digest_tensors(changed, scratch_bytes=200_000) != a


def test_pack_reuses_views_and_copies_large_and_small_tensors():
    big = torch.randn(1 << 21)  # 8 MiB: copied on its own
    parts = [torch.randn(3, 4), torch.randn(5, 4)]  # stacked into one slot
    ts = {"big": big, "stack": parts, "small": torch.randn(6)}
    specs = [TensorSpec(name="big", dtype="float32", shape=(1 << 21,)),
             TensorSpec(name="stack", dtype="float32", shape=(8, 4)),
             TensorSpec(name="small", dtype="float32", shape=(6,))]
    plan = plan_buckets(specs, bucket_bytes=1 << 30, version=1)
    views: dict = {}
    buf = pack_bucket(plan.buckets[0], ts, "cpu", views=views)
    got = dict(unpack_bucket(plan.buckets[0], buf))
    assert torch.equal(got["big"], big) and torch.equal(got["stack"], torch.cat(parts))
    cached = views["dsts"][3]
    ts2 = {"big": big * 2, "stack": [p * 3 for p in parts], "small": ts["small"] - 1}
    buf2 = pack_bucket(plan.buckets[0], ts2, "cpu", out=buf, views=views)
    assert buf2 is buf and views["dsts"][3] is cached  # same bucket, same buffer: views reused
    got = dict(unpack_bucket(plan.buckets[0], buf2))
    assert torch.equal(got["stack"], torch.cat(parts) * 3) and torch.equal(got["big"], big * 2)
    assert torch.equal(got["small"], ts["small"] - 1)


def test_pack_reuses_views_when_sources_are_cast():
    """fp32 master weights packed into a bf16 plan: the cached views must still be reused
    (the cache once compared destination and source dtypes, so casts never hit it)."""
    ts = {"w": torch.randn(16, 8), "b": torch.randn(8)}
    specs = [TensorSpec(name=n, dtype="bfloat16", shape=tuple(t.shape)) for n, t in ts.items()]
    plan = plan_buckets(specs, bucket_bytes=1 << 20, version=1)
    views: dict = {}
    buf = pack_bucket(plan.buckets[0], ts, "cpu", views=views)
    cached = views["dsts"][3]
    ts2 = {n: t * 2 for n, t in ts.items()}
    pack_bucket(plan.buckets[0], ts2, "cpu", out=buf, views=views)
    assert views["dsts"][3] is cached
    got = dict(unpack_bucket(plan.buckets[0], buf))
    assert torch.equal(got["w"], (ts["w"] * 2).to(torch.bfloat16))
    ts3 = {"w": torch.randn(16, 8, dtype=torch.float64), "b": ts["b"]}  # another source dtype
    pack_bucket(plan.buckets[0], ts3, "cpu", out=buf, views=views)
    assert views["dsts"][3] is not cached
    assert torch.equal(dict(unpack_bucket(plan.buckets[0], buf))["w"], ts3["w"].to(torch.bfloat16))


def test_exclusive_phases_add_up_and_leave_out_sums_and_sub_phases():
    from weightsync.types import exclusive_phases

    seconds = {"pause": 0.01, "transfer": 0.2, "transfer.checksum": 0.05, "reload": 0.1,
               "transfer+reload": 0.3, "resume": 0.02, "total": 0.33}
    assert exclusive_phases(seconds) == {"pause": 0.01, "transfer": 0.2, "reload": 0.1,
                                         "resume": 0.02}
    assert abs(sum(exclusive_phases(seconds).values()) - seconds["total"]) < 1e-9


def test_checksum_without_the_kernel_is_the_same_checksum():
    """``kernel=False`` (torch's reductions) is how the GPU test compares the CUDA kernel's
    result; on the CPU both paths are torch's."""
    buf = torch.randint(0, 256, (4096 * 3 + 8,), dtype=torch.uint8)
    assert checksum(buf, kernel=False) == checksum(buf)
