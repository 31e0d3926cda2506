"""FP8 engines from a bf16 trainer (#32), as they work today: vLLM's online FP8
(``engine_args={"quantization": "fp8"}``: bf16 checkpoint, weights quantized at load) with
CUDA graphs on, synced over IPC from the bf16 trainer in this process.

The first sync goes in the checkpoint format (vLLM's layerwise reload re-quantizes on
arrival) and verifies the kernel layout, online-FP8 weights included (``transport.layout``:
each travels as its bf16 stack and the engine quantizes it into its parameter with vLLM's
``scaled_fp8_quant``); a dense model's later syncs take that layout, a MoE model with FP8
experts is refused (``vllm_compat.reload_refusal``: measured warm != cold). After five syncs the engine
must be bit-identical to a cold FP8 engine started from ``save_pretrained`` of the same
weights, and a checkpoint-format sync of the same weights must leave the same parameters
(fingerprint) as the last sync did. Also recorded: what had to be restored or rebuilt, the
sync time and phases, and the engine's device memory above its level before each sync (its
allocator's peak: the buckets are the trainer's, mapped). The second test takes two FP8
engines through a load that fails part-way on one of them and a sync into both asleep at
level 2.
"""

from __future__ import annotations

import shutil
import time

import pytest
import ray
import torch

