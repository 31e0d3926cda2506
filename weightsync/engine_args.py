"""vLLM's engine arguments (``AsyncEngineArgs``) as the installed vLLM defines them: which
exist, their types, and which weightsync sets itself.

``config.EngineSpec`` checks a spec's ``engine_args`` here when the spec is made;
``engine.vllm_compat`` builds the engine from them. This sits below both, outside the engine
package, so that the configuration (which the transport reads too) does not import the engine.
"""

from __future__ import annotations

from typing import Any


def vllm_version() -> str:
    import vllm

    return vllm.__version__


# Engine arguments weightsync sets itself: a spec's ``engine_args`` may not name them.
OWNED_ENGINE_ARGS = {
    "model": "the model is EngineSpec.model",
    "worker_extension_cls": "weightsync's worker extension receives, verifies and loads the "
                            "weights; without it the engine cannot be synced",
    "enable_sleep_mode": "weightsync turns sleep mode on wherever vLLM supports it (CUDA) and "
                         "owns sleep and wake (the colocated loop)",
    "distributed_executor_backend": "weightsync's hosts run vLLM's own multiprocessing "
                                    "executor inside their Ray actor; a Ray executor would "
                                    "start workers the transfer groups do not know",
    "weight_transfer_config": "weightsync owns the weight transfer",
}


def _engine_arg_types() -> dict[str, Any]:
    """Every field of vLLM's ``AsyncEngineArgs`` and its type (None where it cannot be
    resolved here: then only the name is checked)."""
    import dataclasses
    import sys

    from vllm.engine.arg_utils import AsyncEngineArgs

    scope = vars(sys.modules[AsyncEngineArgs.__module__])
    types: dict[str, Any] = {}
    for f in dataclasses.fields(AsyncEngineArgs):
        tp = f.type
        if isinstance(tp, str):
            try:
                tp = eval(tp, scope)
            except Exception:  # noqa: BLE001 - an annotation only vLLM's type checker resolves
                tp = None
        types[f.name] = tp
    return types


def check_engine_args(args: dict[str, Any], typed: dict[str, str]) -> None:
    """Refuse engine arguments vLLM's ``AsyncEngineArgs`` would not take (unknown names,
    values of the wrong type: strict, so ``"yes"`` is no bool; a dict is taken for a config
    dataclass), arguments weightsync owns (``OWNED_ENGINE_ARGS``) and ones ``EngineSpec``
    has a field for (``typed``: name -> that field). Raises ``ValueError`` saying why."""
    import difflib

    from pydantic import TypeAdapter, ValidationError

    types = _engine_arg_types()
    for name, value in args.items():
        if name in OWNED_ENGINE_ARGS:
            raise ValueError(f"engine_args[{name!r}]: weightsync sets this itself "
                             f"({OWNED_ENGINE_ARGS[name]})")
        if name in typed:
            raise ValueError(f"engine_args[{name!r}]: set EngineSpec.{typed[name]} instead")
        if name not in types:
            near = difflib.get_close_matches(name, list(types), n=3)
            hint = f" (did you mean {', '.join(near)}?)" if near else ""
            raise ValueError(f"engine_args[{name!r}]: not an argument of vLLM "
                             f"{vllm_version()}'s engine{hint}")
        tp = types[name]
        if tp is None:
            continue
        adapter = TypeAdapter(tp)
        try:
            adapter.validate_python(value, strict=True)
        except ValidationError as e:
            try:
                if not isinstance(value, dict):
                    raise
                adapter.validate_python(value)  # a config dataclass given as a dict
            except ValidationError:
                first = e.errors()[0]
                raise ValueError(f"engine_args[{name!r}] = {value!r}: {first['msg']}") from None


def device_refusal(args: dict[str, Any], device: str) -> str | None:
    """Why an engine on ``device`` ("cpu", "cuda"; "auto" is decided later) cannot take these
    engine arguments, or None. FP8 quantization (``quantization`` "fp8", "fbgemm_fp8", ...)
    needs a CUDA GPU: vLLM's CPU backend has no FP8 kernels. (On a GPU, the method's own
    minimum compute capability applies: ``vllm_fp8.quantization_refusal``.)"""
    method = str(args.get("quantization") or "")
    if "fp8" in method and device == "cpu":
        return (f"quantization {method!r} needs a CUDA GPU (vLLM's CPU backend has no FP8 "
                f"kernels); this engine runs on CPU")
    return None
