"""vLLM's LoRA machinery, the one place weightsync touches it (a compat module beside
``weightsync.engine.vllm_compat``): building an adapter from in-memory tensors and adding,
pinning and removing it in a worker's adapter manager, reading back what vLLM holds of it,
the ``LoRARequest`` a request names it by, and the table vLLM's OpenAI app serves adapters
from. Read against vLLM 0.32's ``vllm.lora`` (``LoRAModel.from_lora_tensors``, the LRU
worker manager, ``PEFTHelper``) and its ``OpenAIServingModels``.
"""

from __future__ import annotations

import contextlib
from typing import Any


def publish_adapters(app: Any, requests: dict[str, Any]) -> None:
    """The LoRA adapters ``app`` (``openai_app``'s) serves by model name: exactly
    ``requests`` (model name -> ``LoRARequest``, of adapters the workers hold). vLLM's serving
    routes look a request's ``model`` up in this table (``OpenAIServingModels.lora_requests``),
    generate with that ``LoRARequest`` and name it in the response's ``model``; ``/v1/models``
    lists them. vLLM's own adapter-loading routes are never reachable (``openai_guard``)."""
    table = app.state.openai_serving_models.lora_requests
    table.clear()
    table.update(requests)



def lora_request(name: str, lora_int_id: int, path: str) -> Any:
    """vLLM's ``LoRARequest`` (``path``: never read for an adapter loaded from memory)."""
    from vllm.lora.request import LoRARequest

    return LoRARequest(lora_name=name, lora_int_id=lora_int_id, lora_path=path)


def _lora_manager(worker: Any) -> Any:
    from weightsync.errors import ManifestError

    wm = getattr(worker.model_runner, "lora_manager", None)
    if wm is None:
        raise ManifestError("the engine was started without LoRA (engine_args "
                            "{'enable_lora': true, 'max_lora_rank': ..., 'max_loras': ...})")
    return wm


def add_adapter(worker: Any, lora_int_id: int, tensors: dict[str, Any],
                peft_config: dict[str, Any]) -> int:
    """Build the adapter from ``tensors`` (peft's names; fresh copies: vLLM scales B in place)
    and ``peft_config`` (peft's ``adapter_config.json`` as a dict), check it as vLLM's own
    load does (modules its model can adapt, ``PEFTHelper.validate_legal`` against the engine's
    ``max_lora_rank``: ``ManifestError``), then add and pin it. A refusal changes nothing;
    returns how many modules it adapts."""
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.lora.utils import is_base_embedding_weights, parse_fine_tuned_lora_name

    from weightsync.errors import ConfigError, ManifestError

    wm = _lora_manager(worker)
    am = wm._adapter_manager
    if lora_int_id in wm.list_adapters():
        raise ConfigError(f"LoRA id {lora_int_id} is loaded already")
    expected: set[str] = set()
    for m in am.supported_lora_modules:
        expected.update(am.packed_modules_mapping.get(m, [m]))
        if m == "experts":
            expected.add(m)
    model_ = am.model
    mapper = getattr(model_, "hf_to_vllm_mapper", None)
    mapper = mapper.get_rename_mapper() if mapper is not None else None
    skip = getattr(model_, "lora_skip_prefixes", None)
    try:
        helper = PEFTHelper.from_dict(
            {**peft_config, "vllm_max_position_embeddings": wm.max_position_embeddings})
        helper.validate_legal(wm.lora_config)
        unexpected = []
        for key in tensors:  # (``LoRAModel.from_local_checkpoint``'s check)
            if is_base_embedding_weights(key) or "base_layer" in key or (
                    skip and LoRAModel._should_skip_module(key, skip)):
                continue
            module, _ = parse_fine_tuned_lora_name(key, mapper)
            if ".experts" in module:
                name = module[module.find(".experts") + 1:]
            else:
                name = module.rsplit(".", 1)[-1]
            if name not in expected and name not in (helper.modules_to_save or ()):
                unexpected.append(module)
        if unexpected:
            raise ManifestError(f"target modules the engine's model cannot adapt: "
                                f"{unexpected[:5]} (it adapts {sorted(expected)})")
        lora = LoRAModel.from_lora_tensors(
            lora_model_id=lora_int_id, tensors={k: t.clone() for k, t in tensors.items()},
            peft_helper=helper, device="cpu", dtype=wm.lora_config.lora_dtype,
            model_vocab_size=wm.vocab_size, weights_mapper=mapper, skip_prefixes=skip)
        for check in ("_validate_moe_lora_format", "_validate_modules_to_save",
                      "_validate_token_classification_lora"):  # (those this vLLM has: 0.32's)
            validate = getattr(am, check, None)
            if validate is not None:
                validate(lora)
    except (ValueError, RuntimeError) as e:
        raise ManifestError(f"vLLM refused the adapter: {e}") from e
    with _gpu_sync_allowed():
        try:
            if len(am) + 1 > am.capacity:
                am.remove_oldest_adapter()  # an unpinned one (a request's own adapter)
            am.add_adapter(lora)
            wm.pin_adapter(lora_int_id)
        except (ValueError, RuntimeError) as e:
            wm.remove_adapter(lora_int_id)
            raise ConfigError(f"no free adapter slot for LoRA id {lora_int_id} (raise "
                              f"max_loras / max_cpu_loras): {e}") from e
    return len(lora.loras)


