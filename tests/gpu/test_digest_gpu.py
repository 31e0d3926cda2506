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
def test_cuda_checksum_equals_torch_and_cpu(nbytes, monkeypatch):
    g = torch.Generator().manual_seed(nbytes)
    cpu = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)
    gpu = cpu.cuda()
    rows = gpu[: nbytes - nbytes % packing._ROW_BYTES].view(torch.int64).view(-1, packing._ROW_WORDS)
    if rows.shape[0] > 1:
        got = row_col_sums(rows)
        assert got is not None, "the Triton kernel did not run"
        assert torch.equal(got[0], rows.sum(dim=1)) and torch.equal(got[1], rows.sum(dim=0))
    fast = packing.checksum(gpu)
    monkeypatch.setattr(packing, "_TORCH_SUMS_ONLY", True)
    assert fast == packing.checksum(gpu) == packing.checksum(cpu)
    monkeypatch.setattr(packing, "_TORCH_SUMS_ONLY", False)
    gpu[nbytes // 2] ^= 1
    assert packing.checksum(gpu) != fast
