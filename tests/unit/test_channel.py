"""The host's local channel (``weightsync.engine.channel``): a real Unix socket served on a
real event loop, the trainer's blocking client, and ``remote.gather`` collecting from it. The
served methods stand in for a host's (string in, string out, typed errors)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from weightsync.engine.channel import ChannelClient, ChannelServer, OnChannel
from weightsync.errors import (
    EngineDeadError,
    EngineError,
    EngineUnresponsive,
    IllegalStateError,
    PayloadNotHeld,
)
from weightsync.remote import gather


class _Host:
    def __init__(self):
        self.calls = []

    async def receive(self, plan, request, *, owner=None):
        self.calls.append((plan, request, owner))
        if request == "lost":
            raise PayloadNotHeld("payload k is not held here", engine="e")
        if request == "owner" and owner != "me":
            raise IllegalStateError(f"held by another owner, not {owner}", engine="e")
        if request == "slow":
            await asyncio.sleep(0.5)
        if request == "crash":
            raise RuntimeError("boom")
        return f"{plan}|{request}"


@pytest.fixture()
def served(tmp_path):
    """A channel served on an event loop in a thread (as a Ray async actor's), and its stop."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    host = _Host()
    server = ChannelServer({"receive": host.receive})
    path = asyncio.run_coroutine_threadsafe(server.start(str(tmp_path)), loop).result(5)

    def stop():
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(5)

    yield host, path, stop
    if server.path is not None:
        stop()
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def test_a_call_and_its_typed_errors_come_back_over_the_socket(served):
    host, path, _ = served
    client = ChannelClient(path, "e")
    ok, bad = gather({"e": _sent(client, "plan", "req", owner="me")}, 5)
    assert ok == {"e": "plan|req"} and not bad and host.calls == [("plan", "req", "me")]
    for request, cls in (("lost", PayloadNotHeld), ("owner", IllegalStateError),
                         ("crash", EngineError)):
        _, bad = gather({"e": _sent(client, "p", request)}, 5)
        assert type(bad["e"]) is cls and bad["e"].engine == "e"
    assert "boom" in bad["e"].message
    assert gather({"e": _sent(client, "p", "again")}, 5)[0] == {"e": "p|again"}
    assert client.calls == 2


def test_a_call_past_its_deadline_is_abandoned_and_the_next_one_reconnects(served):
    host, path, _ = served
    client = ChannelClient(path, "e")
    t = time.monotonic()
    _, bad = gather({"e": _sent(client, "p", "slow")}, 0.1)
    assert isinstance(bad["e"], EngineUnresponsive) and time.monotonic() - t < 0.4
    assert gather({"e": _sent(client, "p", "next")}, 5)[0] == {"e": "p|next"}  # not "slow"'s


def test_only_the_methods_the_host_names_are_served(served):
    _, path, _ = served
    client = ChannelClient(path, "e")
    client.send("commit", ("1",), None)
    with pytest.raises(EngineError, match="commit is not served"):
        OnChannel(client).result(5)


def test_a_host_that_went_away_is_a_dead_engine_and_a_second_call_cannot_cut_in(served):
    _, path, stop = served
    client = ChannelClient(path, "e")
    pending = _sent(client, "p", "slow")
    with pytest.raises(OSError, match="in flight"):  # (RayEngines sends it through Ray)
        client.send("receive", ("p", "x"), None)
    assert gather({"e": pending}, 5)[0] == {"e": "p|slow"}
    stop()
    with pytest.raises(OSError):  # nothing listens: nothing was sent
        client.send("receive", ("p", "x"), None)


def test_a_host_that_dies_mid_call_is_a_dead_engine(tmp_path):
    import socket

    path = str(tmp_path / "s.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    client = ChannelClient(path, "e")
    client.send("receive", ("p", "r"), None)
    conn, _ = listener.accept()
    conn.close()  # the host's process ends before it answers
    _, bad = gather({"e": OnChannel(client)}, 5)
    assert isinstance(bad["e"], EngineDeadError) and "over its channel" in bad["e"].message
    listener.close()


def _sent(client, plan, request, owner=None) -> OnChannel:
    client.send("receive", (plan, request), owner)
    return OnChannel(client)


def test_a_new_server_removes_the_sockets_of_hosts_whose_process_is_gone(tmp_path):
    import os
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stale = tmp_path / f"weightsync-{gone}-0123456789ab.sock"
    mine = tmp_path / f"weightsync-{os.getpid()}-0123456789ab.sock"
    stale.touch()
    mine.touch()
    server = ChannelServer({})
    path = asyncio.run(_start_and_close(server, str(tmp_path)))
    assert not stale.exists() and mine.exists() and not os.path.exists(path)


async def _start_and_close(server, directory):
    path = await server.start(directory)
    await server.close()
    return path
