"""LoRA adapters without an engine: the payload and its checksum, the shape checks against a
model's checkpoint, and an engine's versions (``engine.adapters.Adapters``) against a peer that
answers as its workers would. The real loads into vLLM: tests/integration/test_lora_cpu.py."""

import asyncio

import pytest
import torch

from weightsync.adapters import (
    AdapterConfig,
    AdapterLoad,
    AdapterLoaded,
    AdapterPayload,
    LoadedAdapters,
    check_adapter_shapes,
    unpack_adapter,
)
from weightsync.config import EngineSpec
from weightsync.engine.adapters import Adapters
from weightsync.errors import (
    ConfigError,
    IllegalStateError,
    ManifestError,
    StaleVersionError,
    VerificationError,
)
from weightsync.messages import Ack
from weightsync.transport.packing import checksum
from weightsync.types import TensorSpec

P = "base_model.model.model.layers.0."
BASE = {f"model.layers.0.{m}.weight": TensorSpec(name=f"model.layers.0.{m}.weight",
                                                  dtype="float32", shape=shape)
        for m, shape in (("self_attn.q_proj", (128, 128)), ("mlp.down_proj", (128, 256)))}
CONFIG = {"r": 4, "lora_alpha": 8, "target_modules": {"q_proj", "down_proj"},
          "task_type": "CAUSAL_LM"}


def _tensors(r=4):
    return {f"{P}self_attn.q_proj.lora_A.weight": torch.randn(r, 128),
            f"{P}self_attn.q_proj.lora_B.weight": torch.randn(128, r),
            f"{P}mlp.down_proj.lora_A.weight": torch.randn(r, 256),
            f"{P}mlp.down_proj.lora_B.weight": torch.randn(128, r)}


def test_the_payload_carries_the_tensors_and_the_checksum_of_their_bytes():
    tensors = _tensors()
    p = AdapterPayload.from_tensors("pol", tensors, CONFIG)
    assert p.manifest.checksum == checksum(p.buf)
    assert p.manifest.config.target_modules == ("down_proj", "q_proj")  # peft's set, sorted
    assert p.manifest.config.peft_dict()["target_modules"] == ["down_proj", "q_proj"]
    load = AdapterLoad(manifest=p.manifest, version=3, lora_int_id=7)
    assert load.versioned == "pol@v3"
    got = unpack_adapter(load, p.buf)
    assert got.keys() == tensors.keys()
    assert all(torch.equal(got[k], tensors[k]) for k in tensors)
    tensors[f"{P}self_attn.q_proj.lora_A.weight"].add_(1)  # the payload made a copy
    assert p.manifest.checksum == checksum(p.buf)


def test_the_wire_plan_carries_the_payloads_bytes_as_they_are():
    """What a group leg sends (``wire_plan``: one uint8 tensor in one bucket), packed and
    unpacked as the sender and every worker do, is the payload's bytes: the manifest's
    checksum holds on arrival; a chain's plan differs only in its chunk size."""
    from weightsync.adapters import WIRE_NAME, wire_plan
    from weightsync.transport.packing import pack_bucket, unpack_bucket

    p = AdapterPayload.from_tensors("pol", _tensors(), CONFIG)
    plan = wire_plan(p.manifest, 3)
    (bucket,) = plan.buckets
    assert plan.version == 3 and bucket.nbytes >= p.buf.numel() and plan.chain_chunk == 0
    wire = pack_bucket(bucket, {WIRE_NAME: p.buf}, "cpu")
    ((name, got),) = list(unpack_bucket(bucket, wire))
    assert name == WIRE_NAME and torch.equal(got, p.buf)
    assert checksum(got) == p.manifest.checksum
    chain = wire_plan(p.manifest, 3, 65536)
    assert chain.chain_chunk == 65536 and chain.buckets == plan.buckets
    load = AdapterLoad(manifest=p.manifest, version=3, lora_int_id=1,
                       over_group={"deadline_s": 5, "chain_chunk": 65536})
    assert load.wire_plan() == chain
    with pytest.raises(ValueError, match="in its call"):
        AdapterLoad(manifest=p.manifest, version=3, lora_int_id=1).wire_plan()


