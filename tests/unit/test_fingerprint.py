"""The fingerprint reads a dense permuted parameter (vLLM's online FP8 keeps each linear
weight as ``qweight.t()``) where it lives, in memory order, instead of copying it."""

from __future__ import annotations

import torch

from weightsync.engine.fingerprint import Fingerprinter, in_memory_order


def _fingerprinter() -> Fingerprinter:
    return Fingerprinter(lambda key, run: run())


def test_a_transposed_parameter_is_read_in_place_and_its_changes_show():
    base = torch.arange(12, dtype=torch.float32).view(3, 4)
    params = {"w": base.t(), "b": torch.ones(4)}
    fp = _fingerprinter()
    first = fp.digest(params)
    kept = fp._kept
    assert kept is not None
    flats = dict(zip(sorted(params), kept[2], strict=True))
    assert flats["w"].data_ptr() == base.data_ptr()  # a view of the parameter, not a copy
    assert fp.digest(params) == first
    base[2, 1] += 1  # an in-place change (a sync's copy) shows in the next fingerprint
    assert fp.digest(params) != first


def test_memory_order_keeps_contiguous_and_refuses_nothing_else():
    t = torch.zeros(2, 3)
    assert in_memory_order(t) is t
    assert in_memory_order(t.t()).is_contiguous()
    sliced = torch.zeros(2, 3, 4)[:, :, :2]  # not dense: still read through a copy
    assert not in_memory_order(sliced).is_contiguous()
    fp = _fingerprinter()
    assert fp.digest({"s": sliced}) == fp.digest({"s": sliced.contiguous()})
