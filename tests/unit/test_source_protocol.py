"""Weight sources on the real coordinator over the in-process fleet (real hosts and workers,
loopback leg): a stream syncs without being collected and in its own order; a stream that
breaks mid-sync fails the sync like any transfer failure, and nothing is applied anywhere."""

from __future__ import annotations

import pytest
import torch

from weightsync.config import TransferConfig
from weightsync.coordinator import SyncCoordinator
from weightsync.errors import SyncFailedError
from weightsync.sources import IteratorSource
from weightsync.testing.fleet import Faults, LocalEngines, TinyModel, save_tiny_model
from weightsync.transport.packing import spec_of


@pytest.fixture()
def engines(tmp_path):
    fleet = LocalEngines(save_tiny_model(tmp_path / "tiny"), {"a": Faults(), "b": Faults()})
    yield fleet
    fleet.close()


def _stream(model: torch.nn.Module, fail_at: str | None = None):
    tensors = dict(model.named_parameters())
    pulled: list[str] = []

    def make():
        for n, t in tensors.items():
            if n == fail_at:
                raise OSError(f"the trainer lost {n}")
            pulled.append(n)
            yield n, t.detach()

    return IteratorSource([spec_of(n, t) for n, t in tensors.items()], make), pulled


def test_a_stream_syncs_in_its_own_order(engines):
    coord = SyncCoordinator(engines, TransferConfig(bucket_bytes=1 << 16))
    torch.manual_seed(3)
    model = TinyModel()
    source, pulled = _stream(model)
    res = coord.sync(source, leg="loopback")
    assert res.ok and res.version == 1 and all(e.checksum_ok for e in res.engines)
    assert pulled == [n for n, _ in model.named_parameters()]
    assert res.layout == "checkpoint" and "streamed" in res.layout_note
    # the same weights as a module: the engines end with the same fingerprint
    again = coord.sync(model, leg="loopback")
    assert {e.fingerprint for e in again.engines} == {e.fingerprint for e in res.engines}


def test_a_stream_that_breaks_mid_sync_fails_it_and_nothing_is_applied(engines):
    coord = SyncCoordinator(engines, TransferConfig(bucket_bytes=1 << 16))
    torch.manual_seed(4)
    source, _ = _stream(TinyModel(), fail_at="proj.bias")
    with pytest.raises(SyncFailedError) as e:
        coord.sync(source, leg="loopback")
    assert all("the trainer lost proj.bias" in r.error for r in e.value.result.engines)
    assert {(s.state.value, s.version) for s in coord.statuses()} == {("serving", 0)}
