"""The kernel-layout fast path on the GPU: verified against vLLM's own loader, then used;
bit-identical loaded weights to the checkpoint-format path; timings of both paths."""

from __future__ import annotations

import pytest
import ray
import torch

from tests.gpu.parity import PROMPTS, changed, engine_generate, start_colocated, stop_engine
from weightsync.config import TransferConfig
from weightsync.coordinator import SyncCoordinator
from weightsync.testing.reference import load_trainer_model, perturb_

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def fast_engine(gpu_ray, text_model):
    actor = start_colocated("gpu-fast", text_model, "bfloat16")
    yield actor
    stop_engine(actor)


def _phases(res):
    s = res.engines[0].seconds
    return {"transfer": s.get("transfer"), "reload": s.get("reload"),
            "finite": s.get("transfer.finite"),
            "transfer+reload": s.get("transfer+reload"),
            "total": res.seconds.get("total"), "layout": res.layout}


def test_kernel_layout_is_verified_then_used_and_loads_identical_weights(
        fast_engine, text_model, gpu_results):
    trainer = load_trainer_model(text_model, torch.bfloat16).cuda()
    # buffers, mappings and copy targets kept across syncs: the fastest path, checked here
    auto = SyncCoordinator([fast_engine], TransferConfig(bucket_bytes=256 << 20,
                                                         ipc_reuse_buffers=True,
                                                         ipc_direct=True))
    ckpt = SyncCoordinator([fast_engine], TransferConfig(bucket_bytes=256 << 20,
                                                         layout="checkpoint"))
    first = auto.sync(trainer, ipc=True)
    assert first.ok and first.layout == "checkpoint" and "not yet verified" in first.layout_note
    status = ray.get(fast_engine.kernel_layout.remote())
    assert status.verified, status.reason
    rows = []
    for i in range(6):
        perturb_(trainer, scale=0.01, seed=900 + i)
        before = engine_generate(fast_engine, PROMPTS)
        torch.cuda.synchronize()
        fast = auto.sync(trainer, ipc=True)
        assert fast.ok and fast.layout == "kernel", fast.layout_note
        # the engine copied from the trainer's own tensors (no packed copy)
        assert auto._leg("ipc").direct_note is None, auto._leg("ipc").direct_note
        after = engine_generate(fast_engine, PROMPTS)
        assert changed(before, after)
        slow = ckpt.sync(trainer, ipc=True)  # the same weights through vLLM's loaders
        assert slow.ok and slow.layout == "checkpoint"
        # both paths leave bit-identical parameters in the engine
        assert fast.engines[0].fingerprint == slow.engines[0].fingerprint
        assert [o.token_ids for o in engine_generate(fast_engine, PROMPTS)] == \
            [o.token_ids for o in after]
        rows.append({"kernel": _phases(fast), "checkpoint": _phases(slow)})
    gpu_results["fast_path"] = rows
    warm = rows[1:]
    med = lambda key, path: sorted(r[path][key] for r in warm)[len(warm) // 2]  # noqa: E731
    gpu_results["fast_path_p50"] = {
        p: {k: med(k, p) for k in ("transfer", "reload", "transfer+reload", "total")}
        for p in ("kernel", "checkpoint")}


@pytest.mark.parametrize("direct", [False, True], ids=["packed", "direct"])
def test_ipc_bucket_that_differs_from_the_senders_checksum_is_refused_or_fenced(
        fast_engine, text_model, direct):
    """One engine in the wave loads in the same call as it maps (atomic). Packed: it must
    still refuse a bucket whose checksum differs from the sender's, load nothing, and go on
    serving its old version (rolled back, not fenced). ``direct`` (the kernel layout read
    from the trainer's own tensors): the engine checksums every piece as it copies it, so the
    mismatch is found with the parameters overwritten — it is fenced, serves nothing, and
    the next sync brings it back. The lying sync goes by the ``ipc-false-checksums`` leg
    (``weightsync.testing.faulty``): the IPC leg, given a checksum function that flips a bit
    of every term it tells the engines; the engine's receiver is the IPC leg's own."""
    from weightsync.errors import SyncFailedError

    trainer = load_trainer_model(text_model, torch.bfloat16).cuda()
    coord = SyncCoordinator([fast_engine], TransferConfig(bucket_bytes=256 << 20,
                                                          ipc_direct=direct))
    assert coord.sync(trainer, ipc=True).ok
    if direct:  # the layout is verified (the first test did): kernel layout, read in place
        res = coord.sync(trainer, ipc=True)
        assert res.ok and res.layout == "kernel" and coord._leg("ipc").direct_note is None
    before = engine_generate(fast_engine, PROMPTS)
    version = ray.get(fast_engine.status.remote()).version
    perturb_(trainer, scale=0.05, seed=4242)
    with pytest.raises(SyncFailedError) as info:
        coord.sync(trainer, leg="ipc-false-checksums")
    rep = info.value.result.engines[0]
    assert (coord._leg("ipc-false-checksums").direct_note is None) == direct
    status = ray.get(fast_engine.status.remote())
    if direct:
        assert not rep.ok and rep.fenced and "differ from its checksum" in rep.error
        assert status.state.value == "fenced" and status.version == version
    else:
        assert not rep.ok and not rep.fenced and "rolled back" in rep.error
        assert "checksum" in rep.error
        assert status.state.value == "serving" and status.version == version
        assert [o.token_ids for o in engine_generate(fast_engine, PROMPTS)] == \
            [o.token_ids for o in before]
    assert coord.sync(trainer, ipc=True).ok  # and the next sync goes through


def test_a_nan_in_the_trainers_tensors_is_refused_before_the_direct_copy(fast_engine,
                                                                        text_model):
    """Direct IPC (the engine copies from the trainer's own tensors): a NaN in one weight is
    found by the sender's checksum launch (the same reads) and refused by the engine before
    it copies anything: it still serves its version, token for token, and names the weight."""
    from weightsync.errors import SyncFailedError

    trainer = load_trainer_model(text_model, torch.bfloat16).cuda()
    coord = SyncCoordinator([fast_engine], TransferConfig(bucket_bytes=256 << 20,
                                                          ipc_direct=True))
    assert coord.sync(trainer, ipc=True).ok
    res = coord.sync(trainer, ipc=True)
    assert res.ok and res.layout == "kernel" and coord._leg("ipc").direct_note is None
    assert 0 <= res.engines[0].seconds["transfer.finite"] <= res.engines[0].seconds["reload"]
    before = engine_generate(fast_engine, PROMPTS)
    version = ray.get(fast_engine.status.remote()).version
    name, param = next((n, p) for n, p in trainer.named_parameters() if "mlp" in n)
    with torch.no_grad():
        param.view(-1)[param.numel() // 2] = float("nan")
    with pytest.raises(SyncFailedError) as info:
        coord.sync(trainer, ipc=True)
    rep = info.value.result.engines[0]
    assert not rep.ok and not rep.fenced and "non-finite" in rep.error, rep.error
    assert "mlp" in rep.error  # (the engine's weight it would have gone into)
    assert coord._leg("ipc").direct_note is None  # (it was the direct path that refused)
    status = ray.get(fast_engine.status.remote())
    assert status.state.value == "serving" and status.version == version
    assert [o.token_ids for o in engine_generate(fast_engine, PROMPTS)] == \
        [o.token_ids for o in before]
    with torch.no_grad():
        param.view(-1)[param.numel() // 2] = 0.0
    assert coord.sync(trainer, ipc=True).ok