from tests.gpu.parity import PROMPTS, against_cold, engine_generate, plain, start_colocated, stop_engine
from tests.gpu.test_warm_cold_gpu import _model, _trainer
from weightsync.config import TransferConfig
from weightsync.coordinator import SyncCoordinator
from weightsync.testing.reference import perturb_

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("kind", ["dense-tied"])
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
            mem0 = ray.get(warm.gpu_memory.remote(), timeout=60)  # (resets the peak)
            t = time.perf_counter()
            res = coord.sync(trainer, ipc=True)
            took = time.perf_counter() - t
            mem1 = ray.get(warm.gpu_memory.remote(), timeout=60)
            syncs.append({"ok": res.ok, "layout": res.layout, "note": res.layout_note,
                          "seconds": took,
                          "rebuilt": sorted({n for e in res.engines for n in e.rebuilt}),
                          "phases": res.engines[0].seconds,
                          # the engine's allocator above its level before the sync (the
                          # buckets are the trainer's, mapped: not counted here)
                          "engine_extra_bytes": mem1.peak_allocated - mem0.allocated,
                          "engine_allocated_after": mem1.allocated})
            data["syncs"] = syncs
            assert res.ok, res
        warm_out = plain(engine_generate(warm, PROMPTS))
        # the same weights through vLLM's own loader (layerwise reload, re-quantizing)
        ckpt = SyncCoordinator([warm], TransferConfig(bucket_bytes=256 << 20,
                                                      layout="checkpoint"))
        try:
            slow = ckpt.sync(trainer, ipc=True)
        finally:
            ckpt.close()
        data["same_fingerprint_as_checkpoint_format"] = \
            slow.engines[0].fingerprint == res.engines[0].fingerprint
        print(f"fp8 {kind}: layouts {[x['layout'] for x in syncs]}, seconds "
              f"{[round(x['seconds'], 4) for x in syncs]}, same fingerprint as the checkpoint "
              f"format {data['same_fingerprint_as_checkpoint_format']}", flush=True)
        trainer.save_pretrained(path)
    finally:
        coord.close()
    if kind.startswith("dense"):
        assert [x["layout"] for x in syncs[1:]] == ["kernel"] * 4, syncs
    assert slow.ok and data["same_fingerprint_as_checkpoint_format"], data
    found = against_cold(warm, warm_out, lambda: start_colocated(
        f"fp8-cold-{kind}", path, "bfloat16", enforce_eager=False,
        gpu_memory_utilization=0.25, **fp8))
    cold_out = found.pop("cold_out")
    data.update(found, changed_by_sync=[w != b for w, b in zip(warm_out, before, strict=True)],
                sync_seconds_p50=sorted(s["seconds"] for s in syncs[1:])[len(syncs[1:]) // 2])
    assert data["warm_repeatable"], "the warm engine is not repeatable run to run"
    assert warm_out == cold_out, data


def test_an_fp8_moe_engine_refuses_a_sync_before_anything_changes(gpu_ray, model_root, tmp_path,
                                                                  gpu_results):
    """A Qwen3-MoE-shaped online-FP8 engine (CUDA graphs, batch invariant). At e0b5133 it took
    5 syncs, repeatable, with the same fingerprint as vLLM's own reload of those weights, but
    answered up to 0.089 in logprob apart from a cold FP8 engine of the same weights
    (``gpu-fp8.json``, ``moe-before-refusal``): vLLM 0.24's reload does not refresh all the
    MoE kernel reads. So such an engine refuses syncs (``vllm_compat.reload_refusal``):
    ``ConfigError`` before anything changes, and it keeps serving what it served."""
    from weightsync.errors import ConfigError

    path = tmp_path / "model"
    shutil.copytree(_model("moe", model_root), path)
    trainer = _trainer("moe", path)
    engine = start_colocated("fp8-moe", path, "bfloat16", enforce_eager=False,
                             gpu_memory_utilization=0.25, batch_invariant=True,
                             engine_args={"quantization": "fp8"})
    coord = SyncCoordinator([engine], TransferConfig(bucket_bytes=256 << 20,
                                                     ipc_reuse_buffers=True))
    try:
        before = plain(engine_generate(engine, PROMPTS))
        perturb_(trainer, scale=0.02, seed=700)
        with pytest.raises(ConfigError, match="MoE experts quantized to FP8") as refused:
            coord.sync(trainer, ipc=True)
        st = ray.get(engine.status.remote(), timeout=60)
        gpu_results.setdefault("fp8", {})["moe-refused"] = {
            "error": str(refused.value)[:400], "state": st.state.value, "version": st.version}
        assert st.state.value == "serving" and st.version == 0, st
        assert plain(engine_generate(engine, PROMPTS)) == before
    finally:
        coord.close()
        stop_engine(engine)


@pytest.mark.parametrize("mode", ["eager", "graphs"])
def test_fp8_moe_engine_synced_with_the_refusal_lifted_against_a_cold_one(
        gpu_ray, model_root, tmp_path, gpu_results, mode):
    """The measurement behind the FP8 MoE refusal, repeated tensor by tensor: a Qwen3-MoE-
    shaped online-FP8 engine (batch invariant) that takes syncs anyway
    (``weightsync.testing.unguarded``), 3 syncs in the checkpoint format (vLLM's layerwise
    reload), then a cold FP8 engine of the same spec on the same weights. Recorded: the
    outputs' difference and every tensor the two engines' kernels read that differs
    (``engine.kernel_reads``), eager and with CUDA graphs. Asserted: what the refusal
    assumes, that the warm engine is not equal to the cold one; when vLLM fixes its reload,
    this fails and the refusal can go."""
    from weightsync.testing.unguarded import unguarded_engine

    path = tmp_path / "model"
    shutil.copytree(_model("moe", model_root), path)
    trainer = _trainer("moe", path)
    spec = {"enforce_eager": mode == "eager", "gpu_memory_utilization": 0.25,
            "batch_invariant": True, "engine_args": {"quantization": "fp8"}}
    warm = start_colocated(f"fp8-moe-lifted-{mode}", path, "bfloat16",
                           make_engine=unguarded_engine(), **spec)
    data = gpu_results.setdefault("fp8", {})[f"moe-refusal-lifted-{mode}"] = {}
    coord = SyncCoordinator([warm], TransferConfig(bucket_bytes=256 << 20,
                                                   ipc_reuse_buffers=True))
    try:
        before = plain(engine_generate(warm, PROMPTS))
        syncs = []
        for i in range(3):
            perturb_(trainer, scale=0.02, seed=900 + i)
            torch.cuda.synchronize()
            res = coord.sync(trainer, ipc=True)
            syncs.append({"ok": res.ok, "layout": res.layout, "rebuilt": sorted(
                {n for e in res.engines for n in e.rebuilt})})
            data["syncs"] = syncs
            assert res.ok, res
        warm_out = plain(engine_generate(warm, PROMPTS))
        trainer.save_pretrained(path)
    finally:
        coord.close()
    found = against_cold(warm, warm_out, lambda: start_colocated(
        f"fp8-moe-lifted-cold-{mode}", path, "bfloat16", **spec))
    cold_out = found.pop("cold_out")
    data.update(found, changed_by_sync=[w != b for w, b in zip(warm_out, before, strict=True)])
    print(f"fp8 moe, refusal lifted, {mode}: {data}", flush=True)
    assert warm_out != cold_out, data


def test_fp8_engine_after_a_failed_load_and_a_level2_sleep_equals_a_cold_one(
        gpu_ray, model_root, tmp_path, gpu_results):
    """Two online-FP8 engines with CUDA graphs, the second one's loader failing part-way
    through its second load (``weightsync.testing.failing_load``: vLLM has re-quantized the
    layers it completed when the error comes). Sync 2 fails on that engine alone: it is
    fenced with the loader's error and serves nothing, while the other takes v2. Sync 3
    brings it back. Then both sleep at level 2 (vLLM discards the FP8 weights and scales) and
    sync 4 goes into them: both wake serving. Both then equal a cold FP8 engine started from
    ``save_pretrained`` of the trainer's weights, bit for bit."""
    from weightsync.errors import SyncFailedError
    from weightsync.testing.failing_load import failing_load_engine

    path = tmp_path / "model"
    shutil.copytree(_model("dense-tied", model_root), path)
    trainer = _trainer("dense-tied", path)
    spec = {"engine_args": {"quantization": "fp8"}, "enforce_eager": False,
            "gpu_memory_utilization": 0.2}
    a = start_colocated("fp8-a", path, "bfloat16", **spec)
    b = start_colocated("fp8-b", path, "bfloat16", **spec,
                        make_engine=failing_load_engine(load=2, after=40))
    data = gpu_results.setdefault("fp8", {})["failed-load-and-level2"] = {}
    coord = SyncCoordinator([a, b], TransferConfig(bucket_bytes=256 << 20,
                                                   ipc_reuse_buffers=True))
    try:
        assert coord.sync(trainer, ipc=True).ok
        perturb_(trainer, scale=0.02, seed=801)
        with pytest.raises(SyncFailedError) as failed:
            coord.sync(trainer, ipc=True)
        by = {r.engine: r for r in failed.value.result.engines}
        data["failed_sync"] = {n: {"ok": r.ok, "fenced": r.fenced, "error": r.error}
                               for n, r in by.items()}
        assert by["fp8-a"].ok and not by["fp8-a"].fenced, by
        assert by["fp8-b"].fenced and "injected: load 2" in (by["fp8-b"].error or ""), by
        st_b = ray.get(b.status.remote(), timeout=60)
        assert st_b.state.value == "fenced" and "injected" in (st_b.fenced_reason or "")
        with pytest.raises(Exception, match="fenced"):
            engine_generate(b, PROMPTS)
        assert ray.get(a.status.remote(), timeout=60).version == failed.value.result.version
        perturb_(trainer, scale=0.02, seed=802)
        res = coord.sync(trainer, ipc=True)
        assert res.ok, res
        data["resync"] = {"layout": res.layout, "rebuilt": sorted(
            {x for e in res.engines for x in e.rebuilt})}
        coord.sleep(level=2)
        perturb_(trainer, scale=0.02, seed=803)
        res = coord.sync(trainer, ipc=True)
        assert res.ok and {s.state.value for s in coord.statuses()} == {"serving"}, res
        data["level2_sync"] = {"layout": res.layout, "seconds": res.seconds,
                               "rebuilt": sorted({x for e in res.engines for x in e.rebuilt})}
        out_a, out_b = plain(engine_generate(a, PROMPTS)), plain(engine_generate(b, PROMPTS))
        trainer.save_pretrained(path)
    finally:
        coord.close()
    stop_engine(b)
    found = against_cold(a, out_a, lambda: start_colocated("fp8-cold-2", path, "bfloat16",
                                                           **spec))
    cold_out = found.pop("cold_out")
    data.update(found, b_equals_a=out_b == out_a)
    assert out_b == out_a, data
    assert out_a == cold_out, data
