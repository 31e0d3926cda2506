"""Trainer-side weight sources: metadata before data, one bucket at a time, and transformers'
own checkpoint names for models it holds in another layout (fused MoE experts, renamed VL
towers). Real transformers models; the reference is what ``save_pretrained`` writes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from weightsync.errors import ConfigError, ManifestError, TransferError
from weightsync.sources import BucketFeed, IteratorSource, ModuleSource, TensorsSource, as_source
from weightsync.sources.base import ModuleTensors
from weightsync.transport.packing import checksum, pack_bucket, plan_buckets, spec_of


def _saved(directory) -> dict[str, torch.Tensor]:
    out = {}
    for f in directory.glob("*.safetensors"):
        out.update(load_file(f))
    return out


def _fed(source, bucket_bytes=1 << 16) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Every tensor as the legs see it, bucket by bucket, and the packed buckets' checksums."""
    plan = plan_buckets(source.specs(), bucket_bytes, 1)
    feed = source.feed(plan)
    got, sums = {}, []
    for b in plan.buckets:
        sums.append(checksum(pack_bucket(b, feed, "cpu")))
        got.update({s.name: feed[s.name].clone() for s in b.slots})
    return got, sums


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    from transformers import Qwen3MoeForCausalLM

    from weightsync.testing.models import build_moe_model

    path = build_moe_model(tmp_path_factory.mktemp("models") / "tiny-moe")
    return path, Qwen3MoeForCausalLM.from_pretrained(path, dtype=torch.float32)


def test_moe_in_memory_fused_experts_go_under_the_names_save_pretrained_writes(moe, tmp_path):
    path, model = moe
    assert "model.layers.0.mlp.experts.gate_up_proj" in dict(model.named_parameters())
    with torch.no_grad():
        model.model.layers[1].mlp.experts.gate_up_proj[3].add_(1.0)  # a trained expert
    model.save_pretrained(tmp_path)
    saved = _saved(tmp_path)
    source = ModuleSource(model)
    specs = source.specs()  # from meta tensors: nothing is converted yet
    assert {s.name for s in specs} == set(saved)
    assert "model.layers.0.mlp.experts.7.up_proj.weight" in saved
    assert all(spec_of(n, t) == s for s in specs for n, t in [(s.name, saved[s.name])])
    got, _ = _fed(source)
    assert set(got) == set(saved)
    assert all(torch.equal(got[n], saved[n]) for n in saved)


def test_moe_conversion_equals_transformers_revert_weight_conversion(moe):
    from transformers.core_model_loading import revert_weight_conversion

    _, model = moe
    want = revert_weight_conversion(model, dict(model.state_dict()))
    got, _ = _fed(ModuleSource(model), bucket_bytes=1 << 20)
    assert set(got) == set(want)
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_moe_experts_are_fed_as_views_of_the_fused_tensors_without_copies(moe):
    """transformers' own conversion copies every fused expert tensor (``Chunk`` makes its
    chunks contiguous); the source instead feeds views of the in-memory tensors, found by
    running the same conversion on a probe and checked once against the real one."""
    from weightsync.sources.hf_names import CheckpointNames
    from weightsync.transport.packing import named_tensors

    _, model = moe
    fused = model.model.layers[1].mlp.experts.gate_up_proj
    source = ModuleSource(model)
    assert source.producer is None  # no per-bucket conversion
    feed = source.feed(plan_buckets(source.specs(), 1 << 20, 1))
    up3 = feed["model.layers.1.mlp.experts.3.up_proj.weight"]
    inter = up3.shape[0]
    assert up3.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    assert torch.equal(up3, fused[3, inter:])
    assert ModuleSource(model).feed(plan_buckets(source.specs(), 1 << 20, 1))[
        "model.layers.1.mlp.experts.3.up_proj.weight"] is up3  # kept while nothing moved
    with torch.no_grad():
        fused[3].mul_(2.0)  # an optimizer step, in place: the views see it
    assert torch.equal(up3, fused[3, inter:])
    # the views are what transformers' conversion makes, and what the bucket-at-a-time
    # producer (used when no views exist, and by sharded sources) makes
    named = dict(named_tensors(model))
    names = CheckpointNames.of(model, [spec_of(n, t) for n, t in named.items()])
    views = names.views(names.slices(named), named)
    assert names.verify_views(views, named) is None
    producer = ModuleTensors(named, names)
    made = producer.produce([s.name for s in names.specs])
    assert all(torch.equal(made[n], views[n]) for n in views)
    wrong = dict(views)
    wrong["model.layers.0.mlp.experts.0.gate_proj.weight"] = views[
        "model.layers.0.mlp.experts.0.up_proj.weight"]
    assert "experts.0.gate_proj" in names.verify_views(wrong, named)


