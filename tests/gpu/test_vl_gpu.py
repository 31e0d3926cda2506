"""Encoder / multimodal caches across a sync of the vision tower (tiny Qwen2-VL, fp32, v2 runner).

The same image prompt before and after the vision tower changes: with the sync's cache resets
the engine follows the new weights (HF parity); with them switched off (a second engine
built by ``weightsync.testing.engines.cache_keeping_engine``) it keeps serving what the old
vision tower produced, and resetting the caches is what brings it back. The sync uses sleep_level=0 on
purpose: sleeping clears caches inside vLLM. The first two tests name the tower's tensors by hand
(``vision_tower_weights``); the last passes the whole in-memory transformers 5 module, whose
names the sync converts itself.
"""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest
import ray
import torch

from tests.gpu.parity import (
    SHARED_KV_GIB,
    changed,
    compare_with_hf,
    engine_generate,
    parity_ok,
    stop_engine,
    summary,
)
from weightsync.config import EngineSpec, TransferConfig
from weightsync.coordinator import SyncCoordinator
from weightsync.engine.actor import start_engines
from weightsync.testing.engines import cache_keeping_engine
from weightsync.testing.models import CORPUS
from weightsync.testing.reference import perturb_

pytestmark = pytest.mark.gpu

N_TOK = 12
# Long text after the image: the image tokens then sit in full KV blocks that the prefix cache
# keeps, which is how a stale cache would serve them.
IMAGE_PROMPT = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
                + " ".join(CORPUS) + "<|im_end|>\n<|im_start|>assistant\n")
TEXT_PROMPT = "the quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def vl_model(model_root):
    from weightsync.testing.models import build_vl_model

    return build_vl_model(model_root / "tiny-qwen2-vl", dtype="float32")


@pytest.fixture(scope="module")
def image():
    from PIL import Image

    rng = np.random.default_rng(0)  # 112x112: no resize anywhere, so HF and vLLM see one image
    return Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def processor(vl_model):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(vl_model)


@pytest.fixture(scope="module")
def vl_trainer(vl_model):
    from transformers import Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration.from_pretrained(
        vl_model, dtype=torch.float32).cuda().eval()


def _vl_spec(name: str, vl_model) -> EngineSpec:
    return EngineSpec(name=name, model=str(vl_model), dtype="float32", num_gpus=0.5,
                      gpu_memory_utilization=0.25, limit_mm_per_prompt={"image": 1, "video": 0},
                      max_model_len=512, enforce_eager=True, gpu_kvcache_gib=SHARED_KV_GIB)


@pytest.fixture(scope="module")
def vl_engine(gpu_ray, vl_model, vl_trainer):
    (actor,) = start_engines([_vl_spec("gpu-vl", vl_model)], timeout_s=240)
    yield actor
    stop_engine(actor)


@pytest.fixture()
def vl_engine_keeping_caches(gpu_ray, vl_model, vl_trainer):
    """A second engine of the same model whose syncs neither clear nor reset vLLM's caches:
    its engine is vLLM's with cache clears made no-ops (``testing.engines``), fixed when its
    actor is made, never a call on a running engine. (Both
    engines fit the one GPU: 0.25 of its memory each.)"""
    (actor,) = start_engines([_vl_spec("gpu-vl-keep-caches", vl_model)], timeout_s=240,
                             make_engine=cache_keeping_engine)
    yield actor
    stop_engine(actor)


@pytest.fixture(scope="module")
def vl_coord(vl_engine):
    return SyncCoordinator([vl_engine], TransferConfig(bucket_bytes=64 << 20))


def _tower(trainer) -> torch.nn.Module:
    for name in ("model.visual", "visual"):  # transformers 5 / 4 layouts
        try:
            return trainer.get_submodule(name)
        except AttributeError:
            continue
    raise AttributeError("no vision tower found")


def vision_tower_weights(trainer, model_dir) -> dict[str, torch.Tensor]:
    """The vision tower under the checkpoint's names. transformers 5 renames Qwen2-VL modules
    on load (``visual.`` -> ``model.visual.``); the engine validates against the checkpoint."""
    from safetensors import safe_open

    keys: set[str] = set()
    for f in glob.glob(os.path.join(model_dir, "*.safetensors")):
        with safe_open(f, framework="pt") as st:
            keys.update(st.keys())
    out = {}
    for name, p in trainer.named_parameters():
        if ".visual." not in f".{name}":
            continue
        for cand in (name, name.replace("model.visual.", "visual.", 1)):
            if cand in keys:
                out[cand] = p
                break
        else:
            raise KeyError(f"{name} is not in the checkpoint")
    return out


