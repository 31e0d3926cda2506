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


def test_one_launch_equals_digest_terms_and_sees_a_flipped_byte():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c",
                          "from tests.unit.test_many_digests import check; check()"],
                         env=env, cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
