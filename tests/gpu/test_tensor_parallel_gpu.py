"""Issue 17 — tensor-parallel engines on GPUs: a TP=2 engine (one worker per GPU) fed by CUDA
IPC from a colocated trainer (a copy of the buckets on each GPU, each worker opening only its
own), by gloo, and by NCCL (trainer on a third GPU). Needs >= 2 GPUs (the NCCL test 3);
skipped elsewhere. Run this module on its own (it starts Ray with every GPU; the suite's
``gpu_ray`` has one):

    bash scripts/gpu_run.sh --install tests/gpu/test_tensor_parallel_gpu.py

with NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 set.

Not yet run: no multi-GPU machine has been lent to this project. The same protocol runs on
real TP=2 CPU engines in tests/integration/test_tensor_parallel.py.
"""

from __future__ import annotations

import os

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
from weightsync.config import EngineSpec, TransferConfig
from weightsync.coordinator import SyncCoordinator
from weightsync.engine.actor import start_engines
from weightsync.testing.reference import load_trainer_model, perturb_

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2,
    reason="needs 2 GPUs: one per tensor-parallel worker")]

for _k, _v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
               ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(_k, _v)


@pytest.fixture(scope="module")
def tp_ray():
    if ray.is_initialized():
        if ray.cluster_resources().get("GPU", 0) < 2:
            pytest.skip("run this module on its own: the suite's Ray cluster has one GPU")
        yield ray
        return
    ray.init(num_cpus=8, num_gpus=torch.cuda.device_count(), include_dashboard=False,
             log_to_driver=True, namespace="weightsync-gpu-tp")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def tp_engine(tp_ray, text_model):
    """One TP=2 engine on two GPUs, leaving room on both for a colocated trainer."""
    spec = EngineSpec(name="tp2-gpu", model=str(text_model), dtype="float32",
                      tensor_parallel_size=2, num_gpus=2, gpu_memory_utilization=0.4,
                      max_model_len=512, enforce_eager=True)
    (actor,) = start_engines([spec], timeout_s=400)
    yield actor
    stop_engine(actor)


def _parity(actor, trainer, tokenizer, device):
    outs = engine_generate(actor, PROMPTS)

    @torch.no_grad()
    def logprobs_of(i, tokens):
        ids = tokenizer(PROMPTS[i]).input_ids
        seq = torch.tensor([ids + tokens], device=device)
        return torch.log_softmax(trainer(seq).logits[0, len(ids) - 1: len(ids) - 1 + len(tokens)]
                                 .float(), -1)

    return compare_with_hf(logprobs_of, outs), outs


def test_tp2_engine_reports_two_workers_on_two_gpus(tp_engine):
    w = ray.get(tp_engine.engine_workers.remote())
    assert (w.workers, w.tensor_parallel) == (2, 2)
    assert len(set(w.device_uuids)) == 2 and None not in w.device_uuids


@pytest.mark.parametrize("reuse", [False, True])
def test_ipc_feeds_each_worker_from_its_own_gpu(tp_engine, text_model, tokenizer, gpu_results,
                                                reuse):
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    trainer = load_trainer_model(text_model, torch.float32).to(device)
    coord = SyncCoordinator([tp_engine], TransferConfig(bucket_bytes=256 << 20,
                                                        ipc_reuse_buffers=reuse))
    try:
        before = engine_generate(tp_engine, PROMPTS)
        for i in range(2):  # the second sync reuses kept buffers and mappings when asked
            perturb_(trainer, scale=0.01, seed=1700 + i)
            res = coord.sync(trainer, ipc=True)
            assert res.ok and len(res.engines[0].fingerprint.split("|")) == 2
            assert "tensor-parallel engine" in (res.layout_note or "")
        rows, after = _parity(tp_engine, trainer, tokenizer, device)
        gpu_results[f"tp2_ipc_reuse{int(reuse)}"] = {"seconds": res.engines[0].seconds,
                                                     "nbytes": res.nbytes}
        assert parity_ok(rows) and changed(before, after)
    finally:
        coord.close()
        del trainer
        torch.cuda.empty_cache()


def test_gloo_broadcast_feeds_both_gpu_workers(tp_engine, text_model, tokenizer, gpu_results):
    trainer = load_trainer_model(text_model, torch.float32)  # on the CPU: gloo sends from it
    coord = SyncCoordinator([tp_engine], TransferConfig(backend="gloo", bucket_bytes=64 << 20))
    try:
        perturb_(trainer, scale=0.01, seed=1710)
        res = coord.sync(trainer)
        assert res.ok and all(e.checksum_ok for e in res.engines)
        rows, _ = _parity(tp_engine, trainer, tokenizer, torch.device("cpu"))
        gpu_results["tp2_gloo"] = {"seconds": res.engines[0].seconds, "nbytes": res.nbytes}
        assert parity_ok(rows)
    finally:
        coord.close()


@pytest.mark.skipif(torch.cuda.device_count() < 3,
                    reason="NCCL: the trainer needs a GPU of its own besides the two workers'")
def test_nccl_broadcast_reaches_every_worker(tp_engine, text_model, tokenizer, gpu_results):
    engine_gpus = set(ray.get(tp_engine.__ray_call__.remote(lambda self: ray.get_gpu_ids())))
    free = [i for i in range(torch.cuda.device_count()) if str(i) not in map(str, engine_gpus)]
    device = torch.device("cuda", free[0])
    torch.cuda.set_device(device)
    trainer = load_trainer_model(text_model, torch.float32).to(device)
    coord = SyncCoordinator([tp_engine], TransferConfig(backend="nccl", bucket_bytes=256 << 20))
    try:
        perturb_(trainer, scale=0.01, seed=1720)
        res = coord.sync(trainer)
        rows, _ = _parity(tp_engine, trainer, tokenizer, device)
        gpu_results["tp2_nccl"] = {"seconds": res.engines[0].seconds, "nbytes": res.nbytes}
        assert res.ok and parity_ok(rows)
    finally:
        coord.close()