@pytest.mark.parametrize("name", ["", "a@v1", "a b", "a/b"])
def test_adapter_names_are_plain(name):
    with pytest.raises(ManifestError):
        AdapterPayload.from_tensors(name, _tensors(), CONFIG)


def test_an_adapter_that_fits_the_checkpoint_passes():
    p = AdapterPayload.from_tensors("pol", _tensors(), CONFIG)
    check_adapter_shapes(list(p.manifest.bucket.slots), BASE, p.manifest.config)


def _specs(tensors):
    return [TensorSpec(name=k, dtype="float32", shape=tuple(t.shape)) for k, t in tensors.items()]


@pytest.mark.parametrize("change, match", [
    (lambda t: t.update({f"{P}self_attn.x_proj.lora_A.weight": torch.zeros(4, 128),
                         f"{P}self_attn.x_proj.lora_B.weight": torch.zeros(128, 4)}),
     "x_proj: the model has no such module"),
    (lambda t: t.update({f"{P}self_attn.q_proj.lora_B.weight": torch.zeros(64, 4)}),
     "do not fit its weight"),
    (lambda t: t.update({f"{P}mlp.down_proj.lora_A.weight": torch.zeros(4, 128)}),
     "do not fit its weight"),
    (lambda t: t.pop(f"{P}mlp.down_proj.lora_B.weight"), "come together"),
    (lambda t: t.update({f"{P}self_attn.q_proj.weight": torch.zeros(128, 128)}),
     "not a LoRA A/B weight"),
])
def test_an_adapter_that_does_not_fit_is_refused(change, match):
    tensors = _tensors()
    change(tensors)
    with pytest.raises(ManifestError, match=match):
        check_adapter_shapes(_specs(tensors), BASE, AdapterConfig.model_validate(CONFIG))


def test_a_rank_the_config_does_not_declare_is_refused():
    with pytest.raises(ManifestError, match="rank 6 is not one its config declares"):
        check_adapter_shapes(_specs(_tensors(r=6)), BASE, AdapterConfig.model_validate(CONFIG))


# ---- an engine's versions ----------------------------------------------------------------------
class _Workers:
    """Answers ``ws_load_adapter`` / ``ws_remove_adapter`` / ``ws_loaded_adapters`` as an
    engine's workers do, holding the ids they were given; ``refuse`` fails the next load."""

    def __init__(self):
        self.name, self.engine = "e", object()
        self.held: set[int] = set()
        self.refuse: Exception | None = None
        self.calls: list[tuple] = []

    async def rpc(self, method, *args, reply, timeout=None):
        self.calls.append((method, *args[:1]))
        if method == "ws_load_adapter":
            if self.refuse is not None:
                e, self.refuse = self.refuse, None
                raise e
            load = AdapterLoad.model_validate_json(args[0])
            self.held.add(load.lora_int_id)
            return [AdapterLoaded(lora_int_id=load.lora_int_id, modules=2)]
        if method == "ws_remove_adapter":
            self.held.discard(args[0])
            return [Ack()]
        assert method == "ws_loaded_adapters"
        return [LoadedAdapters(ids=tuple(sorted(self.held)))]


def _adapters(**args):
    spec = EngineSpec(name="e", model="/m",
                      engine_args={"enable_lora": True, "max_loras": 4, **args})
    workers = _Workers()
    return Adapters(spec, workers), workers


def _sync(adapters, name="pol"):
    p = AdapterPayload.from_tensors(name, _tensors(), CONFIG)
    return asyncio.run(adapters.sync(p.manifest.model_dump_json(), p.buf, 10.0))


def test_each_sync_is_a_new_version_and_the_last_two_stay():
    a, workers = _adapters()
    replies = [_sync(a) for _ in range(3)]
    assert [r.served_as for r in replies] == ["pol@v1", "pol@v2", "pol@v3"]
    assert [r.lora_int_id for r in replies] == [1, 2, 3]
    assert [r.removed for r in replies] == [(), (), ("pol@v1",)]
    assert workers.held == {2, 3}
    assert a.resolve("pol").served_as == "pol@v3" and a.resolve("pol@v2").lora_int_id == 2
    with pytest.raises(ConfigError, match="no adapter 'pol@v1'"):
        a.resolve("pol@v1")


