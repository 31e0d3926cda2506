"""An in-process fleet that drives the real coordinator: protocol tests in milliseconds.

Each engine is a real ``EngineHost`` (its state machine, deadlines and fencing as in
production) on its own event loop thread, as a Ray async actor would be, over a stand-in for
vLLM's ``AsyncLLM`` whose one worker is a real ``WeightSyncWorkerExtension`` around a tiny torch
model saved as a real safetensors checkpoint. Buckets travel by the ``loopback`` leg. What is
fake is only vLLM: a model runner that loads by name, and an engine that answers pause, sleep,
wake and cache resets at once. With ``sleep_mode`` the engine keeps vLLM's sleep semantics
(``SleepMode``) so the GPU-only branches of the colocated loop run here too.

Faults are passed in per engine (``Faults``), never patched into production code; a test may
swap an engine's faults between syncs (``LocalEngines.faults[name] = ...``).
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from weightsync.config import EngineSpec
from weightsync.engine.host import EngineHost
from weightsync.engine.worker_ext import WeightSyncWorkerExtension
from weightsync.errors import EngineDeadError, EngineUnresponsive, WeightSyncError
from weightsync.remote import Engines, HostCall


@dataclass(frozen=True)
class Faults:
    """What goes wrong in one engine. ``corrupt_bucket``: a byte of that bucket flips on the
    way in (on worker ``corrupt_rank`` only, when set; read in place from the trainer's own
    tensors — ``ipc_direct`` — the trainer writes that byte during the sync).
    ``fail_load_after``: the loader raises after that many tensors (a load broken half-way).
    ``skew_load``: the loader adds a tiny offset to one parameter (its weights no longer match
    the fleet's). ``stall``: worker RPC name -> seconds it hangs before running
    (a deadline to expire). ``dead``: the engine does not answer at all."""

    corrupt_bucket: int | None = None
    corrupt_rank: int | None = None  # only this worker's copy is corrupted (None: every one)
    fail_load_after: int | None = None
    skew_load: bool = False
    stall: Mapping[str, float] = field(default_factory=dict)
    dead: bool = False


class TinyModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(16, 8)
        self.proj = torch.nn.Linear(8, 8)
        self.norm = torch.nn.LayerNorm(8)

    @classmethod
    def seeded(cls, seed: int) -> TinyModel:
        """A ``TinyModel`` whose weights ``seed`` decides (a trainer's new weights in tests)."""
        torch.manual_seed(seed)
        return cls()


def save_tiny_model(directory: Path, seed: int = 0) -> Path:
    """A ``TinyModel`` with seeded weights as ``model.safetensors`` in ``directory``."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({n: p.detach().clone() for n, p in TinyModel.seeded(seed).named_parameters()},
              str(directory / "model.safetensors"))
    return directory


class _Runner:
    """vLLM's model runner, as far as the worker extension uses it."""

    def __init__(self, model_dir: Path, faults: Callable[[], Faults]) -> None:
        from safetensors.torch import load_file

        self.model = TinyModel()
        self.model.load_state_dict(load_file(str(model_dir / "model.safetensors")))
        self.model_config = SimpleNamespace(model=str(model_dir), dtype=torch.float32,
                                            hf_config=SimpleNamespace(tie_word_embeddings=False))
        self._faults = faults
        self.kv_caches: list[torch.Tensor] = [torch.zeros(4, 8)]  # what ws_scrub_kv zeroes

    def get_model(self) -> torch.nn.Module:
        return self.model

    def reload_weights(self, weights_iterator: Iterator[tuple[str, torch.Tensor]] | None = None,
                       is_checkpoint_format: bool = True, weights_path: str | None = None
                       ) -> None:
        params = dict(self.model.named_parameters())
        faults = self._faults()
        with torch.no_grad():
            for i, (name, tensor) in enumerate(weights_iterator or ()):
                if faults.fail_load_after is not None and i >= faults.fail_load_after:
                    raise RuntimeError(f"loader failed at tensor {i} ({name})")
                params[name].copy_(tensor.view(params[name].shape))
            if faults.skew_load:
                params["norm.bias"].add_(1e-3)


class _Worker(WeightSyncWorkerExtension):
    def __init__(self, model_dir: Path, faults: Callable[[], Faults], rank: int = 0,
                 workers: int = 1) -> None:
        self.model_runner = _Runner(model_dir, faults)
        self.rank, self.device, self._faults = rank, torch.device("cpu"), faults
        # vLLM's parallel config as far as vllm_compat.worker_parallel reads it (the stand-in
        # model is not sharded: every worker holds all of it)
        self.parallel_config = SimpleNamespace(rank=rank, world_size=workers,
                                               tensor_parallel_size=workers,
                                               pipeline_parallel_size=1)

    @property
    def faults(self) -> Faults:
        return self._faults()


class SleepMode:
    """vLLM's sleep mode as the engine sees it (read in vLLM 0.24's ``CuMemAllocator`` and
    executor): sleep level 1 backs the weights up to host memory and level 2 does not; either
    releases them, so woken memory holds garbage (NaN here) unless it was backed up. A sleep
    while anything is still asleep is ignored, as vLLM's executor ignores it. ``calls`` records
    what the host asked for."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.asleep, self.calls = model, set(), []
        self._backup: dict[str, torch.Tensor] | None = None

    def sleep(self, level: int) -> None:
        self.calls.append(("sleep", level))
        if self.asleep:
            return
        self._backup = ({n: p.detach().clone() for n, p in self.model.named_parameters()}
                        if level == 1 else None)
        with torch.no_grad():
            for p in self.model.parameters():
                p.fill_(float("nan"))
        self.asleep = {"weights", "kv_cache"}

    def wake_up(self, tags: list[str] | None) -> None:
        self.calls.append(("wake_up", tuple(tags) if tags else None))
        waking = set(tags or self.asleep) & self.asleep
        if "weights" in waking and self._backup is not None:
            with torch.no_grad():
                for n, p in self.model.named_parameters():
                    p.copy_(self._backup[n])
        if "weights" in waking:
            self._backup = None
        self.asleep -= waking


class _Engine:
    """``AsyncLLM`` as far as ``vllm_compat`` uses it; each worker runs in a thread of its
    own, every RPC on all of them at once (one reply each, in rank order). ``paused`` is
    vLLM's scheduler: paused by a pause or a sleep, resumed by ``resume_generation`` or by a
    wake that leaves nothing asleep (vLLM's ``EngineCore.wake_up``)."""

    def __init__(self, workers: list[_Worker], sleep_mode: bool = False) -> None:
        self.workers = workers
        self.worker = workers[0]
        # one per worker (each holds its own weights); the first records the calls
        self._sleep_modes = [SleepMode(w.model_runner.model) for w in workers] \
            if sleep_mode else []
        self.sleep_mode = self._sleep_modes[0] if sleep_mode else None
        self.paused = False

    async def sleep(self, level: int = 1, mode: str = "abort") -> None:
        self.paused = True
        for m in self._sleep_modes:
            m.sleep(level)

    async def wake_up(self, tags: list[str] | None = None) -> None:
        for m in self._sleep_modes:
            m.wake_up(tags)
        if self.sleep_mode is not None and not self.sleep_mode.asleep:
            self.paused = False

    async def collective_rpc(self, method: str, args: tuple = ()) -> list[Any]:
        stall = self.workers[0].faults.stall.get(method)
        if stall:
            await asyncio.sleep(stall)
        return list(await asyncio.gather(*(asyncio.to_thread(getattr(w, method), *args)
                                           for w in self.workers)))

    async def pause_generation(self, mode: str = "abort", clear_cache: bool = True) -> None:
        self.paused = True

    async def resume_generation(self) -> None:
        self.paused = False

    async def reset_prefix_cache(self, reset_running_requests: bool = False) -> bool:
        return True

    async def reset_mm_cache(self) -> None:
        pass

    async def reset_encoder_cache(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


class _InProcess:
    """A ``weightsync.remote.Transport`` over in-process hosts, each on its own event loop:
    a call runs on its host's loop as a Ray async actor's would; a dead engine answers none."""

    def __init__(self, hosts: dict[str, EngineHost], loops: dict[str, asyncio.AbstractEventLoop],
                 faults: dict[str, Faults]) -> None:
        self._hosts, self._loops, self._faults = hosts, loops, faults

    @property
    def handles(self) -> dict[str, EngineHost]:
        return dict(self._hosts)

    def start(self, name: str, call: HostCall) -> Future:
        if self._faults[name].dead:
            fut: Future = Future()
            fut.set_exception(EngineDeadError("engine died", engine=name))
            return fut
        return asyncio.run_coroutine_threadsafe(
            _call(getattr(self._hosts[name], call.method), *call.args, **call.kwargs),
            self._loops[name])

    def resolve(self, started: Mapping[str, Future], timeout: float
                ) -> tuple[dict[str, Any], dict[str, WeightSyncError]]:
        ok: dict[str, Any] = {}
        bad: dict[str, WeightSyncError] = {}
        end = time.monotonic() + timeout
        for name, fut in started.items():
            try:
                ok[name] = fut.result(max(0.0, end - time.monotonic()))
            except FutureTimeout:
                bad[name] = EngineUnresponsive(f"no answer within {timeout:.1f}s", engine=name)
            except WeightSyncError as e:
                e.engine = e.engine or name
                bad[name] = e
        return ok, bad

    def replace(self, name: str, handle: Any) -> None:
        raise NotImplementedError("in-process engines are not restarted")


class LocalEngines(Engines):
    """``weightsync.remote.Engines`` over in-process hosts, each on its own event loop."""

    inner: _InProcess

    def __init__(self, model_dir: Path, faults: Mapping[str, Faults],
                 workers: Mapping[str, int] | None = None, *,
                 sleep_mode: bool = False, load_roots: tuple[str, ...] = ()) -> None:
        self.faults = dict(faults)
        workers = workers or {}
        self._hosts: dict[str, EngineHost] = {}
        self._loops: dict[str, asyncio.AbstractEventLoop] = {}
        for name in self.faults:
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name=f"fake-{name}", daemon=True).start()
            faults = functools.partial(self.faults.__getitem__, name)
            n = workers.get(name, 1)
            host = EngineHost(EngineSpec(name=name, model=str(model_dir), device="cpu",
                                         load_roots=load_roots),
                              make_engine=lambda f=faults, n=n, **_: _Engine(
                                  [_Worker(model_dir, f, r, n) for r in range(n)], sleep_mode))
            self._hosts[name], self._loops[name] = host, loop
            asyncio.run_coroutine_threadsafe(host.start(), loop).result(30)
            host.sleep_supported = sleep_mode  # a CPU "device" with GPU sleep semantics
        super().__init__(_InProcess(self._hosts, self._loops, self.faults))

    @property
    def handles(self) -> dict[str, EngineHost]:
        return dict(self._hosts)

    def weights(self, name: str) -> dict[str, torch.Tensor]:
        """Engine ``name``'s weights as its first worker holds them now, copied (NaN where a
        sleep released them: vLLM's woken memory without a backup)."""
        model = self._hosts[name].engine.worker.model_runner.model
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    def close(self) -> None:
        for name, loop in self._loops.items():
            asyncio.run_coroutine_threadsafe(self._hosts[name].close_channel(), loop).result(10)
            asyncio.run_coroutine_threadsafe(_cancel_all(), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)


async def _cancel_all() -> None:
    """End the loop's other tasks (lease watchdogs) before it stops."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _call(fn, *args: Any, **kwargs: Any) -> Any:
    out = fn(*args, **kwargs)
    return await out if asyncio.iscoroutine(out) else out
