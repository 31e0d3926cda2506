"""vLLM 0.24's own OpenAI app around a GPU engine (``EngineHost.serve_openai``: the 0.24 layout
of ``vllm_compat.openai_app``), through the real ``openai`` client: a completion stamped with the
engine's version, the same after a colocated IPC sync with the new version, and a route outside
the allowlist refused."""

from __future__ import annotations

import httpx
import openai
import pytest
import ray
import torch

from tests.gpu.parity import start_colocated, stop_engine
from weightsync.config import TransferConfig
from weightsync.coordinator import SyncCoordinator
from weightsync.testing.reference import load_trainer_model, perturb_

pytestmark = pytest.mark.gpu
TOKEN = "gpu-openai-token"


def test_vllm_024_openai_app_serves_and_stamps_versions(gpu_ray, text_model, gpu_results):
    policy = load_trainer_model(text_model, torch.float32).cuda()
    engine = start_colocated("gpu-openai", text_model, "float32", gpu_memory_utilization=0.25)
    coord = SyncCoordinator([engine], TransferConfig(bucket_bytes=1 << 24))
    try:
        url = ray.get(engine.serve_openai.remote(TOKEN, host="127.0.0.1"), timeout=300)
        with openai.OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0,
                           timeout=120) as client:
            model = client.models.list().data[0].id
            first = client.completions.create(model=model, prompt="the quick brown fox",
                                              max_tokens=8, temperature=0)
            assert first.model_extra["weight_version"] == 0
            perturb_(policy, scale=0.2, seed=3)
            res = coord.sync(policy, ipc=True)
            assert res.ok
            after = client.completions.create(model=model, prompt="the quick brown fox",
                                              max_tokens=8, temperature=0)
            assert after.model_extra["weight_version"] == res.version
        r = httpx.post(f"{url}/collective_rpc", json={}, timeout=30,
                       headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 404
        gpu_results["openai_024"] = {
            "url_scheme": url.split(":")[0], "versions": [0, res.version],
            "texts_differ": first.choices[0].text != after.choices[0].text}
    finally:
        coord.close()
        stop_engine(engine)