def test_a_version_in_use_is_unloaded_only_once_released():
    a, workers = _adapters()
    _sync(a), _sync(a)
    with a.use("pol@v1") as v:
        assert v is not None and v.served_as == "pol@v1"
        assert _sync(a).removed == ()  # v1 is retired, but a request still runs on it
        with pytest.raises(ConfigError):
            a.resolve("pol@v1")
        assert 1 in workers.held
    assert _sync(a).removed == ("pol@v1", "pol@v2")
    assert workers.held == {3, 4}


def test_a_refused_load_changes_nothing_and_uses_no_version():
    a, workers = _adapters()
    _sync(a)
    workers.refuse = VerificationError("checksum")
    with pytest.raises(VerificationError):
        _sync(a)
    assert workers.calls[-1] == ("ws_remove_adapter", 2)  # whichever worker loaded it
    assert a.resolve("pol").served_as == "pol@v1"
    assert _sync(a).served_as == "pol@v2"


def test_an_engine_without_lora_or_without_room_is_refused_before_any_call():
    a = Adapters(EngineSpec(name="e", model="/m"), _Workers())
    with pytest.raises(ManifestError, match="without LoRA"):
        _sync(a)
    a, workers = _adapters(max_loras=2)
    _sync(a)
    _sync(a)  # two kept, and the new one: three slots
    with pytest.raises(ConfigError, match="needs 3 adapter slots"):
        _sync(a)
    assert [c[0] for c in workers.calls] == ["ws_load_adapter", "ws_load_adapter"]


def test_a_full_weight_load_forgets_the_adapters_vllm_dropped():
    a, workers = _adapters()
    _sync(a), _sync(a, "other")
    workers.held.discard(1)  # vLLM's reload unloaded it
    asyncio.run(a.weights_replaced(10.0))
    assert a.served() == {"other": "other@v1"}
    with pytest.raises(ConfigError):
        a.resolve("pol")


def _stage(adapters, version, name="pol"):
    p = AdapterPayload.from_tensors(name, _tensors(), CONFIG)
    return asyncio.run(adapters.stage(p.manifest.model_dump_json(), p.buf, version, 10.0))


def test_a_staged_version_is_not_served_until_committed():
    a, workers = _adapters()
    _sync(a)
    staged = _stage(a, 5)  # the coordinator's number: may skip (another engine was ahead)
    assert (staged.served_as, staged.removed) == ("pol@v5", ())
    assert staged.lora_int_id in workers.held and a.resolve("pol").served_as == "pol@v1"
    with pytest.raises(ConfigError, match="no adapter 'pol@v5'"):
        a.resolve("pol@v5")
    assert a.highest("pol") == 5
    done = asyncio.run(a.commit("pol", 5, 10.0))
    assert done.served_as == "pol@v5" and a.resolve("pol").served_as == "pol@v5"
    with pytest.raises(IllegalStateError, match="not staged"):  # once only
        asyncio.run(a.commit("pol", 5, 10.0))


def test_an_aborted_stage_is_unloaded_idempotently_and_frees_its_number():
    a, workers = _adapters()
    _sync(a)
    staged = _stage(a, 2)
    assert asyncio.run(a.abort("pol", 2, 10.0)) is True
    assert staged.lora_int_id not in workers.held and workers.held == {1}
    assert asyncio.run(a.abort("pol", 2, 10.0)) is False  # again: nothing to do
    assert asyncio.run(a.abort("pol", 7, 10.0)) is False  # never staged
    assert a.highest("pol") == 1 and a.resolve("pol").served_as == "pol@v1"
    assert _stage(a, 2).lora_int_id != staged.lora_int_id  # the number again, a new vLLM id
    with pytest.raises(IllegalStateError):
        asyncio.run(a.commit("pol", 3, 10.0))  # not the staged version


