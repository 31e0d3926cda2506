"""The broadcast transport over a real gloo group between real processes (no vLLM)."""

import multiprocessing as mp
import time

import pytest
import torch

from weightsync.errors import DeadlineExceeded, TransferError
from weightsync.transport.broadcast import BroadcastReceiver, BroadcastSender, free_port, open_group
from weightsync.transport.packing import checksum, plan_buckets, spec_of, unpack_bucket


def _weights():
    g = torch.Generator().manual_seed(7)
    return {f"layer{i}.w": torch.randn(128, 96, generator=g) for i in range(6)}


def _receiver(port, rank, world, plan_json, q):
    from weightsync.types import TransferPlan

    plan = TransferPlan.model_validate_json(plan_json)
    group = open_group("gloo", "127.0.0.1", port, rank, world, 30)
    rx = BroadcastReceiver(group)
    out, sums = {}, []
    for bucket, buf in rx.receive(plan, 30):
        sums.append(checksum(buf))
        out.update({n: t.clone() for n, t in unpack_bucket(bucket, buf)})
    rx.close()
    q.put((sums, {n: t.sum().item() for n, t in out.items()}))


def test_broadcast_to_two_processes_matches_sender():
    ws = _weights()
    plan = plan_buckets([spec_of(n, t) for n, t in ws.items()], 100_000, 1)
    port = free_port("127.0.0.1")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_receiver, args=(port, r, 3, plan.model_dump_json(), q)) for r in (1, 2)]
    for p in procs:
        p.start()
    sender = BroadcastSender(open_group("gloo", "127.0.0.1", port, 0, 3, 30))
    sums = sender.send(plan, ws, 30)
    sender.close()
    results = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    assert len(sums) == len(plan.buckets) > 1
    for got_sums, got in results:
        assert got_sums == sums
        assert got == pytest.approx({n: t.sum().item() for n, t in ws.items()})


def test_rendezvous_with_missing_peer_fails_within_deadline():
    port = free_port("127.0.0.1")
    t = time.monotonic()
    with pytest.raises((DeadlineExceeded, TransferError)):
        open_group("gloo", "127.0.0.1", port, 0, 2, 2.0)
    assert time.monotonic() - t < 2 * 2.0 + 1  # within 2x the deadline, never a hang
