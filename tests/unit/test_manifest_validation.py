import pytest
import torch

from weightsync.checkpoint import read_checkpoint
from weightsync.engine.manifest import validate_plan
from weightsync.errors import ManifestError
from weightsync.transport.packing import plan_buckets, spec_of
from weightsync.types import TensorSpec


def _expected():
    return {
        "w": TensorSpec(name="w", dtype="bfloat16", shape=(4, 4)),
        "ids": TensorSpec(name="ids", dtype="int64", shape=(3,)),
    }


def _plan(partial: bool = False, **ts):
    plan = plan_buckets([spec_of(n, t) for n, t in ts.items()], 1 << 20, 1)
    return plan.model_copy(update={"partial": partial})


IDS = torch.zeros(3, dtype=torch.int64)


def test_accepts_serving_dtype_and_fp32_master_weights():
    validate_plan(_plan(w=torch.zeros(4, 4, dtype=torch.bfloat16), ids=IDS), _expected(),
                  "bfloat16", set())
    validate_plan(_plan(w=torch.zeros(4, 4), ids=IDS), _expected(), "bfloat16", set())


def test_rejects_unknown_shape_and_dtype_with_every_problem_listed():
    plan = _plan(w=torch.zeros(4, 5, dtype=torch.bfloat16), ids=torch.zeros(3, dtype=torch.int32),
                 nope=torch.zeros(1))
    with pytest.raises(ManifestError) as e:
        validate_plan(plan, _expected(), "bfloat16", set())
    msg = str(e.value)
    assert "3 tensor(s)" in msg and "'nope'" in msg and "shape [4, 5]" in msg and "int32" in msg


def test_a_plan_missing_any_tensor_is_refused_unless_partial():
    with pytest.raises(ManifestError, match="incomplete update: 1 of the model's 2 tensors are "
                                            "missing \\(ids\\)"):
        validate_plan(_plan(w=torch.zeros(4, 4)), _expected(), "bfloat16", set())
    validate_plan(_plan(True, w=torch.zeros(4, 4)), _expected(), "bfloat16", set())


def test_an_empty_update_is_refused_even_when_partial():
    from weightsync.engine.manifest import validate_specs

    with pytest.raises(ManifestError, match="no tensors"):
        validate_specs([], _expected(), "bfloat16", set(), partial=True)


def test_tied_names_are_allowed_and_not_required():
    expected = {**_expected(), "lm_head.weight": TensorSpec(name="lm_head.weight",
                                                            dtype="float32", shape=(2,))}
    validate_plan(_plan(w=torch.zeros(4, 4), ids=IDS), expected, "bfloat16", {"lm_head.weight"})
    validate_plan(_plan(**{"lm_head.weight": torch.zeros(2)}, w=torch.zeros(4, 4), ids=IDS),
                  _expected(), "bfloat16", {"lm_head.weight"})


def test_checkpoint_headers_of_the_tiny_model(tiny_model):
    specs = read_checkpoint(str(tiny_model)).specs
    assert "model.embed_tokens.weight" in specs
    assert specs["model.embed_tokens.weight"].dtype == "float32"
    with pytest.raises(Exception, match="not a directory"):
        read_checkpoint("/nonexistent")


def test_error_class_ignores_foreign_subclasses():
    from weightsync.errors import ManifestError, WeightSyncError, error_class

    class Wrapped(ManifestError):  # what Ray's RayTaskError(ManifestError) looks like
        def __init__(self, a, b, c):
            pass

    assert error_class("manifest_error") is ManifestError
    assert error_class("no_such_code") is WeightSyncError
    del Wrapped