def adapter_held(worker: Any, lora_int_id: int) -> dict[str, tuple[Any, Any, float]]:
    """What vLLM holds of the loaded adapter ``lora_int_id`` (the ``LoRAModel`` registered in
    the worker's adapter manager, that its slots are filled from): each adapted module, packed
    ones (``qkv_proj``, ``gate_up_proj``) split back into the modules they pack, -> its
    ``(A, B, scale)``, the kernels applying ``x @ A.T @ (B * scale).T`` (vLLM folds alpha/r
    into B in place when it packs: the scale is then 1)."""
    am = _lora_manager(worker)._adapter_manager
    lora = am._registered_adapters[lora_int_id]
    out: dict[str, tuple[Any, Any, float]] = {}
    for name, w in lora.loras.items():
        if isinstance(w.lora_a, list):
            for sub, a, b, s in zip(am.packed_modules.get(name, ()), w.lora_a, w.lora_b,
                                    w.scaling, strict=False):
                if a is not None:
                    out[sub] = (a, b, float(s))
        else:
            out[name] = (w.lora_a, w.lora_b, float(w.scaling))
    return out


def adapter_module(worker: Any, tensor_name: str) -> tuple[str, bool]:
    """The module a peft adapter tensor adapts, as vLLM names it (its weights mapper
    applied), and whether it is the A matrix."""
    from vllm.lora.utils import parse_fine_tuned_lora_name

    model_ = _lora_manager(worker)._adapter_manager.model
    mapper = getattr(model_, "hf_to_vllm_mapper", None)
    mapper = mapper.get_rename_mapper() if mapper is not None else None
    module, is_a = parse_fine_tuned_lora_name(tensor_name, mapper)
    return module, bool(is_a)


def remove_adapter(worker: Any, lora_int_id: int) -> bool:
    """Unpin and remove an adapter (False if it was not loaded)."""
    return bool(_lora_manager(worker).remove_adapter(lora_int_id))


def loaded_adapters(worker: Any) -> set[int]:
    return set(_lora_manager(worker).list_adapters())


def _gpu_sync_allowed() -> Any:
    """vLLM's guard that lets this block synchronize with the GPU where vLLM has its GPU-sync
    debug mode (0.32), and nothing where it has none (0.24, the GPU box's)."""
    try:
        from vllm.utils.gpu_sync_debug import gpu_sync_allowed
    except ImportError:
        return contextlib.nullcontext()
    return gpu_sync_allowed()
