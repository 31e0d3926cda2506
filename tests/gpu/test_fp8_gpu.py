"""FP8 engines from a bf16 trainer (#32), as they work today: vLLM's online FP8
(``engine_args={"quantization": "fp8"}``: bf16 checkpoint, weights quantized at load) with
CUDA graphs on, synced over IPC from the bf16 trainer in this process.

What this measures, before any FP8-specific code: whether weightsync's checkpoint-format
sync (vLLM's layerwise reload re-quantizes on arrival) leaves the engine bit-identical to a
cold FP8 engine started from ``save_pretrained`` of the same weights; which layout each sync
took (the kernel layout must not be derived for quantized weights); what had to be restored
or rebuilt; and the sync time next to the same model's bf16 engine. Five syncs each.
"""

from __future__ import annotations

import shutil
import time

import pytest
import torch

from tests.gpu.parity import PROMPTS, against_cold, engine_generate, plain, start_colocated
from tests.gpu.test_warm_cold_gpu import _model, _trainer
from weightsync.config import TransferConfig
from weightsync.coordinator import SyncCoordinator
from weightsync.testing.reference import perturb_

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("kind", ["dense-tied", "moe"])
def test_fp8_engine_synced_from_bf16_equals_a_cold_fp8_engine(gpu_ray, model_root, tmp_path,
                                                               gpu_results, kind):
    src = _model(kind, model_root)
    path = tmp_path / "model"
    shutil.copytree(src, path)
    trainer = _trainer(kind, path)
    fp8 = {"engine_args": {"quantization": "fp8"}}
    warm = start_colocated(f"fp8-warm-{kind}", path, "bfloat16", enforce_eager=False,
                           gpu_memory_utilization=0.25, **fp8)
    data = gpu_results.setdefault("fp8", {})[kind] = {}
    coord = SyncCoordinator([warm], TransferConfig(bucket_bytes=256 << 20,
                                                   ipc_reuse_buffers=True))
    try:
        before = plain(engine_generate(warm, PROMPTS))
        syncs = []
        for i in range(5):
            perturb_(trainer, scale=0.02, seed=700 + i)
            torch.cuda.synchronize()
            t = time.perf_counter()
            res = coord.sync(trainer, ipc=True)
            took = time.perf_counter() - t
            syncs.append({"ok": res.ok, "layout": res.layout, "note": res.layout_note,
                          "seconds": took,
                          "rebuilt": sorted({n for e in res.engines for n in e.rebuilt}),
                          "phases": res.engines[0].seconds})
            data["syncs"] = syncs
            assert res.ok, res
        warm_out = plain(engine_generate(warm, PROMPTS))
        trainer.save_pretrained(path)
    finally:
        coord.close()
    found = against_cold(warm, warm_out, lambda: start_colocated(
        f"fp8-cold-{kind}", path, "bfloat16", enforce_eager=False,
        gpu_memory_utilization=0.25, **fp8))
    cold_out = found.pop("cold_out")
    data.update(found, changed_by_sync=[w != b for w, b in zip(warm_out, before, strict=True)],
                sync_seconds_p50=sorted(s["seconds"] for s in syncs[1:])[len(syncs[1:]) // 2])
    assert data["warm_repeatable"], "the warm engine is not repeatable run to run"
    assert warm_out == cold_out, data
