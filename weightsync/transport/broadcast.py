"""Bucketed broadcast from the trainer (rank 0) to every engine worker (ranks 1..N).

gloo on CPU, NCCL (vLLM's ``PyNcclCommunicator``) between GPUs. With gloo, a plan with
``chain_chunk`` goes down a chain instead of gloo's broadcast: 0 -> 1 -> ... -> N in chunks,
each rank forwarding a chunk as soon as it has it. Every collective waits with a
deadline: a dead peer surfaces as ``TransferError``/``DeadlineExceeded``, never a hang.
"""

from __future__ import annotations

import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import timedelta

import torch

from weightsync.errors import DeadlineExceeded, TransferError, WeightSyncError
from weightsync.transport import vllm_groups
from weightsync.transport.packing import checksum, named_tensors, pack_bucket
from weightsync.types import Bucket, TransferPlan

logger = logging.getLogger(__name__)

_RENDEZVOUS_GRACE_S = 5.0
_DIAL_RETRY_S = 0.05  # how often a joining rank dials a rank 0 that does not listen yet
_DIAL_TIMEOUT_S = 1.0  # one dial's own limit (a host that drops the connection attempt)
_OP_GRACE = 1.5  # a gloo broadcast's own timeout, in deadlines


# Group stores listen on a port drawn from here: above Ray's worker ports (10002-19999 by
# default) and below the kernel's ephemeral range, where every outgoing connection of every
# process takes its local port (a port handed out by bind(0) can be taken that way before the
# store listens on it: EADDRINUSE, seen once in CI).
_STORE_PORTS = (20000, 32768)
_EPHEMERAL = "/proc/sys/net/ipv4/ip_local_port_range"


def _store_ports() -> range | None:
    """Where to draw a store's port from: up to the ephemeral range's start (Linux says
    where), or None where that leaves too few (then the kernel picks, ``bind(0)``)."""
    low = _STORE_PORTS[1]
    try:
        with open(_EPHEMERAL) as f:
            low = min(low, int(f.read().split()[0]))
    except (OSError, ValueError, IndexError):  # not Linux: keep the default range's end
        pass
    return range(_STORE_PORTS[0], low) if low - _STORE_PORTS[0] >= 1000 else None


def free_port(host: str, port: int = 0) -> int:
    """A port for the group's store (``port`` itself when non-zero): one that binds now,
    drawn at random outside the ephemeral range (``_STORE_PORTS``).

    The store is created by the rendezvous from a port number, not from a pre-bound socket:
    handing a socket's fd to torch's TCPStore double-closes it when the rendezvous times out,
    which can close an unrelated file opened meanwhile.
    """
    if port:
        return port
    ports = _store_ports()
    if ports is not None:
        draw = random.SystemRandom()  # (not the random module's state, which tests seed)
        for _ in range(64):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind((host, draw.choice(ports)))
                except OSError:  # taken: draw again
                    continue
                return int(s.getsockname()[1])
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class _Group:
    """A gloo group or NCCL communicator with deadline-bounded broadcast."""

    def __init__(self, backend: str, group, device: torch.device, rank: int, world_size: int,
                 timeout_s: float) -> None:
        self.timeout_s = timeout_s  # the group's own (gloo ends any operation by then)
        self.backend = backend
        self.group = group
        self.device = device
        self.rank = rank
        self.world_size = world_size

    def broadcast(self, buf: torch.Tensor, deadline_s: float, what: str) -> None:
        self.start(buf, deadline_s).wait(deadline_s, what)

    def start(self, buf: torch.Tensor, deadline_s: float) -> _Pending:
        """Post the broadcast of ``buf``. A gloo operation carries its own timeout (a bit
        past the wait's deadline, as it starts before the wait does, and never past the
        group's): a wait that gave up leaves the operation running in gloo's thread until
        then, and dropping the group blocks until it ends — with the group's timeout (the
        rendezvous deadline) a failed sync's teardown stalled an engine for 26 s."""
        if self.backend == "gloo":
            op_s = min(deadline_s * _OP_GRACE, self.timeout_s)
            return _Pending(work=self.group.broadcast(buf, 0, timeout=timedelta(seconds=op_s)))
        stream = torch.cuda.current_stream(self.device)
        self.group.broadcast(buf, src=0, stream=stream)
        event = torch.cuda.Event()
        event.record(stream)
        return _Pending(event=event)

    def chain(self, buf: torch.Tensor, chunk: int, first_tag: int, deadline_s: float) -> _Chain:
        """This rank's part of sending ``buf`` down the chain 0 -> 1 -> ... (gloo)."""
        return _Chain(self, buf, chunk, first_tag, deadline_s)

    def close(self) -> None:
        vllm_groups.destroy_group(self.group)


