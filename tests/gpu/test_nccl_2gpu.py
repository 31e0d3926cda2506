"""Issue 8 — disaggregated NCCL broadcast: the trainer on one GPU, a v2-runner engine on
another. Needs a machine with >= 2 GPUs (nvidia-h200-x2); skipped elsewhere. Run with
``bash scripts/gpu_run.sh --install tests/gpu/test_nccl_2gpu.py`` there, with
NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 set.

Not yet run: no multi-GPU machine has been lent to this project.
"""

from __future__ import annotations

import os
import time

import pytest
import ray
import torch

from tests.gpu.parity import (
    PROMPTS,
    changed,
    compare_with_hf,
    engine_generate,
    parity_ok,
    stop_engine,
)
from weightsync.config import Deadlines, EngineSpec, TransferConfig
from weightsync.coordinator import SyncCoordinator
from weightsync.engine.actor import start_engines
from weightsync.errors import SyncFailedError
from weightsync.testing.reference import load_trainer_model, perturb_

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2,
    reason="needs 2 GPUs: trainer on one, engine on the other")]

for _k, _v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
               ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(_k, _v)


@pytest.fixture(scope="module")
def engine_gpu(gpu_ray, text_model):
    spec = EngineSpec(name="nccl-engine", model=str(text_model), dtype="float32", num_gpus=1,
                      gpu_memory_utilization=0.5, max_model_len=512, enforce_eager=True)
    (actor,) = start_engines([spec])
    engine_gpus = ray.get(actor.__ray_call__.remote(lambda self: ray.get_gpu_ids()))
    yield actor, engine_gpus
    stop_engine(actor)


def _trainer_device(engine_gpus) -> torch.device:
    free = [i for i in range(torch.cuda.device_count()) if str(i) not in map(str, engine_gpus)]
    return torch.device("cuda", free[0])


def test_nccl_sync_matches_hf(engine_gpu, text_model, tokenizer, gpu_results):
    actor, engine_gpus = engine_gpu
    device = _trainer_device(engine_gpus)
    torch.cuda.set_device(device)
    trainer = load_trainer_model(text_model, torch.float32).to(device)
    coord = SyncCoordinator([actor], TransferConfig(backend="nccl", bucket_bytes=256 << 20,
                                                    host="127.0.0.1"))
    before = engine_generate(actor, PROMPTS)
    perturb_(trainer, scale=0.01, seed=41)
    res = coord.sync(trainer)
    after = engine_generate(actor, PROMPTS)

    @torch.no_grad()
    def logprobs_of(i, tokens):
        ids = torch.tensor([tokenizer(PROMPTS[i]).input_ids + tokens], device=device)
        n = len(tokenizer(PROMPTS[i]).input_ids)
        return torch.log_softmax(trainer(ids).logits[0, n - 1: n - 1 + len(tokens)].float(), -1)

    rows = compare_with_hf(logprobs_of, after)
    gpu_results["nccl_sync"] = {"seconds": res.engines[0].seconds, "nbytes": res.nbytes,
                                "layout": res.layout}
    assert res.ok and parity_ok(rows) and changed(before, after)
    coord.close()


def test_engine_killed_mid_broadcast_fails_within_deadline(engine_gpu, text_model):
    actor, engine_gpus = engine_gpu
    device = _trainer_device(engine_gpus)
    torch.cuda.set_device(device)
    trainer = load_trainer_model(text_model, torch.float32).to(device)
    deadline = 20.0

    def kill(phase, engine):
        if phase == "bucket:1":
            ray.kill(actor, no_restart=True)
            time.sleep(3)

    coord = SyncCoordinator([actor], TransferConfig(
        backend="nccl", bucket_bytes=64 << 20,
        deadlines=Deadlines(transfer=deadline, rendezvous=deadline, verify=deadline,
                            resume=deadline)), on_phase=kill)
    t = time.monotonic()
    with pytest.raises(SyncFailedError):
        coord.sync(trainer)
    assert time.monotonic() - t < 2 * deadline  # no NCCL hang: the communicator was aborted
    coord.close()
