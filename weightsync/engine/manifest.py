"""Does a plan (or a checkpoint's headers) fit the engine's model? Pure: the worker checks every
plan against the model as it loaded it at start before anything changes (``ws_validate``,
``ws_check_files``)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from weightsync.errors import ManifestError
from weightsync.types import TensorSpec, TransferPlan

_FLOATS = {"float32", "float16", "bfloat16", "float64"}
_EXPERT = re.compile(r"^(?P<experts>.*\.experts)\.\d+(\..*)?$")  # "...mlp.experts.<e>.<proj>"


def validate_plan(plan: TransferPlan, expected: dict[str, TensorSpec], serving_dtype: str,
                  tied_names: set[str], packed: Mapping[str, Sequence[str]] | None = None
                  ) -> None:
    """Raise ``ManifestError`` listing every tensor that does not fit the engine's model, or
    every tensor the model needs that the plan lacks (unless ``plan.partial``)."""
    validate_specs(plan.specs, expected, serving_dtype, tied_names, partial=plan.partial,
                   packed=packed)


def layer_of(name: str, packed: Mapping[str, Sequence[str]]) -> str:
    """The vLLM module a checkpoint tensor loads into: its own module, the fused one of
    ``packed`` (the model's ``packed_modules_mapping``: ``q_proj`` -> ``qkv_proj``), or, for a
    routed expert's tensor, the layer's fused experts (``...mlp.experts``)."""
    module = name.rpartition(".")[0]
    expert = _EXPERT.match(module)
    if expert is not None:
        return expert.group("experts")
    parent, _, leaf = module.rpartition(".")
    leaf = next((fused for fused, parts in packed.items() if leaf in parts), leaf)
    return f"{parent}.{leaf}" if parent else leaf


def split_layers(sent: Iterable[str], expected: Iterable[str], tied_names: set[str],
                 packed: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """The layers a partial update touches without carrying all of their tensors: layer ->
    the tensors of it not sent. vLLM reloads a layer in place from all of its tensors
    (``model_loader.reload``): one it got only part of is rebuilt from a fresh, uninitialized
    tensor with the parts sent copied in, so the parts not sent would be garbage (measured on
    vLLM 0.32's CPU engine: ``q_proj`` alone, a third of ``qkv_proj``)."""
    by_layer: dict[str, list[str]] = {}
    for n in expected:
        if n not in tied_names:
            by_layer.setdefault(layer_of(n, packed), []).append(n)
    got = set(sent)
    out = {}
    for layer in sorted({layer_of(n, packed) for n in got}):
        missing = sorted(n for n in by_layer.get(layer, ()) if n not in got)
        if missing:
            out[layer] = missing
    return out


def validate_specs(specs: list[TensorSpec], expected: dict[str, TensorSpec], serving_dtype: str,
                   tied_names: set[str], *, partial: bool,
                   packed: Mapping[str, Sequence[str]] | None = None) -> None:
    """``validate_plan`` for a list of tensors (a plan's, or a checkpoint's headers).

    ``expected`` is the model as the engine loaded it at start. A complete update carries every
    tensor of it (tied copies aside); a partial one is only accepted when asked for, and never
    an empty one; given ``packed``, it must carry whole layers (``split_layers``).
    """
    if not specs:
        raise ManifestError("no tensors: an update must carry at least one tensor")
    problems: list[str] = []
    for spec in specs:
        want = expected.get(spec.name)
        if want is None:
            if spec.name in tied_names:
                continue
            problems.append(f"unknown parameter {spec.name!r}")
        elif tuple(want.shape) != tuple(spec.shape):
            problems.append(f"{spec.name}: shape {list(spec.shape)} != engine's {list(want.shape)}")
        elif spec.dtype != want.dtype and not (
            want.dtype in _FLOATS and spec.dtype in {serving_dtype, "float32"}
        ):
            # Floats may arrive in the serving dtype or as fp32 master weights (vLLM casts);
            # anything else is a mistake worth stopping for.
            problems.append(f"{spec.name}: dtype {spec.dtype} != engine's {want.dtype} "
                            f"(serving {serving_dtype})")
    if problems:
        more = f" (+{len(problems) - 10} more)" if len(problems) > 10 else ""
        raise ManifestError(f"{len(problems)} tensor(s) do not fit the model: "
                            + "; ".join(problems[:10]) + more)
    if partial and packed is not None:
        split = split_layers((s.name for s in specs), expected, tied_names, packed)
        if split:
            parts = "; ".join(f"{layer} also needs {', '.join(names[:4])}"
                              + (f" (+{len(names) - 4} more)" if len(names) > 4 else "")
                              for layer, names in list(split.items())[:5])
            raise ManifestError(
                f"a partial update must carry whole layers ({len(split)} split): vLLM reloads "
                f"a layer from all of its tensors, and the parts not sent would be left "
                f"uninitialized: {parts}")
    if not partial:
        missing = sorted(set(expected) - tied_names - {s.name for s in specs})
        if missing:
            more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
            raise ManifestError(
                f"incomplete update: {len(missing)} of the model's {len(expected)} tensors are "
                f"missing ({', '.join(missing[:5])}{more}); ask for a partial update "
                "explicitly to change only some tensors")