def _wait_work(work, deadline_s: float, what: str) -> None:
    """Wait for one gloo operation; a timeout or a dead peer becomes a typed error."""
    try:
        ok = work.wait(timedelta(seconds=max(deadline_s, 0.001)))
    except RuntimeError as e:  # gloo raises on timeout and on a dead peer
        if "timed out" in str(e).lower() or "timeout" in str(e).lower():
            raise DeadlineExceeded(f"{what}: no progress within {deadline_s:.1f}s ({e})") from e
        raise TransferError(f"{what}: {e}") from e
    if ok is False:
        raise DeadlineExceeded(f"{what}: no progress within {deadline_s:.1f}s")


def chain_tags(plan: TransferPlan) -> list[int]:
    """The first point-to-point tag of every bucket in a chain broadcast: one tag per chunk,
    unique within the sync, derived from the plan alone so every rank agrees."""
    tags, n = [], 0
    for b in plan.buckets:
        tags.append(n)
        n += -(-b.nbytes // plan.chain_chunk)
    return tags


class _Chain:
    """One bucket down a chain: rank 0 sends its chunks to rank 1; every other rank receives
    its chunks from the rank before it and forwards each to the next one as soon as it has
    arrived (a thread per bucket), so the last rank is a chunk behind the first, not a bucket.
    Every chunk waits at most ``deadline_s``; a dead rank fails the ranks after it."""

    def __init__(self, group: _Group, buf: torch.Tensor, chunk: int, first_tag: int,
                 deadline_s: float) -> None:
        pg, rank = group.group, group.rank
        bounds = [(a, min(a + chunk, buf.numel())) for a in range(0, buf.numel(), chunk)]
        nxt = rank + 1 if rank + 1 < group.world_size else None
        self._sends: list = []
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if rank == 0:
            self._sends = [pg.send([buf[a:b]], 1, first_tag + i) for i, (a, b) in enumerate(bounds)]
            return
        recvs = [pg.recv([buf[a:b]], rank - 1, first_tag + i) for i, (a, b) in enumerate(bounds)]

        def forward() -> None:
            try:
                for i, work in enumerate(recvs):
                    _wait_work(work, deadline_s, f"chain chunk {first_tag + i} from rank {rank - 1}")
                    if nxt is not None:
                        a, b = bounds[i]
                        self._sends.append(pg.send([buf[a:b]], nxt, first_tag + i))
            except BaseException as e:  # noqa: BLE001 - re-raised by wait()
                self._error = e

        self._thread = threading.Thread(target=forward, name=f"ws-chain-r{rank}", daemon=True)
        self._thread.start()

    def wait(self, deadline_s: float, what: str) -> None:
        if self._thread is not None:
            self._thread.join(deadline_s)  # the whole bucket, as for gloo's broadcast
            if self._thread.is_alive():
                raise DeadlineExceeded(f"{what}: no progress within {deadline_s:.1f}s (chain)")
            if self._error is not None:
                if isinstance(self._error, (DeadlineExceeded, TransferError)):
                    raise self._error
                raise TransferError(f"{what}: {self._error}") from self._error
        for work in self._sends:
            _wait_work(work, deadline_s, f"{what} (forward)")


class _Pending:
    def __init__(self, work=None, event=None) -> None:
        self.work, self.event = work, event

    def wait(self, deadline_s: float, what: str) -> None:
        if self.work is not None:
            _wait_work(self.work, deadline_s, what)
            return
        end = time.monotonic() + deadline_s  # NCCL: poll the event; never block the host forever
        while not self.event.query():
            if time.monotonic() > end:
                raise DeadlineExceeded(f"{what}: NCCL broadcast stuck for {deadline_s:.1f}s")
            time.sleep(0.0005)


# NCCL's answer when two ranks of one group are on the same GPU (measured on the lent H100:
# the GRPO job's trainer and engines on one GPU with --backend nccl)
_NCCL_SAME_GPU = (" (most often two ranks of one NCCL group on the same GPU, which NCCL refuses: "
                  "a trainer sharing a GPU with an engine syncs it over CUDA IPC, ipc=True, or "
                  "over gloo)")


def rendezvous_failed(backend: str, where: str, e: BaseException) -> TransferError:
    """The error for a rendezvous that raised ``e``, with what NCCL's "invalid usage" most
    often means."""
    hint = _NCCL_SAME_GPU if backend == "nccl" and "invalid usage" in str(e) else ""
    return TransferError(f"{where} failed: {e}{hint}")


def open_group(backend: str, host: str, port: int, rank: int, world_size: int,
               timeout_s: float) -> _Group:
    """Join (rank > 0) or host (rank 0) a stateless group; raises within ``timeout_s``."""
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    result: dict = {}

    def target() -> None:
        try:
            result["g"] = vllm_groups.stateless_group(host, port, rank, world_size, backend,
                                                      timeout_s)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            result["e"] = e

    # The store gets ``timeout_s`` itself (vLLM >= 0.32) and normally ends first; the outer
    # join bounds older vLLM, whose rendezvous takes no timeout, and leaves a short grace so a
    # store that timed out finishes cleanly instead of being abandoned mid-teardown.
    t = threading.Thread(target=target, name=f"ws-rendezvous-r{rank}", daemon=True)
    t.start()
    t.join(timeout_s + _RENDEZVOUS_GRACE_S)
    if t.is_alive():
        raise DeadlineExceeded(f"rendezvous {host}:{port} rank {rank}/{world_size} "
                               f"incomplete after {timeout_s:.1f}s")
    if "e" in result:
        raise rendezvous_failed(backend, f"rendezvous {host}:{port} rank {rank}/{world_size}",
                                result["e"])
    return _Group(backend, result["g"], device, rank, world_size, timeout_s)


class PendingJoin:
    """A rank > 0 joining a group in a thread of its own, so that its caller keeps answering
    while it waits and can give up at once (``cancel``): vLLM runs a worker's RPCs one at a
    time, and a join that blocked the worker for the rendezvous deadline made every abort
    wait that long behind it.

    Until rank 0 listens, the thread only dials its address (a plain TCP connect, retried
    every ``_DIAL_RETRY_S`` while the join is not cancelled; TCPStore's own client would
    retry for the whole deadline and cannot be interrupted): a trainer that never comes
    costs nothing to cancel, and the thread ends within a retry. Then the rendezvous runs
    as ``open_group`` (the group's own timeout is ``timeout_s``, as for any group). A
    rendezvous that completes after ``cancel`` destroys its group.
    """

    def __init__(self, backend: str, host: str, port: int, rank: int, world_size: int,
                 timeout_s: float) -> None:
        if rank == 0:
            raise ValueError("rank 0 hosts the group (open_group): it has no one to wait for")
        self.rank = rank
        self._where = f"rendezvous {host}:{port} rank {rank}/{world_size}"
        # the caller's GPU (a thread starts on the first one: CUDA's current device is per thread)
        self._cuda = torch.cuda.current_device() if backend == "nccl" else None
        self._lock = threading.Lock()
        self._cancelled = threading.Event()
        self._done = threading.Event()
        self._group: _Group | None = None
        self._error: WeightSyncError | None = None
        self._thread = threading.Thread(
            target=self._run, args=(backend, host, port, world_size, timeout_s),
            name=f"ws-join-r{rank}", daemon=True)
        self._thread.start()

    def wait(self, timeout_s: float) -> _Group | None:
        """The group, once joined (the caller owns it from then on); None while still joining
        after ``timeout_s``. Raises the join's error, or ``TransferError`` once cancelled."""
        self._done.wait(max(timeout_s, 0.0))
        with self._lock:
            if self._cancelled.is_set():
                raise TransferError(f"{self._where}: the join was cancelled")
            if self._error is not None:
                raise self._error
            group, self._group = self._group, None
            if group is None and self._done.is_set():
                raise TransferError(f"{self._where}: the group was already handed out")
            return group

    def cancel(self) -> None:
        """Stop joining: the dialling thread ends within a retry; a group the rendezvous
        completes (now or later) and nobody took is destroyed."""
        with self._lock:
            self._cancelled.set()
            group, self._group = self._group, None
        if group is not None:
            group.close()

    @property
    def finished(self) -> bool:
        """Whether the thread is done (joined, failed or gave up after a cancel)."""
        return self._done.is_set() and not self._thread.is_alive()

    def _run(self, backend: str, host: str, port: int, world_size: int,
             timeout_s: float) -> None:
        try:
            if self._cuda is not None:
                torch.cuda.set_device(self._cuda)
            if not self._dial(host, port, timeout_s):
                return
            group = open_group(backend, host, port, self.rank, world_size, timeout_s)
        except WeightSyncError as e:
            with self._lock:
                self._error = e
        except BaseException as e:  # noqa: BLE001 - surfaced to wait() as a typed error
            with self._lock:
                self._error = TransferError(f"{self._where} failed: {e}")
        else:
            with self._lock:
                if not self._cancelled.is_set():
                    self._group, group = group, None
            if group is not None:  # cancelled while the rendezvous ran: nobody will use it
                logger.info("%s completed after its join was cancelled: destroyed", self._where)
                group.close()
        finally:
            self._done.set()

    def _dial(self, host: str, port: int, timeout_s: float) -> bool:
        """Wait until something listens at ``host:port``: True then, False once cancelled;
        raises ``DeadlineExceeded`` after ``timeout_s``."""
        end = time.monotonic() + timeout_s
        while not self._cancelled.is_set():
            left = end - time.monotonic()
            if left <= 0:
                raise DeadlineExceeded(f"{self._where}: nothing listened there within "
                                       f"{timeout_s:.1f}s")
            try:
                with socket.create_connection((host, port), timeout=min(_DIAL_TIMEOUT_S, left)):
                    return True
            except socket.gaierror as e:  # a name that does not resolve will not start to
                raise TransferError(f"{self._where}: {e}") from e
            except OSError:  # refused (not listening yet), unreachable, or timed out
                self._cancelled.wait(min(_DIAL_RETRY_S, max(end - time.monotonic(), 0.0)))
        return False


class BroadcastSender:
    """Trainer side: rank 0 of a group with every engine worker."""

    def __init__(self, group: _Group) -> None:
        self.group = group
        self._pool: list[torch.Tensor] = []  # two packing buffers, reused across syncs

    def send(self, plan: TransferPlan, weights, deadline_s: float,
             on_bucket: Callable[[int], None] | None = None) -> list[int]:
        """Broadcast every bucket of ``plan``; returns the per-bucket checksums.

        Packing bucket k+1 overlaps the broadcast of bucket k (two buffers in flight at most,
        the same two every sync: fresh pages cost a page fault each, a third of the wire time
        for a CPU broadcast). Padding may hold another bucket's bytes (never uninitialized
        memory: the buffers start zeroed); the receivers get and checksum the same bytes.
        ``on_bucket(k)`` is called before bucket k is sent (progress bars, fault injection).
        """
        # a mapping is the coordinator's feed (weightsync.sources): read lazily, bucket by bucket
        tensors = weights if isinstance(weights, Mapping) else dict(named_tensors(weights))
        sums: list[int] = []
        largest = max((b.nbytes for b in plan.buckets), default=0)
        if not self._pool or self._pool[0].numel() < largest:
            self._pool = [torch.zeros(largest, dtype=torch.uint8, device=self.group.device)
                          for _ in range(2)]
        tags = chain_tags(plan) if plan.chain_chunk else []
        # (op, bucket, buffer): the buffer stays referenced until its broadcast completes
        pending: tuple[_Pending | _Chain, Bucket, torch.Tensor] | None = None
        for k, bucket in enumerate(plan.buckets):
            if on_bucket is not None:
                on_bucket(bucket.index)
            buf = pack_bucket(bucket, tensors, self.group.device,
                              out=self._pool[k % 2][: bucket.nbytes])
            op = self.group.chain(buf, plan.chain_chunk, tags[k], deadline_s) if tags \
                else self.group.start(buf, deadline_s)
            sums.append(checksum(buf))  # read-only, overlaps this bucket's broadcast
            if pending is not None:
                pending[0].wait(deadline_s, f"broadcast bucket {pending[1].index}")
            pending = (op, bucket, buf)
        if pending is not None:
            pending[0].wait(deadline_s, f"broadcast bucket {pending[1].index}")
        return sums

    def close(self) -> None:
        self.group.close()


class BroadcastReceiver:
    """Engine-worker side: receives buckets one bucket ahead.

    Buckets of one sync never share memory: vLLM's layer-wise reload keeps references to
    loaded tensors until a layer is complete. Across syncs the caller may hand last sync's
    buffers back (``receive(pool=...)``) once nothing references them any more: fresh pages
    cost a page fault each, a third of the wire time of a CPU broadcast.
    """

    def __init__(self, group: _Group) -> None:
        self.group = group

    def receive(self, plan: TransferPlan, deadline_s: float,
                pool: list[torch.Tensor] | None = None
                ) -> Iterator[tuple[Bucket, torch.Tensor]]:
        tags = chain_tags(plan) if plan.chain_chunk else []

        def post(i: int, b: Bucket) -> tuple[Bucket, torch.Tensor, _Pending | _Chain]:
            buf = pool[i] if pool and i < len(pool) and pool[i].numel() == b.nbytes else \
                torch.empty(b.nbytes, dtype=torch.uint8, device=self.group.device)
            if tags:
                return b, buf, self.group.chain(buf, plan.chain_chunk, tags[i], deadline_s)
            return b, buf, self.group.start(buf, deadline_s)

        queue = [post(0, b) for b in plan.buckets[:1]]
        nxt = 1
        while queue:
            bucket, buf, op = queue.pop(0)
            op.wait(deadline_s, f"receive bucket {bucket.index}")
            if nxt < len(plan.buckets):
                queue.append(post(nxt, plan.buckets[nxt]))
                nxt += 1
            yield bucket, buf

    def close(self) -> None:
        self.group.close()