def test_moved_tensors_get_new_views_without_checking_the_conversion_again(moe, monkeypatch):
    """A trainer that offloads its weights and brings them back (new addresses, same shapes)
    gets views of the tensors where they are now; which rows each checkpoint tensor takes
    depends on shapes only, so transformers' conversion is not run again to check them."""
    from weightsync.sources.hf_names import CheckpointNames

    _, model = moe
    ModuleSource(model)  # found and checked (if not already)
    checks = []
    real = CheckpointNames.verify_views
    monkeypatch.setattr(CheckpointNames, "verify_views",
                        lambda self, *a: checks.append(1) or real(self, *a))
    experts = model.model.layers[1].mlp.experts
    old = experts.gate_up_proj.data
    experts.gate_up_proj.data = old.clone() * 3  # moved: another address, same shape
    try:
        feed = ModuleSource(model).feed(None)
        gate2 = feed["model.layers.1.mlp.experts.2.gate_proj.weight"]
        inter = gate2.shape[0]
        assert gate2.untyped_storage().data_ptr() == \
            experts.gate_up_proj.untyped_storage().data_ptr()
        assert torch.equal(gate2, old[2, :inter] * 3)
        assert checks == []
    finally:
        experts.gate_up_proj.data = old


def test_replaced_parameters_get_new_views(moe):
    _, model = moe
    experts = model.model.layers[0].mlp.experts
    before = ModuleSource(model).feed(None)["model.layers.0.mlp.experts.0.down_proj.weight"]
    old = experts.down_proj
    experts.down_proj = torch.nn.Parameter(old.detach() + 1.0)  # not in place
    try:
        after = ModuleSource(model).feed(None)["model.layers.0.mlp.experts.0.down_proj.weight"]
        assert torch.equal(after, old[0] + 1.0) and not torch.equal(after, before)
    finally:
        experts.down_proj = old


