"""Does a plan (or a checkpoint's headers) fit the engine's model? Pure: the worker checks every
plan against the model as it loaded it at start before anything changes (``ws_validate``,
``ws_check_files``)."""

from __future__ import annotations

from weightsync.errors import ManifestError
from weightsync.types import TensorSpec, TransferPlan

_FLOATS = {"float32", "float16", "bfloat16", "float64"}


def validate_plan(plan: TransferPlan, expected: dict[str, TensorSpec], serving_dtype: str,
                  tied_names: set[str]) -> None:
    """Raise ``ManifestError`` listing every tensor that does not fit the engine's model, or
    every tensor the model needs that the plan lacks (unless ``plan.partial``)."""
    validate_specs(plan.specs, expected, serving_dtype, tied_names, partial=plan.partial)


def validate_specs(specs: list[TensorSpec], expected: dict[str, TensorSpec], serving_dtype: str,
                   tied_names: set[str], *, partial: bool) -> None:
    """``validate_plan`` for a list of tensors (a plan's, or a checkpoint's headers).

    ``expected`` is the model as the engine loaded it at start. A complete update carries every
    tensor of it (tied copies aside); a partial one is only accepted when asked for, and never
    an empty one.
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
    if not partial:
        missing = sorted(set(expected) - tied_names - {s.name for s in specs})
        if missing:
            more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
            raise ManifestError(
                f"incomplete update: {len(missing)} of the model's {len(expected)} tensors are "
                f"missing ({', '.join(missing[:5])}{more}); ask for a partial update "
                "explicitly to change only some tensors")