@torch.no_grad()
def _hf(trainer, processor, image):
    """HF log-softmax rows for the image prompt continued with ``tokens``."""
    def logprobs_of(_i: int, tokens: list[int]) -> torch.Tensor:
        inputs = processor(text=[IMAGE_PROMPT], images=[image], return_tensors="pt")
        n = inputs["input_ids"].shape[1]
        gen = torch.tensor([tokens])
        for k, v in list(inputs.items()):  # extend every per-token tensor by the continuation
            if torch.is_tensor(v) and v.dim() == 2 and v.shape == (1, n):
                fill = gen if k == "input_ids" else (torch.ones_like(gen) if k == "attention_mask"
                                                     else torch.zeros_like(gen))
                inputs[k] = torch.cat([v, fill.to(v.dtype)], dim=1)
        inputs = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in inputs.items()}
        logits = trainer(**inputs).logits[0, n - 1: n - 1 + len(tokens)].float()
        return torch.log_softmax(logits, -1)

    return logprobs_of


def _run(engine, image):
    img, txt = engine_generate(engine, [{"prompt": IMAGE_PROMPT,
                                         "multi_modal_data": {"image": image}}, TEXT_PROMPT],
                               max_tokens=N_TOK)
    return img, txt


def test_image_prompt_follows_a_vision_tower_sync(vl_engine, vl_coord, vl_trainer, vl_model,
                                                  processor, image, gpu_results):
    hf = _hf(vl_trainer, processor, image)
    img0, txt0 = _run(vl_engine, image)
    rows0 = compare_with_hf(hf, [img0])
    perturb_(_tower(vl_trainer), scale=0.5, seed=7)
    tower = vision_tower_weights(vl_trainer, str(vl_model))
    res = vl_coord.sync(tower, sleep_level=0, ipc=True, partial=True)
    img1, txt1 = _run(vl_engine, image)
    rows1 = compare_with_hf(hf, [img1])
    gpu_results["vl_sync"] = {
        "tensors": len(tower), "nbytes": res.nbytes, "seconds": res.engines[0].seconds,
        "parity_before": summary(rows0), "parity_after": summary(rows1),
        "image_output_changed": changed([img0], [img1]),
        "text_output_unchanged": txt0.token_ids == txt1.token_ids,
    }
    assert parity_ok(rows0), rows0  # engine == HF on the original weights
    assert res.ok and res.partial  # the tower alone, asked for explicitly
    assert parity_ok(rows1), rows1  # ... and on the new vision tower
    assert changed([img0], [img1])
    assert txt0.token_ids == txt1.token_ids  # only the vision tower moved


def test_stale_caches_are_real_and_the_reset_fixes_them(vl_engine_keeping_caches, vl_trainer,
                                                        vl_model, processor, image,
                                                        gpu_results):
    engine = vl_engine_keeping_caches
    coord = SyncCoordinator([engine], TransferConfig(bucket_bytes=64 << 20))
    hf = _hf(vl_trainer, processor, image)
    prev, _ = _run(engine, image)  # fills the prefix and encoder caches
    perturb_(_tower(vl_trainer), scale=0.5, seed=8)
    res = coord.sync(vision_tower_weights(vl_trainer, str(vl_model)), sleep_level=0,
                     ipc=True, partial=True)
    stale, _ = _run(engine, image)
    ray.get(engine.reset_caches.remote())
    fixed, _ = _run(engine, image)
    rows_stale, rows_fixed = compare_with_hf(hf, [stale]), compare_with_hf(hf, [fixed])
    gpu_results["vl_stale_cache"] = {
        "stale_equals_previous_output": not changed([prev], [stale]),
        "stale_parity_with_new_weights": summary(rows_stale),
        "after_reset_parity": summary(rows_fixed),
    }
    assert res.ok
    assert not changed([prev], [stale])  # without resets: the old vision tower's output ...
    assert not parity_ok(rows_stale)     # ... which is not what the new weights produce
    assert parity_ok(rows_fixed), rows_fixed  # the reset alone brings the new weights in
    assert changed([stale], [fixed])


def test_the_whole_in_memory_module_syncs_and_serves_hf(vl_engine, vl_coord, vl_trainer,
                                                       processor, image, gpu_results):
    """No hand-written names: the whole ``Qwen2VLForConditionalGeneration`` (``model.visual``,
    ``model.language_model`` in memory) goes to the sync, which converts its names with
    transformers' own conversion; the engine then serves HF's output for the image prompt."""
    hf = _hf(vl_trainer, processor, image)
    img0, txt0 = _run(vl_engine, image)
    perturb_(vl_trainer, scale=0.05, seed=9)  # vision tower and language model alike
    res = vl_coord.sync(vl_trainer, sleep_level=0, ipc=True)
    img1, txt1 = _run(vl_engine, image)
    rows = compare_with_hf(hf, [img1])
    gpu_results["vl_module_sync"] = {
        "tensors": len(list(vl_trainer.parameters())), "nbytes": res.nbytes,
        "seconds": res.engines[0].seconds, "layout": res.layout, "layout_note": res.layout_note,
        "parity_after": summary(rows), "image_output_changed": changed([img0], [img1]),
        "text_output_changed": changed([txt0], [txt1]),
    }
    assert res.ok and not res.partial, res  # every tensor of the model, none named by hand
    assert parity_ok(rows), rows
    assert changed([img0], [img1]) and changed([txt0], [txt1])
