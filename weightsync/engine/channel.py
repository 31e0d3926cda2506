"""A colocated trainer's short way into its engine's host: a Unix socket the host serves.

Every sync's transfer is one call into each engine's host (``receive``). Through Ray that call
took 1.8 ms to arrive and 1.2 ms to come back on the H200 box (``call_request`` /
``call_reply`` of a MoE sync whose transfer and reload took 8 ms; a trivial Ray call there:
1.3-2.2 ms). A trainer on the engine's machine — the IPC leg's case, always — reaches the
host's event loop over a Unix socket instead; Ray still carries every other call, and every
call of a trainer elsewhere (the socket's path does not exist there).

Plain frames (a 4-byte length, then JSON): a ``ChannelCall`` in, a ``ChannelReply`` out. The
methods served are named by the host (``receive``); their arguments and results are strings
(JSON the callee parses), never pickles. A host's typed error comes back as its code and
message and is raised again as the same class (``errors.error_class``). Like a Ray call, one
that times out is abandoned (the connection is dropped, a late answer never read) and the
host finishes it on its own; a host that dies mid-call closes the socket: ``EngineDeadError``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from weightsync.errors import (
    EngineDeadError,
    EngineError,
    EngineUnresponsive,
    WeightSyncError,
    error_class,
)

logger = logging.getLogger(__name__)

#: the host methods served on the channel (string arguments, an ``owner`` keyword, a string
#: result): the one call every sync's transfer makes
SERVED = frozenset({"receive"})

_LENGTH = struct.Struct("!I")
MAX_FRAME = 64 << 20  # a plan's JSON is the largest argument (a MoE's: ~128 KB)


class ChannelCall(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    method: str = Field(min_length=1)
    args: tuple[str, ...] = ()
    owner: str | None = None


class ChannelReply(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    result: str | None = None
    code: str | None = None  # a WeightSyncError's, when the call raised one
    message: str | None = None


def ray_node() -> str | None:
    """The Ray node this process runs on (None outside Ray): a channel serves callers on its
    own node only (``EngineHost.local_channel``)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


class ChannelServer:
    """Serves ``methods`` (async, string arguments, ``owner`` keyword, string result) on a
    Unix socket of its own, on the event loop that starts it (the host's)."""

    def __init__(self, methods: dict[str, Callable[..., Awaitable[str]]]) -> None:
        self.methods = methods
        self.path: str | None = None
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task] = set()

    async def start(self, directory: str | None = None) -> str:
        directory = directory or tempfile.gettempdir()
        _sweep(directory)
        path = os.path.join(directory, f"weightsync-{os.getpid()}-{uuid.uuid4().hex[:12]}.sock")
        self._server = await asyncio.start_unix_server(self._serve, path=path)
        os.chmod(path, 0o600)  # this user's processes only (as Ray's own sockets)
        self.path = path
        return path

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._connections):  # a trainer still connected: hang up on it
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self.path is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.path = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._connections.add(task)
        try:
            while True:
                try:
                    head = await reader.readexactly(_LENGTH.size)
                except asyncio.IncompleteReadError:
                    return  # the trainer closed (or gave up on a call)
                (n,) = _LENGTH.unpack(head)
                if n > MAX_FRAME:
                    logger.warning("channel: a %d-byte frame (over %d): closing", n, MAX_FRAME)
                    return
                reply = await self._call(await reader.readexactly(n))
                body = reply.model_dump_json().encode()
                writer.write(_LENGTH.pack(len(body)) + body)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return  # the trainer went away mid-call: the call itself already ran
        finally:
            self._connections.discard(task)
            writer.close()

    async def _call(self, frame: bytes) -> ChannelReply:
        try:
            call = ChannelCall.model_validate_json(frame)
        except ValueError as e:
            return ChannelReply(code=EngineError.code, message=f"bad channel call: {e}")
        fn = self.methods.get(call.method)
        if fn is None:
            return ChannelReply(code=EngineError.code,
                                message=f"{call.method} is not served on this channel")
        try:
            return ChannelReply(result=await fn(*call.args, owner=call.owner))
        except WeightSyncError as e:
            return ChannelReply(code=e.code, message=e.message)
        except Exception as e:
            logger.exception("channel: %s failed", call.method)
            return ChannelReply(code=EngineError.code, message=f"{type(e).__name__}: {e}")


def _sweep(directory: str) -> None:
    """Remove the sockets of hosts whose process is gone (killed before it could): each is
    named after its process id."""
    for name in os.listdir(directory):
        if not (name.startswith("weightsync-") and name.endswith(".sock")):
            continue
        try:
            pid = int(name.split("-")[1])
            os.kill(pid, 0)  # (signal 0: only asks whether it exists)
        except ValueError:
            continue
        except ProcessLookupError:
            try:
                os.unlink(os.path.join(directory, name))
            except OSError:
                pass
        except PermissionError:
            continue  # another user's live process


class ChannelClient:
    """The trainer's end of one host's channel: one call at a time (``send``, then
    ``collect``), the connection opened on first use and again after a failure."""

    def __init__(self, path: str, engine: str) -> None:
        self.path, self.engine = path, engine
        self.calls = 0  # calls answered (tests and benchmarks see that it was used)
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()  # one call in flight per connection

    def send(self, method: str, args: tuple[str, ...], owner: str | None) -> None:
        """Send a call; ``OSError`` when the host cannot be reached (nothing was sent)."""
        body = ChannelCall(method=method, args=args, owner=owner).model_dump_json().encode()
        if len(body) > MAX_FRAME:
            raise OSError(f"a {len(body)}-byte call is over the channel's {MAX_FRAME}")
        if not self._lock.acquire(blocking=False):
            raise OSError("a call is in flight on this channel")
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(self.path)
                self._sock = sock
            self._sock.settimeout(None)
            self._sock.sendall(_LENGTH.pack(len(body)) + body)
        except BaseException:
            self._drop()
            self._lock.release()
            raise

    def collect(self, timeout: float) -> str:
        """The sent call's result; its typed error raised again, ``EngineUnresponsive`` past
        ``timeout`` (the connection is dropped), ``EngineDeadError`` if the host is gone."""
        try:
            end = time.monotonic() + timeout
            (n,) = _LENGTH.unpack(self._read(_LENGTH.size, end))
            reply = ChannelReply.model_validate_json(self._read(n, end))
        except TimeoutError as e:
            self._drop()
            raise EngineUnresponsive(f"no answer within {timeout:.1f}s",
                                     engine=self.engine) from e
        except OSError as e:
            self._drop()
            raise EngineDeadError(f"engine host unreachable over its channel: {e}",
                                  engine=self.engine) from e
        except ValueError as e:
            self._drop()
            raise EngineError(f"a malformed answer on the channel: {e}",
                              engine=self.engine) from e
        finally:
            self._lock.release()
        if reply.code is not None:
            raise error_class(reply.code)(reply.message or reply.code, engine=self.engine)
        self.calls += 1
        return reply.result or ""

    def _read(self, n: int, end: float) -> bytes:
        out = bytearray()
        while len(out) < n:
            self._sock.settimeout(max(end - time.monotonic(), 1e-3))  # (what has come in
            # is read even when the deadline has passed)
            chunk = self._sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("the host closed its channel")
            out += chunk
        return bytes(out)

    def _drop(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None

    def close(self) -> None:
        with self._lock:
            self._drop()


class OnChannel:
    """A call sent over a ``ChannelClient``, waiting to be collected (``remote.gather``)."""

    def __init__(self, client: ChannelClient) -> None:
        self.client = client

    def result(self, timeout: float) -> Any:
        return self.client.collect(timeout)
