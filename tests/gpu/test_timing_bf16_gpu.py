"""Per-phase sync timings in bf16 — the dtype RL fleets serve — on the same Qwen2.5-0.5B-shaped
model (0.99 GB), comparable with earlier bf16 probes. No HF parity here: in bf16 these random
weights move logprobs by more than the tolerance (see test_text_gpu); the checks are that every
sync verifies, loads different weights (fingerprint) and changes the output."""

from __future__ import annotations

import pytest
import ray
import torch

from tests.gpu.parity import PROMPTS, changed, engine_generate, start_colocated, stop_engine
from weightsync.config import TransferConfig
from weightsync.coordinator import SyncCoordinator
from weightsync.testing.reference import perturb_

pytestmark = [pytest.mark.gpu, pytest.mark.gpu_exclusive]  # device-wide memory and timings

LEVELS = [2, 1, 2, 1, 2, 1]


@pytest.fixture(scope="module")
def bf16_trainer(text_model):
    from weightsync.testing.reference import load_trainer_model

    return load_trainer_model(text_model, torch.bfloat16).cuda()


@pytest.fixture(scope="module")
def bf16_engine(gpu_ray, text_model, bf16_trainer):
    actor = start_colocated("gpu-bf16", text_model, "bfloat16", gpu_kvcache_gib=None)
    yield actor
    stop_engine(actor)


def test_bf16_ipc_sync_phase_timings(bf16_engine, bf16_trainer, gpu_results):
    coord = SyncCoordinator([bf16_engine], TransferConfig(bucket_bytes=256 << 20))
    runs = []
    gpu_results["bf16_syncs"] = runs
    prints = set()
    for i, level in enumerate(LEVELS):
        before = engine_generate(bf16_engine, PROMPTS)
        perturb_(bf16_trainer, scale=0.01, seed=200 + i)
        torch.cuda.empty_cache()
        res = coord.sync(bf16_trainer, sleep_level=level, ipc=True)
        after = engine_generate(bf16_engine, PROMPTS)
        rep = res.engines[0]
        prints.add(rep.fingerprint)
        runs.append({"sleep_level": level, "ok": res.ok, "nbytes": res.nbytes,
                     "seconds": rep.seconds, "coordinator_total_s": res.seconds.get("total"),
                     "changed": changed(before, after),
                     "free_after_sleep": ray.get(bf16_engine.memory_after_sleep.remote()).free})
    assert all(r["ok"] for r in runs)
    assert len(prints) == len(LEVELS)  # every sync loaded different weights
    assert all(r["changed"] for r in runs)