def test_a_fleet_commit_is_undone_until_the_names_next_stage():
    """Undoing v3 (committed by a fleet flip that failed on another engine) brings back v2 as
    what the name resolves to, and v1, which v3's commit retired but kept loaded for this;
    v3 is unloaded and its number never staged again here."""
    a, workers = _adapters()
    _sync(a), _sync(a)
    held = set(workers.held)
    _stage(a, 3)
    asyncio.run(a.commit("pol", 3, 10.0))
    assert a.resolve("pol").served_as == "pol@v3" and 1 in workers.held  # retired, held
    with pytest.raises(ConfigError):
        a.resolve("pol@v1")
    assert asyncio.run(a.abort("pol", 3, 10.0)) is True
    assert workers.held == held and a.served() == {"pol": "pol@v2"}
    assert a.resolve("pol@v1").lora_int_id == 1
    assert asyncio.run(a.abort("pol", 3, 10.0)) is False  # idempotent
    assert a.highest("pol") == 3
    with pytest.raises(StaleVersionError, match="not above 3"):
        _stage(a, 3)
    assert _stage(a, 4).served_as == "pol@v4"


def test_committed_numbers_are_reported_after_a_weight_load_dropped_every_adapter():
    """vLLM's reload unloads every adapter; the name's committed numbers are still reported
    (``state().highest``), so a coordinator counts past them instead of being refused."""
    a, workers = _adapters()
    _sync(a), _sync(a)
    workers.held.clear()
    asyncio.run(a.weights_replaced(10.0))
    state = asyncio.run(a.state(10.0))
    assert state.served == {} and state.highest == {"pol": 2}
    assert _stage(a, 3).served_as == "pol@v3"


def test_a_first_version_undone_leaves_the_name_unserved():
    a, workers = _adapters()
    _stage(a, 1)
    asyncio.run(a.commit("pol", 1, 10.0))
    assert asyncio.run(a.abort("pol", 1, 10.0)) is True
    assert a.served() == {} and workers.held == set()


def test_a_commit_stands_once_the_name_stages_again():
    """The next stage of the name releases what the last commit retired (before counting
    slots) and that commit can no longer be undone; a commit of ``sync`` never could be."""
    a, workers = _adapters(max_loras=3)
    _sync(a), _sync(a)
    _stage(a, 3)
    asyncio.run(a.commit("pol", 3, 10.0))
    assert workers.held == {1, 2, 3}  # v1 held for an undo
    _stage(a, 4)  # three slots: v2, v3 kept, v4; v1 let go first
    assert workers.held == {2, 3, 4}
    assert asyncio.run(a.abort("pol", 3, 10.0)) is False and a.served() == {"pol": "pol@v3"}
    asyncio.run(a.commit("pol", 4, 10.0))
    assert asyncio.run(a.abort("pol", 4, 10.0)) is True
    assert a.served() == {"pol": "pol@v3"}
    _sync(a)  # v5 by sync, both phases: not undoable
    assert asyncio.run(a.abort("pol", 5, 10.0)) is False and a.served() == {"pol": "pol@v5"}


def test_another_names_undo_gives_way_when_slots_run_out():
    """Held retirees take slots: a stage of another name that needs one lets the undo go
    (that commit stands) instead of being refused; one that fits leaves it undoable."""
    a, workers = _adapters(max_loras=4)
    _sync(a), _sync(a)
    _stage(a, 3)
    asyncio.run(a.commit("pol", 3, 10.0))  # v2, v3 kept, v1 held: three pinned
    _stage(a, 1, name="other")  # four: fits, the undo stays
    asyncio.run(a.commit("other", 1, 10.0))
    assert workers.held == {1, 2, 3, 4}
    assert asyncio.run(a.abort("pol", 3, 10.0)) is True and a.served()["pol"] == "pol@v2"
    _stage(a, 4)
    asyncio.run(a.commit("pol", 4, 10.0))  # pol v2, v4 kept, v1 held, other v1: full
    assert len(workers.held) == 4
    _stage(a, 2, name="other")  # needs a slot: pol's undo gives way, v1 is unloaded first
    assert 1 not in workers.held
    assert asyncio.run(a.abort("pol", 4, 10.0)) is False and a.served()["pol"] == "pol@v4"


def test_a_stage_not_above_the_highest_version_is_refused_before_any_call():
    a, workers = _adapters()
    _sync(a), _sync(a)
    calls = len(workers.calls)
    for stale in (1, 2):
        with pytest.raises(StaleVersionError, match=f"version {stale} is not above 2"):
            _stage(a, stale)
    assert len(workers.calls) == calls
    _stage(a, 3)
    with pytest.raises(StaleVersionError, match="not above 3"):  # staged counts too
        _stage(a, 3)


