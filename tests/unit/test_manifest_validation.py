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


# ---- a partial update carries whole vLLM layers ------------------------------------------------
QWEN2_PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def _qwen2(layers=1):
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in range(layers):
        p = f"model.layers.{i}."
        names += [f"{p}self_attn.{m}.{w}" for m in ("q_proj", "k_proj", "v_proj")
                  for w in ("weight", "bias")]
        names += [f"{p}self_attn.o_proj.weight", f"{p}input_layernorm.weight",
                  f"{p}post_attention_layernorm.weight"]
        names += [f"{p}mlp.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")]
    names += ["lm_head.weight"]
    return {n: TensorSpec(name=n, dtype="float32", shape=(2, 2)) for n in names}


def test_checkpoint_tensors_map_to_the_vllm_layers_they_load_into():
    from weightsync.engine.manifest import layer_of

    assert layer_of("model.layers.0.self_attn.k_proj.bias", QWEN2_PACKED) == \
        "model.layers.0.self_attn.qkv_proj"
    assert layer_of("model.layers.3.mlp.up_proj.weight", QWEN2_PACKED) == \
        "model.layers.3.mlp.gate_up_proj"
    assert layer_of("model.layers.3.mlp.down_proj.weight", QWEN2_PACKED) == \
        "model.layers.3.mlp.down_proj"
    # routed experts: every expert's tensors load into the layer's fused experts; a shared
    # expert is a dense MLP of its own
    assert layer_of("model.layers.1.mlp.experts.7.gate_proj.weight", QWEN2_PACKED) == \
        "model.layers.1.mlp.experts"
    assert layer_of("model.layers.1.mlp.shared_expert.up_proj.weight", QWEN2_PACKED) == \
        "model.layers.1.mlp.shared_expert.gate_up_proj"
    mla = {"fused_qkv_a_proj": ["q_a_proj", "kv_a_proj_with_mqa"]}
    assert layer_of("model.layers.0.self_attn.kv_a_proj_with_mqa.weight", mla) == \
        "model.layers.0.self_attn.fused_qkv_a_proj"
    assert layer_of("lm_head.weight", QWEN2_PACKED) == "lm_head"


def _partial(*names):
    plan = plan_buckets([TensorSpec(name=n, dtype="float32", shape=(2, 2)) for n in names],
                        1 << 20, 1)
    return plan.model_copy(update={"partial": True})


def test_a_partial_update_that_splits_a_fused_layer_is_refused_naming_what_it_lacks():
    p = "model.layers.0.self_attn."
    with pytest.raises(ManifestError, match="whole layers") as e:
        validate_plan(_partial(f"{p}q_proj.weight"), _qwen2(), "float32", set(), QWEN2_PACKED)
    msg = str(e.value)
    assert "qkv_proj also needs" in msg and f"{p}k_proj.weight" in msg and f"{p}q_proj.bias" in msg
    # the whole layer (weights and biases of q, k and v), or whole other layers: accepted
    validate_plan(_partial(*(f"{p}{m}.{w}" for m in ("q_proj", "k_proj", "v_proj")
                             for w in ("weight", "bias"))), _qwen2(), "float32", set(),
                  QWEN2_PACKED)
    validate_plan(_partial(*(f"model.layers.0.mlp.{m}.weight" for m in
                             ("gate_proj", "up_proj", "down_proj"))),
                  _qwen2(), "float32", set(), QWEN2_PACKED)
    validate_plan(_partial("model.layers.0.mlp.down_proj.weight", "model.norm.weight"),
                  _qwen2(), "float32", set(), QWEN2_PACKED)
    with pytest.raises(ManifestError, match="gate_up_proj also needs model.layers.0.mlp.up_proj"):
        validate_plan(_partial("model.layers.0.mlp.gate_proj.weight"), _qwen2(), "float32",
                      set(), QWEN2_PACKED)
    # without the model's mapping (a caller that does not know it) nothing more is checked
    validate_plan(_partial(f"{p}q_proj.weight"), _qwen2(), "float32", set())


def test_a_partial_update_of_some_experts_of_a_layer_is_refused():
    from weightsync.engine.manifest import split_layers

    e = "model.layers.0.mlp.experts."
    expected = [f"{e}{i}.{m}.weight" for i in range(4) for m in ("gate_proj", "up_proj",
                                                                  "down_proj")]
    assert split_layers(expected, expected, set(), QWEN2_PACKED) == {}
    split = split_layers([f"{e}2.down_proj.weight"], expected, set(), QWEN2_PACKED)
    assert list(split) == ["model.layers.0.mlp.experts"]
    assert len(split["model.layers.0.mlp.experts"]) == 11  # every other expert tensor


def test_a_tied_head_needs_nothing_more_and_completes_nothing():
    from weightsync.engine.manifest import split_layers

    assert split_layers(["model.embed_tokens.weight"], _qwen2(), {"lm_head.weight"},
                        QWEN2_PACKED) == {}