def test_vl_tower_goes_under_the_checkpoint_names(tmp_path):
    """A Qwen2-VL held by transformers 5 (``model.visual.*``, ``model.language_model.*``).
    Built here rather than by ``build_vl_model``: its processor needs torchvision, which the
    CPU CI image lacks."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text = dict(vocab_size=512, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, intermediate_size=256,
                rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]})
    vision = dict(depth=1, embed_dim=64, hidden_size=128, num_heads=1, mlp_ratio=2,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_chans=3)
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(
        text_config=text, vision_config=vision, **text, bos_token_id=0, eos_token_id=0))
    model.save_pretrained(tmp_path)
    model = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32)
    held = {n for n, _ in model.named_parameters()}
    assert any(n.startswith("model.visual.") for n in held)
    saved = _saved(tmp_path)
    assert any(n.startswith("visual.") for n in saved) and not held & {
        n for n in saved if n.startswith("visual.")}
    got, _ = _fed(ModuleSource(model))
    assert set(got) == set(saved)
    assert all(torch.equal(got[n], saved[n]) for n in saved)


def test_a_model_saved_as_it_is_held_feeds_its_own_tensors(tiny_model):
    from weightsync.testing.reference import load_trainer_model

    model = load_trainer_model(tiny_model)
    source = as_source(model)
    plan = plan_buckets(source.specs(), 1 << 16, 1)
    feed = source.feed(plan)
    assert isinstance(feed, dict)  # no conversion: the legs pack from the parameters
    params = dict(model.named_parameters())
    assert all(feed[n] is params[n] for n in params)


def test_conversion_failure_is_a_manifest_error_naming_the_tensor(moe):
    from weightsync.sources.hf_names import CheckpointNames

    _, model = moe
    names = CheckpointNames.of(model, ModuleSource(model, convert=False).specs())
    group = names.group_of["model.layers.0.mlp.experts.0.gate_proj.weight"]
    tensors = {n: torch.zeros(3) for n in group.sources}  # not the shape the transform needs
    with pytest.raises(ManifestError, match="model.layers.0.mlp.experts.gate_up_proj"):
        names.convert(group, tensors)


def test_stream_is_never_collected_and_checked_against_its_specs():
    tensors = {f"w{i}": torch.full((64, 64), float(i)) for i in range(8)}  # 16 KiB each
    specs = [spec_of(n, t) for n, t in tensors.items()]
    pulled = []

    def stream():
        for n, t in tensors.items():
            pulled.append(n)
            yield n, t

    source = IteratorSource(specs, stream)
    plan = plan_buckets(source.specs(), 1 << 15, 1)  # two tensors a bucket
    assert not pulled  # metadata first: nothing read to plan
    feed = source.feed(plan)
    assert isinstance(feed, BucketFeed)
    for b in plan.buckets:
        pack_bucket(b, feed, "cpu")
        assert len(pulled) == 2 * (b.index + 1)  # one bucket read at a time
        assert len(feed.tensors) == 2  # and only that bucket held
    # a second pass (a second wave) reads a fresh iterator from the callable
    pack_bucket(plan.buckets[0], feed, "cpu")
    assert pulled[-2:] == ["w0", "w1"]


def test_stream_that_breaks_its_promise_fails_the_transfer_naming_the_tensor():
    specs = [spec_of("a", torch.zeros(4)), spec_of("b", torch.zeros(4))]
    source = IteratorSource(specs, iter([("a", torch.zeros(4)), ("b", torch.zeros(5))]))
    plan = plan_buckets(source.specs(), 1 << 16, 1)
    with pytest.raises(ConfigError, match="'b' float32\\(5,\\) where its specs promised"):
        pack_bucket(plan.buckets[0], source.feed(plan), "cpu")
    one_shot = IteratorSource(specs, iter([("a", torch.zeros(4)), ("b", torch.zeros(4))]))
    plan = plan_buckets(one_shot.specs(), 1, 1)  # a bucket each
    feed = one_shot.feed(plan)
    feed.load(0)
    feed.load(1)
    with pytest.raises(ConfigError, match="one-shot iterator cannot be read twice"):
        feed.load(0)  # a second wave


def test_a_producer_that_raises_fails_the_transfer_with_the_bucket():
    class Broken(ModuleTensors):
        def produce(self, names):
            raise RuntimeError("gloo: connection reset by peer")

    t = {"x": torch.zeros(4)}
    plan = plan_buckets([spec_of("x", t["x"])], 1 << 16, 1)
    feed = BucketFeed([["x"]], Broken(t, None))
    with pytest.raises(TransferError, match="bucket 0: RuntimeError: gloo"):
        pack_bucket(plan.buckets[0], feed, "cpu")


def test_state_dict_and_pairs_become_tensor_sources():
    sd = {"a": torch.ones(2), "b": torch.zeros(3)}
    assert isinstance(as_source(sd), TensorsSource)
    assert [s.name for s in as_source(iter(sd.items())).specs()] == ["a", "b"]


def test_kept_views_feed_the_same_held_feed_until_a_tensor_moves(moe):
    """The IPC leg keys its direct share on a ``HeldFeed`` instead of asking every expert's
    view where it lies each sync: the same feed object only while nothing moved."""
    from weightsync.sources.base import HeldFeed

    _, model = moe
    names = [s.name for s in ModuleSource(model).specs()]
    parts = {"slot": names[:3], "other": names[3:5]}
    first = ModuleSource(model).feed(None, parts)
    assert isinstance(first, HeldFeed)
    assert ModuleSource(model).feed(None, {k: list(v) for k, v in parts.items()}) is first
    experts = model.model.layers[0].mlp.experts
    old = experts.gate_up_proj.data
    experts.gate_up_proj.data = old.clone()  # moved: another address
    try:
        moved = ModuleSource(model).feed(None, parts)
        assert isinstance(moved, HeldFeed) and moved is not first
        assert moved.token is not first.token
    finally:
        experts.gate_up_proj.data = old
    state = TensorsSource(dict(model.named_parameters()))  # not known to stay put
    assert not isinstance(state.feed(None, parts), HeldFeed)