def test_a_new_stage_replaces_one_never_committed():
    a, workers = _adapters()
    first = _stage(a, 1)  # its coordinator died before committing
    second = _stage(a, 2)
    assert first.lora_int_id not in workers.held and second.lora_int_id in workers.held
    state = asyncio.run(a.state(10.0))
    assert (state.staged, state.highest, state.served) == (("pol@v2",), {"pol": 2}, {})
    assert state.held_ids == (second.lora_int_id,)


# ---- what vLLM holds after a load, against what was sent (verify_held) -----------------------
def _sent_and_held(scale_folded: bool, alpha: float = 16, r: int = 8,
                   dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(0)
    sent, held = {}, {}
    for m, (out, inp) in {"model.layers.0.self_attn.q_proj": (16, 8),
                          "model.layers.0.mlp.down_proj": (8, 32)}.items():
        a = torch.randn(r, inp, generator=g).to(dtype)
        b = torch.randn(out, r, generator=g).to(dtype)
        sent[f"base_model.model.{m}.lora_A.weight"] = a
        sent[f"base_model.model.{m}.lora_B.weight"] = b
        scale = alpha / r
        held[m] = (a.clone(), b.clone() * scale, 1.0) if scale_folded else \
            (a.clone(), b.clone(), scale)
    return sent, held


def _module_of(name: str):
    stem = name.removeprefix("base_model.model.")
    return stem.rsplit(".lora_", 1)[0], ".lora_A." in name


def _config(**kw):
    from weightsync.adapters import AdapterConfig

    return AdapterConfig(**{"r": 8, "lora_alpha": 16, "target_modules": "all-linear", **kw})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("folded", [True, False])
def test_what_vllm_holds_equals_what_was_sent_scaled_once(folded, dtype):
    """Held as vLLM makes it (``b * scale`` in the adapter's dtype: alpha 12 / r 8 = 1.5
    rounds), verified bit for bit, in every dtype: one ulp apart is a difference."""
    from weightsync.adapters import verify_held

    sent, held = _sent_and_held(folded, alpha=12, dtype=dtype)
    verify_held(sent, held, _module_of, _config(lora_alpha=12), "a@v1")  # no error
    m = "model.layers.0.self_attn.q_proj"
    a, b, s = held[m]
    flipped = a.clone()  # one ulp apart: its lowest bit flipped
    flipped.view({2: torch.int16, 4: torch.int32}[a.element_size()]).view(-1)[5] ^= 1
    held[m] = (flipped, b, s)
    with pytest.raises(VerificationError, match="q_proj: A differs"):
        verify_held(sent, held, _module_of, _config(lora_alpha=12), "a@v1")


def test_an_adapter_scaled_twice_a_stale_one_and_a_missing_module_are_named():
    from weightsync.adapters import verify_held
    from weightsync.errors import VerificationError

    sent, held = _sent_and_held(True)
    a, b, s = held["model.layers.0.mlp.down_proj"]
    held["model.layers.0.mlp.down_proj"] = (a, b * 2.0, s)  # alpha/r applied twice
    with pytest.raises(VerificationError, match=r"down_proj: B x scale differs .*ratio 2"):
        verify_held(sent, held, _module_of, _config(), "a@v1")
    sent2, held2 = _sent_and_held(True)
    held2["model.layers.0.self_attn.q_proj"] = _sent_and_held(True, alpha=8)[1][
        "model.layers.0.self_attn.q_proj"]  # another version's B (the same A)
    with pytest.raises(VerificationError, match="q_proj: B x scale differs"):
        verify_held(sent2, held2, _module_of, _config(), "a@v1")
    del held2["model.layers.0.self_attn.q_proj"]
    with pytest.raises(VerificationError, match="q_proj: sent, not held"):
        verify_held(sent2, held2, _module_of, _config(), "a@v1")


def test_peft_scales_per_module_and_with_rslora():
    from weightsync.adapters import lora_scale

    cfg = _config(alpha_pattern={"down_proj": 32})
    assert lora_scale(cfg, "model.layers.0.self_attn.q_proj", 8) == 2.0
    assert lora_scale(cfg, "model.layers.0.mlp.down_proj", 8) == 4.0
    assert lora_scale(_config(use_rslora=True), "x.q_proj", 16) == 4.0


def test_a_commit_not_settled_in_time_undoes_itself_and_a_late_settle_says_so():
    """A fleet commit carries a settle deadline: its coordinator died mid-commit, so nobody
    settles it, and it undoes itself (``<name>`` back on v1, v2 retired, its number spent);
    the settle of a coordinator that only came late answers False (it then undoes it on
    every engine). A commit settled in time stands, and stays undoable until the next stage."""
    async def scenario():
        a, workers = _adapters()
        await a.sync(*_payload_args(), 10.0)
        await a.stage(*_payload_args(), 2, 10.0)
        await a.commit("pol", 2, 10.0, settle_s=0.2)
        assert a.served() == {"pol": "pol@v2"}
        await asyncio.sleep(0.5)
        assert a.served() == {"pol": "pol@v1"} and a.highest("pol") == 2
        assert await a.settle("pol", 2) is False
        await a.stage(*_payload_args(), 3, 10.0)
        await a.commit("pol", 3, 10.0, settle_s=0.2)
        assert await a.settle("pol", 3) is True
        await asyncio.sleep(0.5)  # settled: the timer leaves it
        assert a.served() == {"pol": "pol@v3"}
        assert await a.settle("pol", 3) is True  # idempotent
        assert await a.abort("pol", 3, 10.0) is True and a.served() == {"pol": "pol@v1"}

    asyncio.run(scenario())


def test_a_new_stage_of_a_name_undoes_its_unsettled_commit_first():
    """A second coordinator stages the name while a dead one's commit is still unsettled on
    this engine: that commit is undone first (as its timer would), so whatever the new flip
    does, no engine keeps the dead coordinator's half-flipped version."""
    async def scenario():
        a, workers = _adapters()
        await a.sync(*_payload_args(), 10.0)
        await a.stage(*_payload_args(), 2, 10.0)
        await a.commit("pol", 2, 60.0, settle_s=60.0)
        await a.stage(*_payload_args(), 3, 10.0)
        assert a.served() == {"pol": "pol@v1"} and await a.settle("pol", 2) is False
        await a.abort("pol", 3, 10.0)  # the new flip failed elsewhere: v1 everywhere
        assert a.served() == {"pol": "pol@v1"}

    asyncio.run(scenario())


def _payload_args():
    p = AdapterPayload.from_tensors("pol", _tensors(), CONFIG)
    return p.manifest.model_dump_json(), p.buf


def test_a_packer_packs_what_from_peft_packs_after_every_update(tmp_path):
    """``AdapterPacker`` (peft's state-dict walk once, then the same parameters read each
    time) gives the payload ``from_peft`` gives, byte for byte, after in-place updates (an
    optimizer step), after a parameter replaced in its module, and after ``.data`` moved to
    new memory; it never returns an old value."""
    from weightsync.adapters import AdapterPacker, AdapterPayload
    from weightsync.testing.models import build_text_model, peft_lora

    model = peft_lora(build_text_model(tmp_path / "m"), seed=3)
    packer = AdapterPacker("p", model)
    assert packer.direct  # every tensor of peft's state dict is a parameter's own memory

    def same() -> bool:
        got, want = packer.pack(), AdapterPayload.from_peft("p", model)
        return got.manifest == want.manifest and torch.equal(got.buf, want.buf)

    assert same()
    lora = [(m, n) for m in model.modules() for n, p in m._parameters.items()
            if p is not None and isinstance(m, torch.nn.Linear) and p.shape[0] == 8]
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5)  # in place
    assert same()
    module, attr = lora[0]
    setattr(module, attr, torch.nn.Parameter(torch.randn_like(getattr(module, attr))))
    assert same()  # a new Parameter object in the module is followed
    with torch.no_grad():
        p = getattr(lora[1][0], lora[1][1])
        p.data = p.data.clone() + 1.0  # new memory under the same Parameter
    assert same()
