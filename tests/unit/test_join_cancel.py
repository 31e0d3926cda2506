"""A join of the trainer's group can be given up at once (issue 28, "abort of a session whose
trainer never connected ends it within a second"): ``PendingJoin`` on its own, and the
coordinator's external sync over engines whose workers answer one RPC at a time, as vLLM's do."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import pytest

from weightsync.config import Deadlines, TransferConfig
from weightsync.coordinator import SyncCoordinator
from weightsync.errors import DeadlineExceeded, SyncFailedError, TransferError
from weightsync.messages import JoinProgress, reply_of
from weightsync.testing.fleet import TinyModel
from weightsync.transport import broadcast
from weightsync.transport.broadcast import PendingJoin, free_port
from weightsync.transport.packing import spec_of
from weightsync.types import EngineState


def _wait_until(cond, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(0.01)
    return cond()


def test_a_join_nobody_hosts_is_cancelled_at_once():
    join = PendingJoin("gloo", "127.0.0.1", free_port("127.0.0.1"), 1, 2, 60.0)
    assert join.wait(0.2) is None  # still dialling: nothing listens there
    t0 = time.perf_counter()
    join.cancel()
    assert _wait_until(lambda: join.finished, 1.0)
    took = time.perf_counter() - t0
    print(f"\ncancelled join stopped dialling in {took * 1000:.0f} ms (deadline 60 s)")
    assert took < 0.5
    with pytest.raises(TransferError, match="cancelled"):
        join.wait(0)


def test_a_join_nobody_hosts_fails_by_its_deadline():
    join = PendingJoin("gloo", "127.0.0.1", free_port("127.0.0.1"), 1, 2, 0.5)
    t0 = time.perf_counter()
    with pytest.raises(DeadlineExceeded, match="nothing listened"):
        while join.wait(0.1) is None:
            assert time.perf_counter() - t0 < 5
    assert time.perf_counter() - t0 < 2


class _Group:
    def __init__(self) -> None:
        self.destroyed = threading.Event()

    def destroy(self) -> None:
        self.destroyed.set()


def test_a_rendezvous_that_completes_after_the_cancel_destroys_its_group(monkeypatch):
    entered, release, made = threading.Event(), threading.Event(), _Group()

    def slow_group(*args: Any, **kwargs: Any) -> _Group:
        entered.set()
        release.wait(10)
        return made

    monkeypatch.setattr(broadcast.vllm_groups, "stateless_group", slow_group)
    with socket.create_server(("127.0.0.1", 0)) as trainer:  # rank 0 listens: past the dial
        join = PendingJoin("gloo", "127.0.0.1", trainer.getsockname()[1], 1, 2, 30.0)
        assert entered.wait(5)  # in the rendezvous
        join.cancel()
        release.set()  # ... which completes after the cancel
        assert _wait_until(lambda: join.finished, 5)
    assert made.destroyed.is_set()
    with pytest.raises(TransferError, match="cancelled"):
        join.wait(0)


def test_a_completed_join_hands_its_group_over_once(monkeypatch):
    made = _Group()
    monkeypatch.setattr(broadcast.vllm_groups, "stateless_group", lambda *a, **k: made)
    with socket.create_server(("127.0.0.1", 0)) as trainer:
        join = PendingJoin("gloo", "127.0.0.1", trainer.getsockname()[1], 1, 2, 30.0)
        group = join.wait(5)
    assert group is not None and group.group is made and group.rank == 1
    join.cancel()  # the caller owns it now: a later cancel leaves it alone
    assert not made.destroyed.is_set()


class _Trainer:
    """An ``ExternalSender`` that never hosts the group, and gives up."""

    def __init__(self) -> None:
        self.address = ("127.0.0.1", free_port("127.0.0.1"))
        self.opened = threading.Event()
        self.gave_up = threading.Event()

    def ready(self, plan: Any, world_size: int) -> None:
        self.opened.set()

    def wait_aborted(self, timeout: float) -> str | None:
        return "the trainer gave up" if self.gave_up.wait(timeout) else None

    def wait_checksums(self, timeout: float) -> list[int]:
        raise TransferError("the trainer sent nothing")


def _one_rpc_at_a_time(engines) -> list[str]:
    """Make every engine's workers answer one RPC at a time, as vLLM's do; returns the RPCs
    in the order they ran."""
    ran: list[str] = []
    for host in engines.handles.values():
        engine, lock = host.engine, asyncio.Lock()
        rpc = engine.collective_rpc

        async def serial(method: str, args: tuple = (), rpc=rpc, lock=lock) -> list[Any]:
            async with lock:
                ran.append(method)
                return await rpc(method, args)

        engine.collective_rpc = serial
    return ran


def test_an_abort_before_the_join_does_not_wait_behind_it(local_fleet):
    """Default deadlines (a 60 s rendezvous): the workers' join is in flight when the trainer
    gives up; the sync ends, and every engine serves its old version, within a second."""
    engines = local_fleet()
    ran = _one_rpc_at_a_time(engines)
    coord = SyncCoordinator(engines, TransferConfig(deadlines=Deadlines()))
    trainer = _Trainer()
    specs = [spec_of(n, p) for n, p in TinyModel().named_parameters()]
    outcome: dict[str, BaseException] = {}

    def run() -> None:
        try:
            coord.sync_external(specs, trainer)
        except BaseException as e:  # noqa: BLE001 - looked at below
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    try:
        thread.start()
        assert trainer.opened.wait(10)
        # the workers are in the join, polled one RPC at a time
        assert _wait_until(lambda: ran.count("ws_join_wait") >= 2, 5)
        t0 = time.perf_counter()
        trainer.gave_up.set()
        thread.join(5)
        took = time.perf_counter() - t0
        print(f"\nabort before the join, one worker RPC at a time: sync ended in {took:.2f}s "
              "(rendezvous deadline 60 s)")
        assert not thread.is_alive() and took < 1.0
        assert isinstance(outcome.get("error"), SyncFailedError), outcome
        assert "the trainer gave up" in str(outcome["error"].result.engines[0].error)
        statuses = coord.statuses()
        assert {(s.state, s.version) for s in statuses} == {(EngineState.SERVING, 0)}
        assert "ws_leave_group" in ran  # the workers were told to stop joining
    finally:
        coord.close()


def test_a_worker_that_joined_at_an_earlier_poll_says_so_when_asked_again(monkeypatch, tmp_path):
    """A tensor-parallel engine's workers are polled together until all joined: one that got
    its group at the first poll is asked again while the other has not. It used to answer
    "not joining a transfer group" and fail the sync (seen in CI: TP and mixed-fleet syncs)."""
    from safetensors.torch import save_file

    from weightsync.testing.fleet import _Worker

    made = _Group()
    monkeypatch.setattr(broadcast.vllm_groups, "stateless_group", lambda *a, **k: made)
    save_file(TinyModel().state_dict(), str(tmp_path / "model.safetensors"))
    worker = _Worker(tmp_path, lambda: None, rank=0, workers=2)
    progress = reply_of(JoinProgress).model_validate_json
    with socket.create_server(("127.0.0.1", 0)) as trainer:
        first = progress(worker.ws_join_group("gloo", "127.0.0.1", trainer.getsockname()[1],
                                              1, 3, 30.0, 5.0))
        assert first.reply.joined and first.reply.rank == 1
        again = progress(worker.ws_join_wait(0.1))  # the other worker is still dialling
        assert again.reply == first.reply
        worker.ws_leave_group()
        assert "not joining a transfer group" in progress(worker.ws_join_wait(0.1)).error.message
