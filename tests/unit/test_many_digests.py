"""``ManyDigests`` (one Triton launch for a model's parameters) gives exactly
``digest_terms``'s values, bytes unaligned or not whole words included. Here the kernel runs in
Triton's interpreter on CPU (a process of its own: the interpreter is chosen at import);
tests/gpu/test_digest_gpu.py runs it compiled, as a replayed graph too."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")


def check(device: str = "cpu") -> None:
    from weightsync.transport import digest_cuda, packing

    g = torch.Generator().manual_seed(0)
    sizes = [8, 4096, 4096 * 3 + 8, 1792, 4096 * 40 + 16, 7, 0, 4096 * 33 + 1000, 24]
    bufs = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).to(device)
            for n in sizes]
    many = digest_cuda.ManyDigests(bufs, band=16, kernel_off_gpu=True)  # bands of 16 rows
    assert many.rest == [5, 6]  # 7 bytes (no whole 64-bit word), and the empty one
    assert torch.equal(many.terms(), packing.digest_terms(bufs))
    assert not many.broken  # the kernel ran
    before = many.terms().clone()
    bufs[4][4096 * 20 + 100] ^= 1  # a byte in a later band of a multi-band buffer
    after = many.terms()
    assert torch.equal(after, packing.digest_terms(bufs))
    assert [i for i in range(len(bufs)) if not torch.equal(after[i], before[i])] == [4]
    # copying as it reads: every destination gets its buffer's bytes, and the terms are the
    # same (those of the bytes written); one destination starts unaligned (copied apart)
    room = torch.zeros(sum(sizes) + 8 * len(sizes) + 1, dtype=torch.uint8, device=device)
    dsts, at = [], 0
    for i, n in enumerate(sizes):
        at += 1 if i == 2 else 0
        dsts.append(room[at:at + n])
        at += n + (-(at + n)) % 8
    copying = digest_cuda.ManyDigests(bufs, band=16, copy_to=dsts, kernel_off_gpu=True)
    assert copying.rest == [2, 5, 6]
    assert torch.equal(copying.terms(), packing.digest_terms(bufs))
    assert all(torch.equal(d, b) for d, b in zip(dsts, bufs, strict=True))
    assert not copying.broken
    check_finite(device)


def check_finite(device: str) -> None:
    """With dtypes, the same launch says which buffers hold a NaN or an Inf: every floating
    encoding it knows, in every lane of a word, in any band; integers never; -1 for an
    encoding it does not check."""
    from weightsync.transport import digest_cuda, packing

    g = torch.Generator().manual_seed(1)
    dtypes = [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.float8_e5m2,
              torch.float8_e4m3fn, torch.int32, torch.float8_e4m3fnuz, torch.bfloat16]
    counts = [4096 * 20 + 4, 1000, 4096 * 3, 512, 4096, 4096, 2048, 64, 3]  # (3: not words)
    values = [(torch.randn(n, generator=g) * 100).to(dt) if dt.is_floating_point
              else torch.randint(-2**31, 2**31 - 1, (n,), dtype=dt, generator=g)
              for n, dt in zip(counts, dtypes, strict=True)]
    values[6][::7] = -1  # (all bits set: an integer, never "non-finite")
    views = lambda: [v.to(device).view(torch.uint8) for v in values]  # noqa: E731
    clean = digest_cuda.ManyDigests(views(), band=16, dtypes=dtypes, kernel_off_gpu=True)
    got = clean.terms()
    assert got.shape == (len(values), 4) and not clean.broken
    assert torch.equal(got[:, :3], packing.digest_terms(views()))
    assert got[:, 3].tolist() == [0, 0, 0, 0, 0, 0, 0, -1, 0]
    poison = {0: (4096 * 17 + 3, float("nan")), 1: (999, float("inf")),
              2: (1, float("-inf")), 3: (511, float("nan")), 4: (2, float("inf")),
              5: (4095, float("nan")), 8: (2, float("nan"))}  # (lanes 3, 3, 1, 0, 2, 7)
    for i, (at, value) in poison.items():
        values[i][at] = value
    bufs = views()
    for copy, kernel in ((False, True), (True, True), (False, device == "cpu")):
        dsts = [torch.empty_like(b) for b in bufs] if copy else None
        many = digest_cuda.ManyDigests(bufs, band=16, dtypes=dtypes, copy_to=dsts,
                                       kernel_off_gpu=kernel)  # (off: torch's launches)
        flags = many.terms()[:, 3].tolist()
        assert many.broken == (device == "cpu" and not kernel)
        assert [i for i, f in enumerate(flags) if f > 0] == sorted(poison), flags
        assert flags[6] == 0 and flags[7] == -1
    # the largest finite values and the smallest subnormals are finite
    edge = [torch.tensor([torch.finfo(dt).max, -torch.finfo(dt).max, torch.finfo(dt).tiny,
                          -torch.finfo(dt).smallest_normal / 2] * 4,
                         dtype=torch.float64).to(dt)
            for dt in dtypes[:6]]
    many = digest_cuda.ManyDigests([t.to(device).view(torch.uint8) for t in edge], band=16,
                                   dtypes=dtypes[:6], kernel_off_gpu=True)
    assert many.terms()[:, 3].tolist() == [0] * 6


def test_one_launch_equals_digest_terms_and_sees_a_flipped_byte():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c",
                          "from tests.unit.test_many_digests import check; check()"],
                         env=env, cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
