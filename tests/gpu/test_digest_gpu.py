"""The one-pass CUDA checksum (Triton) gives exactly the torch reductions' and the CPU's
values: a trainer and an engine always agree whatever path each one took."""

from __future__ import annotations

import pytest
import torch

from weightsync.transport import packing
from weightsync.transport.digest_cuda import row_col_sums

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("nbytes", [8, 4096, 4096 * 3 + 8, 4096 * 256, 4096 * 257 + 1000,
                                    (64 << 20) + 4096 * 7 + 24])
def test_cuda_checksum_equals_torch_and_cpu(nbytes):
    g = torch.Generator().manual_seed(nbytes)
    cpu = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)
    gpu = cpu.cuda()
    rows = gpu[: nbytes - nbytes % packing._ROW_BYTES].view(torch.int64).view(-1, packing._ROW_WORDS)
    if rows.shape[0] > 1:
        got = row_col_sums(rows)
        assert got is not None, "the Triton kernel did not run"
        assert torch.equal(got[0], rows.sum(dim=1)) and torch.equal(got[1], rows.sum(dim=0))
    fast = packing.checksum(gpu)
    assert fast == packing.checksum(gpu, kernel=False) == packing.checksum(cpu)
    gpu[nbytes // 2] ^= 1
    assert packing.checksum(gpu) != fast


def test_replayed_packing_and_checksum_equal_eager_and_follow_their_key():
    """A warm IPC sync replays packing + checksum terms as one CUDA graph: the replay writes
    what the eager launches write, sees new source values, and a new key captures again."""
    from weightsync.transport.graphs import Replay

    srcs = [torch.randn(n, device="cuda", dtype=torch.bfloat16) for n in (3000, 5 << 20, 17)]
    plan = packing.plan_buckets([packing.spec_of(f"t{i}", t) for i, t in enumerate(srcs)],
                                1 << 30, 1)
    tensors = {f"t{i}": t for i, t in enumerate(srcs)}
    bucket = plan.buckets[0]
    buf = packing.pack_bucket(bucket, tensors, "cuda")
    terms = torch.empty((1, 3), dtype=torch.int64, device="cuda")
    views: dict = {}

    def program():
        packing.pack_bucket(bucket, tensors, "cuda", out=buf, views=views)
        terms.copy_(packing.digest_terms([buf]))

    graph = Replay("test")
    for step in range(4):
        for t in srcs:
            t.normal_()  # new values in the same memory: a replay must see them
        graph.run(("k", step >= 2), program)  # steps 0, 2: eager + capture; 1, 3: replay
        torch.cuda.synchronize()
        want = torch.cat([t.reshape(-1).view(torch.uint8) for t in srcs])
        got = torch.cat([v.reshape(-1).view(torch.uint8) for _, v in packing.unpack_bucket(bucket, buf)])
        assert torch.equal(got, want)
        assert packing.fold_terms([buf.numel()], terms.tolist()) == [packing.checksum(buf)]
    assert graph._graph is not None, "nothing was captured"


def test_many_digests_compiled_and_replayed_equal_digest_terms():
    """The fingerprint's one launch (``ManyDigests``), compiled and as a replayed graph,
    equals ``digest_terms`` and the CPU's values, and a replay sees new values."""
    from tests.unit.test_many_digests import check
    from weightsync.transport.digest_cuda import ManyDigests
    from weightsync.transport.graphs import Replay

    check("cuda")
    bufs = [torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda")
            for n in (896 * 2, 4096 * 700 + 8, 151936 * 896 * 2, 5)]
    many = ManyDigests(bufs)
    graph = Replay("many")
    for step in range(3):
        bufs[1][step * 4096] ^= 1
        got = graph.run(("k", many), many.terms)  # step 0 eager + capture; then replays
        torch.cuda.synchronize()
        assert torch.equal(got, packing.digest_terms(bufs))
        assert torch.equal(got.cpu(), packing.digest_terms([b.cpu() for b in bufs]))
    assert not many.broken
