"""``engine.finite``: which floating tensors hold a NaN or an infinity, named, across dtypes,
batches and the CPU's own reduction (``aminmax`` per tensor; the GPU's ``_foreach_norm`` is
in ``tests/gpu``'s NaN cases)."""

from __future__ import annotations

import pytest
import torch

from weightsync.engine.finite import nonfinite, require_finite
from weightsync.errors import VerificationError


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"{dt}.{i}": torch.randn(7, 5, generator=g).to(dt)
            for dt in (torch.bfloat16, torch.float16, torch.float32, torch.float64)
            for i in range(3)}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("batch_bytes", [1, 256 << 20])  # a batch per tensor, or one in all
def test_every_tensor_at_fault_is_named_and_no_other(bad, batch_bytes):
    ts = _tensors()
    assert nonfinite(ts.items(), batch_bytes) == []
    for name in ("torch.bfloat16.1", "torch.float16.0", "torch.float32.2", "torch.float64.1"):
        ts[name][3, 4] = bad
    ts["ints"] = torch.arange(6)  # not floating: never read
    ts["empty"] = torch.empty(0)
    ts["strided"] = torch.randn(6, 6)[:, ::2]
    assert sorted(nonfinite(ts.items(), batch_bytes)) == [
        "torch.bfloat16.1", "torch.float16.0", "torch.float32.2", "torch.float64.1"]


def test_require_finite_refuses_with_the_names_and_accepts_finite_extremes():
    ts = _tensors()
    ts["big"] = torch.tensor([torch.finfo(torch.bfloat16).max, -torch.finfo(torch.bfloat16).max],
                             dtype=torch.bfloat16)
    require_finite(ts.items(), "the update")  # the largest finite values pass
    ts["torch.float32.0"][0, 0] = float("nan")
    with pytest.raises(VerificationError, match=r"in the update: torch\.float32\.0;"):
        require_finite(ts.items(), "the update")
