"""The broadcast transport over a real gloo group between real processes (no vLLM)."""

import multiprocessing as mp
import time

import pytest
import torch

from weightsync.errors import DeadlineExceeded, TransferError
from weightsync.transport.broadcast import (
    _RENDEZVOUS_GRACE_S,
    BroadcastReceiver,
    BroadcastSender,
    free_port,
    open_group,
)
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
    # within the deadline plus the rendezvous thread's grace, never a hang (the store itself
    # gave up after 4.8-5.1 s here: the old bound, 5 s, failed one of four runs)
    assert time.monotonic() - t < 2.0 + _RENDEZVOUS_GRACE_S + 1


def test_an_nccl_invalid_usage_names_its_usual_cause():
    """NCCL's "invalid usage" (as the GRPO job's trainer and engines on one H100 got it) comes
    with what it most often means; other failures and gloo's come as they are."""
    from weightsync.transport.broadcast import rendezvous_failed

    err = RuntimeError("NCCL error: invalid usage (run with NCCL_DEBUG=WARN for details)")
    got = str(rendezvous_failed("nccl", "rendezvous h:1 rank 1/3", err))
    assert got.startswith("rendezvous h:1 rank 1/3 failed: NCCL error: invalid usage")
    assert "same GPU" in got and "ipc=True" in got
    assert "same GPU" not in str(rendezvous_failed("gloo", "r", err))
    assert "same GPU" not in str(rendezvous_failed("nccl", "r", RuntimeError("timed out")))


def _chain_receiver(port, rank, world, plan_json, q, die=False):
    from weightsync.types import TransferPlan

    plan = TransferPlan.model_validate_json(plan_json)
    rx = BroadcastReceiver(open_group("gloo", "127.0.0.1", port, rank, world, 30))
    if die:  # joined the group, then gone: the chain breaks here
        import os

        os._exit(0)
    try:
        got = [(checksum(buf), {n: t.sum().item() for n, t in unpack_bucket(b, buf)})
               for b, buf in rx.receive(plan, 5)]
        q.put((rank, [c for c, _ in got], {k: v for _, d in got for k, v in d.items()}))
    except (DeadlineExceeded, TransferError) as e:
        q.put((rank, type(e).__name__, str(e)))


def _chain_run(receivers: int, dead: int | None = None):
    ws = _weights()
    plan = plan_buckets([spec_of(n, t) for n, t in ws.items()], 100_000, 1)
    plan = plan.model_copy(update={"chain_chunk": 16_384})  # several chunks per bucket
    port = free_port("127.0.0.1")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    world = receivers + 1
    procs = [ctx.Process(target=_chain_receiver,
                         args=(port, r, world, plan.model_dump_json(), q, r == dead))
             for r in range(1, world)]
    for p in procs:
        p.start()
    sender = BroadcastSender(open_group("gloo", "127.0.0.1", port, 0, world, 30))
    try:
        sums = sender.send(plan, ws, 5)
    except (DeadlineExceeded, TransferError) as e:
        sums = e
    t = time.monotonic()
    out = {r: (got, rest) for r, got, rest in
           (q.get(timeout=60) for _ in range(receivers - (dead is not None)))}
    waited = time.monotonic() - t
    sender.close()
    for p in procs:
        p.join(30)
    return ws, plan, sums, out, waited


def test_chain_broadcast_reaches_every_rank_intact():
    """Each rank forwards chunks to the next: all three get the sender's bytes."""
    ws, plan, sums, out, _ = _chain_run(3)
    assert len(plan.buckets) > 1 and len(sums) == len(plan.buckets)
    assert sorted(out) == [1, 2, 3]
    for got_sums, got in out.values():
        assert got_sums == sums
        assert got == pytest.approx({n: t.sum().item() for n, t in ws.items()})


def test_chain_broadcast_with_a_dead_middle_rank_fails_after_it_without_hanging():
    """Rank 2 dies: rank 1 cannot forward, rank 3 gets nothing — both raise typed errors within
    their deadlines; nobody behind the dead rank reports success."""
    _, _, _, out, waited = _chain_run(3, dead=2)
    assert sorted(out) == [1, 3]
    for rank in (1, 3):
        assert out[rank][0] in ("DeadlineExceeded", "TransferError"), out[rank]
    assert waited < 30


def _silent_sender(port, hold_s, ready):
    """Rank 0 of the group that never sends, and keeps its end open (a trainer whose failed
    send left a reference to the group behind). ``ready`` is set once its imports are done, just
    before it hosts the store: a spawned interpreter importing torch can take longer than the
    4 s group timeout on a loaded 2-core box (CI at 4d0fac9 lost this race)."""
    ready.set()
    group = open_group("gloo", "127.0.0.1", port, 0, 2, 30)
    time.sleep(hold_s)
    del group


@pytest.mark.parametrize("group_s,deadline_s", [(30, 1.0), (4, 30.0)],
                         ids=["deadline-first", "group-timeout-first"])
def test_a_receive_that_timed_out_does_not_hold_its_group_past_the_deadline(group_s, deadline_s):
    """A receiver's wait gives up at the deadline; the broadcast it posted must end soon after
    too, or dropping the group (a failed sync's cleanup in the engine) blocks until the group's
    own timeout: 30 s here, the rendezvous deadline (what stalled the hung-follower test). And
    never later than the group's timeout, when that comes first (defaults: rendezvous 60 s,
    transfer 120 s; an op timeout of 1.5 deadlines held an aborted session's engines 189 s)."""
    import gc

    ws = _weights()
    plan = plan_buckets([spec_of(n, t) for n, t in ws.items()], 100_000, 1)
    port = free_port("127.0.0.1")
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    sender = ctx.Process(target=_silent_sender, args=(port, 40, ready))
    sender.start()
    try:
        assert ready.wait(60), "the sender process never started"
        rx = BroadcastReceiver(open_group("gloo", "127.0.0.1", port, 1, 2, group_s))
        t = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            for _ in rx.receive(plan, deadline_s):
                pass
        rx.close()
        del rx
        gc.collect()  # the group is gone once this returns
        assert time.monotonic() - t < min(deadline_s * 1.5, group_s) + 3
    finally:
        sender.kill()
        sender.join(10)


def test_a_store_port_is_drawn_outside_the_ephemeral_range_and_binds():
    """``free_port`` draws the group store's port below the kernel's ephemeral range, where
    no outgoing connection takes a local port between the draw and the store's listen (the
    EADDRINUSE seen once in CI was a port bind(0) had handed out), and above Ray's worker
    ports; each one it gives binds."""
    import socket

    from weightsync.transport.broadcast import _store_ports, free_port

    ports = _store_ports()
    assert ports is not None and ports.start == 20000 and ports.stop <= 32768
    got = {free_port("127.0.0.1") for _ in range(20)}
    assert all(p in ports for p in got) and len(got) > 1
    for p in got:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", p))
    assert free_port("127.0.0.1", 23456) == 23456  # a port given is kept
