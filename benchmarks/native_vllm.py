"""Baseline: vLLM's own IPC weight-transfer API on the same model and weights (GPU only).

``weight_transfer_config={"backend": "ipc"}`` + ``start_weight_update`` /
``IPCWeightTransferEngine.trainer_send_weights`` / ``finish_weight_update``, timed from the
trainer exactly like a weightsync sync's transfer + reload. Benchmark code: it imports vLLM's
public weight-transfer API directly, which the library itself never does.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import ray


@ray.remote
class NativeIpcEngine:
    async def start(self, model: str, dtype: str, gpu_memory_utilization: float) -> None:
        import os

        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "1")
        # the worker unpickles the IPC handles (``ipc_handles_pickled``, as vLLM's own HTTP
        # transport sends them): msgspec cannot carry rebuild_cuda_tensor's args (classes,
        # dtypes) through collective_rpc, and vLLM refuses the pickle without this switch
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
            model=model, dtype=dtype, enforce_eager=True, max_model_len=512,
            gpu_memory_utilization=gpu_memory_utilization,
            weight_transfer_config={"backend": "ipc"}))
        await self.engine.init_weight_transfer_engine(WeightTransferInitRequest(init_info={}))

    async def start_update(self) -> None:
        await self.engine.start_weight_update(is_checkpoint_format=True)

    async def update(self, info: dict) -> None:
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        await self.engine.update_weights(WeightTransferUpdateRequest(update_info=info))

    async def finish(self) -> None:
        await self.engine.finish_weight_update()

    async def shutdown(self) -> None:
        self.engine.shutdown()


def native_ipc_syncs(model_dir: str, dtype: str, policy, rounds: int, packed: bool,
                     gpu_memory_utilization: float = 0.4) -> list[float]:
    """Seconds per sync (start + send + finish) through vLLM's native IPC API."""
    import base64
    import pickle

    import torch
    from vllm.distributed.weight_transfer.ipc_engine import IPCWeightTransferEngine

    # the benchmark's own engines were just shut down: wait until their memory is back, or
    # vLLM refuses to start (free memory below gpu_memory_utilization)
    total = torch.cuda.mem_get_info()[1]
    end = time.monotonic() + 60
    while torch.cuda.mem_get_info()[0] < (gpu_memory_utilization + 0.02) * total \
            and time.monotonic() < end:
        time.sleep(0.5)
    actor = NativeIpcEngine.options(num_gpus=0.5).remote()
    ray.get(actor.start.remote(model_dir, dtype, gpu_memory_utilization))

    def send(info) -> None:
        fields = asdict(info)
        handles = fields.pop("ipc_handles")
        fields["ipc_handles_pickled"] = base64.b64encode(pickle.dumps(handles)).decode()
        ray.get(actor.update.remote(fields))

    times = []
    try:
        for i in range(rounds + 1):
            torch.cuda.synchronize()
            t = time.perf_counter()
            ray.get(actor.start_update.remote())
            IPCWeightTransferEngine.trainer_send_weights(
                iter(policy.named_parameters()), {"send_mode": send, "packed": packed})
            ray.get(actor.finish.remote())
            if i:
                times.append(time.perf_counter() - t)
    finally:
        try:
            ray.get(actor.shutdown.remote(), timeout=60)
        finally:
            ray.kill(actor)
    return times
