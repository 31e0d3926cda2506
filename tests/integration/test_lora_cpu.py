"""LoRA adapters synced from memory into real vLLM CPU engines (#31).

Two LoRA-enabled engines for the module, built by ``ColdAdapterEngine`` so that the same
engine can also load an adapter from disk through vLLM's own path: the cold-load oracle. The
fleet-wide flip tests use both engines, the others the first. Adapters are real peft LoRAs
(rank 8 on every linear layer of the tiny model) with random non-zero B, so they change what
the model says. Each test uses an adapter name of its own.
"""

from __future__ import annotations

import pytest
import ray
import torch

from weightsync.adapters import AdapterPayload
from weightsync.errors import ManifestError, VerificationError
from weightsync.testing.models import peft_lora

pytestmark = pytest.mark.integration

PROMPTS = ["the quick brown fox", "weights move from the trainer to", "one two three four"]
TIMEOUT = 120


@pytest.fixture(scope="module")
def lora_fleet(ray_session, tiny_model):
    """Two LoRA engines: the fleet-wide tests use both, the one-engine tests the first."""
    from weightsync.config import EngineSpec
    from weightsync.engine.actor import start_engines, stop_engines
    from weightsync.testing.engines import cold_adapter_engine

    # max_loras 40: the kept versions of the tests' seventeen names (pinned, 34 at most), the one
    # being loaded, room for the cold oracle's adapter (vLLM loads it unpinned, in test 1),
    # and a version a fleet commit retired, held for its undo until the name's next stage
    specs = [EngineSpec(name=f"engine-lora-{x}", model=str(tiny_model), dtype="float32",
                        max_model_len=512, enforce_eager=True,
                        engine_args={"enable_lora": True, "max_lora_rank": 16,
                                     "max_loras": 40})
             for x in "ab"]
    actors = start_engines(specs, make_engine=cold_adapter_engine)
    yield actors
    stop_engines(actors, timeout_s=30)


@pytest.fixture(scope="module")
def lora_engine(lora_fleet):
    return lora_fleet[0]


def sync(actor, payload: AdapterPayload):
    return ray.get(actor.sync_adapter.remote(payload.manifest.model_dump_json(), payload.buf),
                   timeout=TIMEOUT)


def generate(actor, prompts=PROMPTS, **kw):
    """Greedy tokens and their logprobs for each prompt, and the adapter version that served."""
    out = ray.get(actor.generate.remote(prompts, max_tokens=12, logprobs=True, ignore_eos=True,
                                        **kw), timeout=TIMEOUT)
    return [(r.token_ids, r.logprobs) for r in out], {r.adapter for r in out}


def test_adapter_synced_from_memory_equals_vllm_loading_it_from_disk(lora_fleet, tiny_model,
                                                                     tmp_path):
    """Engine A serves the adapter synced from memory; vLLM loads peft's files from disk
    through its own path on A and on engine B, which has never held a synced adapter (this
    test runs first): all three answer alike, bit for bit."""
    from weightsync.testing.engines import COLD_ADAPTER

    lora_engine, other = lora_fleet

    model = peft_lora(tiny_model, seed=1)
    model.save_pretrained(tmp_path / "adapter")  # peft's own files: what vLLM reads cold
    payload = AdapterPayload.from_peft("warm", model)
    slots = payload.manifest.bucket.slots  # peft's names, A and B of 7 modules x 2 layers
    assert len(slots) == 28 and all(s.name.startswith("base_model.model.model.") for s in slots)

    reply = sync(lora_engine, payload)
    assert (reply.served_as, reply.version, reply.removed) == ("warm@v1", 1, ())
    assert reply.nbytes == payload.buf.numel() > 0

    warm, served = generate(lora_engine, lora="warm")
    cold, cold_served = generate(lora_engine,
                                 sampling={"extra_args": {COLD_ADAPTER: str(tmp_path / "adapter")}})
    base, _ = generate(lora_engine)
    assert served == {"warm@v1"} and cold_served == {None}
    assert warm == cold  # bit for bit: tokens and every logprob
    assert state(other).held_ids == ()  # B: no adapter of ours loaded, ever
    assert generate(other, sampling={"extra_args": {COLD_ADAPTER: str(tmp_path / "adapter")}}
                    )[0] == warm
    assert all(w[1] != b[1] for w, b in zip(warm, base))  # the adapter changes every answer
    # served again (the pinned adapter, not a reload) and after the cold one: the same
    assert generate(lora_engine, lora="warm@v1")[0] == warm


def test_a_synced_adapter_serves_what_hf_with_peft_computes(lora_engine, tiny_model,
                                                            tokenizer):
    """The other oracle: transformers' model with the peft adapter applied, in fp32. Each
    greedy token the engine serves after the sync is peft's argmax at that step (teacher
    forced on the engine's own continuation), and each logprob equals peft's within 1e-4."""
    model = peft_lora(tiny_model, seed=91).eval()
    reply = sync(lora_engine, AdapterPayload.from_peft("peftparity", model))
    got, served = generate(lora_engine, lora="peftparity")
    assert served == {reply.served_as}
    assert got != generate(lora_engine)[0]  # the adapter changes what the model says
    worst = 0.0
    for prompt, (tokens, logprobs) in zip(PROMPTS, got, strict=True):
        ids = tokenizer(prompt).input_ids
        seq = torch.tensor([ids + list(tokens)])
        with torch.no_grad():
            rows = torch.log_softmax(model(seq).logits[0, len(ids) - 1:-1].float(), -1)
        assert rows.argmax(-1).tolist() == list(tokens), prompt
        ref = rows.gather(1, seq[0, len(ids):, None])[:, 0].tolist()
        worst = max(worst, *(abs(a - b) for a, b in zip(logprobs, ref, strict=True)))
    print(f"\nengine vs HF + peft: max logprob gap {worst:.2e}")
    assert worst < 1e-4


def test_versions_resolve_to_the_latest_and_the_last_two_stay_served(lora_engine, tiny_model):
    first, second, third = (AdapterPayload.from_peft("policy", peft_lora(tiny_model, seed=s))
                            for s in (11, 12, 13))
    assert sync(lora_engine, first).served_as == "policy@v1"
    v1, _ = generate(lora_engine, lora="policy")

    reply = sync(lora_engine, second)
    assert (reply.served_as, reply.removed) == ("policy@v2", ())
    v2, served = generate(lora_engine, lora="policy")
    assert served == {"policy@v2"} and v2 != v1
    assert generate(lora_engine, lora="policy@v1") == (v1, {"policy@v1"})  # still served
    assert generate(lora_engine, lora="policy@v2") == (v2, {"policy@v2"})

    reply = sync(lora_engine, third)  # keeps 2: v1 goes
    assert (reply.served_as, reply.removed) == ("policy@v3", ("policy@v1",))
    v3, served = generate(lora_engine, lora="policy")
    assert served == {"policy@v3"} and v3 not in (v1, v2)
    assert generate(lora_engine, lora="policy@v2") == (v2, {"policy@v2"})
    with pytest.raises(Exception, match="no adapter 'policy@v1'"):
        generate(lora_engine, lora="policy@v1")


def test_versions_never_share_prefix_cache_entries(lora_engine, tiny_model):
    """A prompt of several KV blocks, cached under one version, is recomputed under the next
    (vLLM keys cached blocks by the adapter's name and path: each version has its own)."""
    long = ["the quick brown fox jumps over the lazy dog " * 40]
    for seed in (31, 32):
        assert sync(lora_engine, AdapterPayload.from_peft("kv", peft_lora(tiny_model, seed)))
    ray.get(lora_engine.reset_caches.remote(), timeout=TIMEOUT)
    v1, _ = generate(lora_engine, long, lora="kv@v1")  # its blocks cached
    v2_after_v1, _ = generate(lora_engine, long, lora="kv@v2")
    ray.get(lora_engine.reset_caches.remote(), timeout=TIMEOUT)
    v2_alone, _ = generate(lora_engine, long, lora="kv@v2")
    assert len(v1[0][0]) == 12 and v2_after_v1 != v1
    assert v2_after_v1 == v2_alone  # v1's cached blocks were not used for v2
    assert generate(lora_engine, long, lora="kv@v1")[0] == v1  # (both cached now)


def _renamed(payload: AdapterPayload, old: str, new: str) -> AdapterPayload:
    state = {k.replace(old, new): v for k, v in _tensors(payload).items()}
    return AdapterPayload.from_tensors(payload.manifest.name, state, payload.manifest.config)


def _tensors(payload: AdapterPayload) -> dict[str, torch.Tensor]:
    from weightsync.transport.packing import unpack_bucket

    return {k: v.clone() for k, v in unpack_bucket(payload.manifest.bucket, payload.buf)}


def test_bad_adapters_are_refused_and_the_name_stays_on_its_version(lora_engine, tiny_model):
    good = AdapterPayload.from_peft("guard", peft_lora(tiny_model, seed=21))
    assert sync(lora_engine, good).served_as == "guard@v1"
    before = generate(lora_engine, lora="guard")
    assert before[1] == {"guard@v1"}

    too_big = AdapterPayload.from_peft("guard", peft_lora(tiny_model, seed=22, r=32))
    with pytest.raises(ManifestError, match="greater than max_lora_rank 16"):
        sync(lora_engine, too_big)

    unknown = _renamed(good, ".self_attn.o_proj.", ".self_attn.x_proj.")
    with pytest.raises(ManifestError, match="x_proj: the model has no such module"):
        sync(lora_engine, unknown)

    lm_head = {**_tensors(good), "base_model.model.lm_head.lora_A.weight": torch.ones(8, 128),
               "base_model.model.lm_head.lora_B.weight": torch.ones(512, 8)}
    with pytest.raises(ManifestError, match="cannot adapt"):  # in the model, not one vLLM adapts
        sync(lora_engine, AdapterPayload.from_tensors("guard", lm_head, good.manifest.config))

    corrupt = AdapterPayload.from_peft("guard", peft_lora(tiny_model, seed=23))
    corrupt.buf[100] ^= 0xFF  # a byte changed after the checksum was made: in transit
    with pytest.raises(VerificationError, match="checksum"):
        sync(lora_engine, corrupt)

    diverged = _tensors(good)
    key = next(k for k in diverged if k.endswith("v_proj.lora_B.weight"))
    diverged[key] = diverged[key].clone()
    diverged[key][0, 0] = float("nan")  # a diverged trainer's adapter never goes live
    with pytest.raises(VerificationError, match="non-finite.*v_proj.lora_B"):
        sync(lora_engine, AdapterPayload.from_tensors("guard", diverged, good.manifest.config))

    shapes = _tensors(good)
    key = next(k for k in shapes if k.endswith("q_proj.lora_B.weight"))
    shapes[key] = torch.randn(shapes[key].shape[0] + 8, shapes[key].shape[1])
    with pytest.raises(ManifestError, match="do not fit its weight"):
        sync(lora_engine, AdapterPayload.from_tensors("guard", shapes, good.manifest.config))

    assert generate(lora_engine, lora="guard") == before  # still v1, answering as before
    # refusals used no version number: the next good sync is v2
    assert sync(lora_engine, AdapterPayload.from_peft(
        "guard", peft_lora(tiny_model, seed=24))).served_as == "guard@v2"


def state(actor):
    return ray.get(actor.adapter_state.remote(), timeout=TIMEOUT)


def test_a_fleet_sync_flips_the_name_on_every_engine(lora_fleet, tiny_model):
    from weightsync.coordinator import SyncCoordinator

    a, b = lora_fleet
    coord = SyncCoordinator(lora_fleet)
    try:
        first = coord.sync_adapter(peft_lora(tiny_model, seed=41), name="fleet")
        assert (first.ok, first.version, first.committed) == (
            True, 1, ("engine-lora-a", "engine-lora-b"))
        v1 = generate(a, lora="fleet")
        assert v1[1] == {"fleet@v1"} and generate(b, lora="fleet") == v1
        second = coord.sync_adapter(AdapterPayload.from_peft("fleet",
                                                            peft_lora(tiny_model, seed=42)))
        assert (second.ok, second.version) == (True, 2)
        assert {r.served_as for r in second.replies.values()} == {"fleet@v2"}
        assert all(r.nbytes > 0 for r in second.replies.values())
        v2 = generate(a, lora="fleet")
        assert v2[1] == {"fleet@v2"} and v2[0] != v1[0]
        assert generate(b, lora="fleet") == v2  # both engines answer alike, token for token
        assert generate(b, lora="fleet@v1") == v1  # the previous version is still kept
        assert state(a).served["fleet"] == state(b).served["fleet"] == "fleet@v2"
    finally:
        coord.close()


def test_a_fleet_sync_refused_by_one_engine_changes_no_engine(lora_fleet, tiny_model):
    """Engine B is paused (a real state in which it refuses to stage): A stages v3, then the
    flip is aborted everywhere; both still answer as v2; once B resumes, v3 goes everywhere."""
    from weightsync.coordinator import SyncCoordinator
    from weightsync.errors import AdapterSyncFailedError

    a, b = lora_fleet
    coord = SyncCoordinator(lora_fleet)
    try:
        if state(a).highest.get("fleet", 0) < 2:  # run alone: make v1 and v2 first
            for seed in (41, 42):
                coord.sync_adapter(peft_lora(tiny_model, seed=seed), name="fleet")
        before = {x: (generate(x, lora="fleet"), state(x)) for x in (a, b)}
        assert {s.served["fleet"] for _, s in before.values()} == {"fleet@v2"}

        ray.get(b.pause.remote(), timeout=TIMEOUT)
        try:
            with pytest.raises(AdapterSyncFailedError, match="engine-lora-b") as err:
                coord.sync_adapter(peft_lora(tiny_model, seed=43), name="fleet")
        finally:
            ray.get(b.resume.remote(), timeout=TIMEOUT)
        result = err.value.result
        assert (result.ok, result.version, result.committed) == (False, 3, ())
        assert set(result.failed) == {"engine-lora-b"} and "paused" in result.failed[
            "engine-lora-b"]
        assert result.aborted == ("engine-lora-a",)  # A had staged v3: unloaded again

        for x in (a, b):
            answer, was = before[x]
            now = state(x)
            assert now.served["fleet"] == "fleet@v2" and now.staged == ()
            assert now.held_ids == was.held_ids  # vLLM holds no adapter it did not hold
            assert now.highest["fleet"] == 2
            assert generate(x, lora="fleet") == answer  # exactly as before
            with pytest.raises(Exception, match="no adapter 'fleet@v3'"):
                generate(x, lora="fleet@v3")

        again = coord.sync_adapter(peft_lora(tiny_model, seed=43), name="fleet")
        assert (again.ok, again.version) == (True, 3)
        v3 = generate(a, lora="fleet")
        assert v3[1] == {"fleet@v3"} and generate(b, lora="fleet") == v3
        assert v3[0] != before[a][0][0]
    finally:
        coord.close()


def test_a_rolling_adapter_sync_flips_one_wave_at_a_time_and_stops_at_a_failed_wave(
        lora_fleet, tiny_model):
    """``wave_size=1``: engine A flips to vN (staged, committed, settled) before B stages it,
    so while B's wave runs A serves vN and B still v(N-1). Then a rollout whose second wave
    fails (B paused as its wave begins): A keeps v(N+1), B stays on vN, and the error says
    so; the next sync, rolling again, brings both to v(N+2)."""
    from weightsync.coordinator import SyncCoordinator
    from weightsync.errors import AdapterSyncFailedError

    a, b = lora_fleet
    seen: list[tuple[str, str]] = []
    pause_b = []

    def on_phase(phase, engine):
        if phase == "adapter:stage":  # each wave's stage: what each engine serves now
            served = [state(x).served.get("rolling", "") for x in (a, b)]
            seen.append((served[0], served[1]))
            if pause_b and len(seen) == pause_b[0]:
                ray.get(b.pause.remote(), timeout=TIMEOUT)

    coord = SyncCoordinator(lora_fleet, on_phase=on_phase)
    try:
        v = coord.sync_adapter(peft_lora(tiny_model, seed=61), name="rolling").version
        seen.clear()
        res = coord.sync_adapter(peft_lora(tiny_model, seed=62), name="rolling", wave_size=1)
        assert (res.ok, res.version, res.committed) == (
            True, v + 1, ("engine-lora-a", "engine-lora-b"))
        assert seen == [(f"rolling@v{v}", f"rolling@v{v}"),  # wave 1 (A) begins
                        (f"rolling@v{v + 1}", f"rolling@v{v}")], seen  # wave 2 (B) begins
        served_v1 = generate(a, lora="rolling")
        assert generate(b, lora="rolling") == served_v1

        seen.clear()
        pause_b.append(2)  # B is paused as the second wave begins: it refuses to stage
        try:
            with pytest.raises(AdapterSyncFailedError, match="stopped at the wave") as err:
                coord.sync_adapter(peft_lora(tiny_model, seed=63), name="rolling",
                                   wave_size=1)
        finally:
            ray.get(b.resume.remote(), timeout=TIMEOUT)
        result = err.value.result
        assert (result.ok, result.version, result.committed) == (False, v + 2,
                                                                 ("engine-lora-a",))
        assert set(result.failed) == {"engine-lora-b"} and "paused" in result.failed[
            "engine-lora-b"]
        assert f"v{v + 1}" in str(err.value)
        assert state(a).served["rolling"] == f"rolling@v{v + 2}"
        assert state(b).served["rolling"] == f"rolling@v{v + 1}" and state(b).staged == ()
        assert generate(b, lora="rolling") == served_v1  # B exactly as before
        assert generate(a, lora="rolling")[0] != served_v1[0]

        pause_b.clear()
        again = coord.sync_adapter(peft_lora(tiny_model, seed=64), name="rolling",
                                   wave_size=1)
        assert (again.ok, again.version) == (True, v + 3)
        answer = generate(a, lora="rolling")
        assert answer[1] == {f"rolling@v{v + 3}"} and generate(b, lora="rolling") == answer
    finally:
        coord.close()


def test_an_adapter_syncs_into_engines_asleep_for_the_coordinator_and_they_serve_it(
        lora_fleet, tiny_model):
    """The colocated loop with an adapter: the coordinator puts both engines to sleep (on
    CPU vLLM has no sleep mode: they pause, with the states of a GPU sleep), trains, and
    syncs the adapter straight into them. Another coordinator is refused while they sleep
    for the first (``IllegalStateError``, nothing staged); the sleeper's sync wakes them
    with the new version: both serve ``<name>@v<N>`` and answer alike."""
    from weightsync.coordinator import SyncCoordinator
    from weightsync.errors import IllegalStateError, SyncFailedError
    from weightsync.types import EngineState

    a, b = lora_fleet
    coord, other = SyncCoordinator(lora_fleet), SyncCoordinator(lora_fleet)
    try:
        v = max(state(x).highest.get("sleepy", 0) for x in lora_fleet)
        coord.sleep(level=1)
        assert {s.state for s in coord.statuses()} == {EngineState.ASLEEP}
        with pytest.raises((IllegalStateError, SyncFailedError), match="sleeps for"):
            other.sync_adapter(peft_lora(tiny_model, seed=81), name="sleepy")
        assert {s.state for s in coord.statuses()} == {EngineState.ASLEEP}
        assert all(state(x).staged == () for x in lora_fleet)
        res = coord.sync_adapter(peft_lora(tiny_model, seed=82), name="sleepy")
        assert (res.ok, res.version, res.committed) == (
            True, v + 1, ("engine-lora-a", "engine-lora-b"))
        statuses = coord.statuses()
        assert {s.state for s in statuses} == {EngineState.SERVING}, statuses
        assert all(s.owner is None for s in statuses)
        answer = generate(a, lora="sleepy")
        assert answer[1] == {f"sleepy@v{v + 1}"} and generate(b, lora="sleepy") == answer
    finally:
        other.close()
        coord.close()


def test_a_commit_that_fails_on_one_engine_is_undone_on_the_other(lora_fleet, tiny_model):
    """Engine B's staged v3 is aborted by another caller just before the commit (as a second
    coordinator would): A commits v3, B refuses to, and A undoes it. Both answer exactly as
    on v2, v1 is kept again on A (v3's commit had retired it), neither holds an adapter it
    did not hold before, and the next sync makes v4 everywhere (3 is never used again)."""
    from weightsync.coordinator import SyncCoordinator
    from weightsync.errors import AdapterSyncFailedError

    a, b = lora_fleet
    coord = SyncCoordinator(lora_fleet)
    try:
        for seed in (51, 52):
            coord.sync_adapter(peft_lora(tiny_model, seed=seed), name="undo")
        before = {x: (generate(x, lora="undo"), generate(x, lora="undo@v1"), state(x))
                  for x in (a, b)}
        assert {s.served["undo"] for _, _, s in before.values()} == {"undo@v2"}

        def snatch(phase, _engine):
            if phase == "adapter:commit":
                assert ray.get(b.abort_adapter.remote("undo", 3), timeout=TIMEOUT) is True

        coord.on_phase = snatch
        try:
            with pytest.raises(AdapterSyncFailedError, match="undone on") as err:
                coord.sync_adapter(peft_lora(tiny_model, seed=53), name="undo")
        finally:
            coord.on_phase = None
        result = err.value.result
        assert (result.ok, result.version, result.committed, result.uncommitted) == (
            False, 3, (), ())
        assert set(result.failed) == {"engine-lora-b"}
        assert "not staged" in result.failed["engine-lora-b"]
        assert result.aborted == ("engine-lora-a",)
        for x in (a, b):
            latest, first, was = before[x]
            now = state(x)
            assert now.served["undo"] == "undo@v2" and now.staged == ()
            assert now.held_ids == was.held_ids
            assert generate(x, lora="undo") == latest  # exactly as before
            assert generate(x, lora="undo@v1") == first
            with pytest.raises(Exception, match="no adapter 'undo@v3'"):
                generate(x, lora="undo@v3")

        again = coord.sync_adapter(peft_lora(tiny_model, seed=53), name="undo")
        assert (again.ok, again.version) == (True, 4)
        assert generate(a, lora="undo")[1] == {"undo@v4"}
        assert generate(b, lora="undo") == generate(a, lora="undo")
    finally:
        coord.close()


@pytest.mark.parametrize("mode", ["collective", "chain"])
def test_an_adapter_moves_over_the_transfer_group_as_it_does_in_the_calls(lora_fleet,
                                                                          tiny_model, mode):
    """``sync_adapter(leg="broadcast")``: both engines join the coordinator's gloo group
    while serving (no pause) and receive the adapter's bytes from it, by broadcast or by a
    chain in 64 KiB chunks; the group stays open for the next sync. What they serve is bit
    for bit what the same adapter sent in the engine calls serves."""
    from weightsync.config import BroadcastSettings, TransferConfig
    from weightsync.coordinator import SyncCoordinator

    a, b = lora_fleet
    name = f"wire{mode[:2]}"
    coord = SyncCoordinator(lora_fleet, TransferConfig(broadcast=BroadcastSettings(
        mode=mode, chain_chunk_bytes=64 * 1024)))
    try:
        payload = AdapterPayload.from_peft(name, peft_lora(tiny_model, seed=61))
        first = coord.sync_adapter(payload, leg="broadcast")
        assert (first.ok, first.version) == (True, 1)
        assert {r.nbytes for r in first.replies.values()} == {payload.buf.numel()}
        groups = {state(x).group_id for x in (a, b)}
        assert len(groups) == 1 and None not in groups  # one group, both engines in it
        over_group = generate(a, lora=name)
        assert over_group[1] == {f"{name}@v1"} and generate(b, lora=name) == over_group

        in_calls = coord.sync_adapter(payload)  # the same bytes, in the engine calls: v2
        assert in_calls.version == 2
        assert generate(a, lora=name)[0] == over_group[0]
        assert generate(b, lora=name)[0] == over_group[0]

        again = coord.sync_adapter(AdapterPayload.from_peft(name, peft_lora(tiny_model, 62)),
                                   leg="broadcast")
        assert again.version == 3 and {state(x).group_id for x in (a, b)} == groups  # kept
        assert generate(a, lora=name)[0] != over_group[0]
        assert generate(b, lora=name) == generate(a, lora=name)
    finally:
        coord.close()


def test_an_engine_that_refuses_an_adapter_over_the_group_still_takes_its_bytes(
        lora_fleet, tiny_model):
    """A chain (64 KiB chunks): A, first in it, must forward every chunk to B. Another caller
    stages v2 on A after the coordinator counted versions: A refuses the coordinator's v2
    (not above its highest) but still takes the bytes and forwards them, so B receives and
    stages them: only A fails, within seconds (without the drain, B fails too, its chain
    broken when A leaves the group; a sender whose collective needs every rank, NCCL's,
    would wait out its deadline). v2 is undone everywhere, and the next sync opens a group
    again and makes v2 everywhere (a number never committed is free again)."""
    import time

    from weightsync.config import BroadcastSettings, Deadlines, TransferConfig
    from weightsync.coordinator import SyncCoordinator
    from weightsync.errors import AdapterSyncFailedError

    a, b = lora_fleet
    coord = SyncCoordinator(lora_fleet, TransferConfig(
        broadcast=BroadcastSettings(mode="chain", chain_chunk_bytes=64 * 1024),
        deadlines=Deadlines(transfer=30)))
    other = AdapterPayload.from_peft("drain", peft_lora(tiny_model, seed=72))
    try:
        assert coord.sync_adapter(peft_lora(tiny_model, seed=71), name="drain",
                                  leg="broadcast").version == 1
        before = generate(a, lora="drain")

        def interpose(phase, _engine):
            if phase == "adapter:stage":
                ray.get(a.stage_adapter.remote(other.manifest.model_dump_json(), other.buf, 2),
                        timeout=TIMEOUT)

        coord.on_phase = interpose
        t = time.monotonic()
        try:
            with pytest.raises(AdapterSyncFailedError, match="not above 2") as err:
                coord.sync_adapter(other, leg="broadcast")
        finally:
            coord.on_phase = None
        assert time.monotonic() - t < 25  # (a receive left waiting: the 30 s deadline, and more)
        assert set(err.value.result.failed) == {"engine-lora-a"}
        # (the flip undoes v2 everywhere: B's, and A's that the other caller staged)
        assert err.value.result.aborted == ("engine-lora-a", "engine-lora-b")
        for x in (a, b):
            assert state(x).served["drain"] == "drain@v1" and state(x).staged == ()
            assert generate(x, lora="drain") == before

        done = coord.sync_adapter(other, leg="broadcast")
        assert (done.ok, done.version) == (True, 2)
        assert generate(b, lora="drain") == generate(a, lora="drain") != before
    finally:
        coord.close()


@pytest.mark.parametrize("rollout,adapter_leg,colocate", [
    ("ray", "calls", False), ("openai", "calls", False), ("ray", "broadcast", False),
    ("ray", "calls", True)])
def test_the_grpo_main_job_trains_an_adapter_and_syncs_only_it(lora_fleet, tiny_model,
                                                               tmp_path, rollout, adapter_leg,
                                                               colocate):
    """``services.grpo --lora`` on the first engine (the job's model is the tiny model: same
    factory, same seed): a peft adapter on every linear layer trains on the frozen base; each
    step syncs only the adapter as ``policy@v<N>`` (v1 the untrained one) and samples with it
    by name; the engine's logprobs of its samples are the trainer's (peft's) on the same
    weights. Sampled through Ray's ``generate`` or through the fleet's OpenAI router
    (``model="policy"``, the version from ``X-Adapter-Version``); the adapter's bytes in the
    engine calls or over the transfer group (``--adapter-leg``). ``--colocate``: the engine
    sleeps (on CPU: pauses) for every training step and the adapter syncs into it, which
    then serves it. Whether it learns is the 40-step run in
    benchmarks/results/grpo-cpu-lora.json."""
    import io
    import json

    from rich.console import Console

    from services.grpo import GrpoConfig, run
    from services.grpo_sync import ADAPTER

    cfg = GrpoConfig(steps=2, engines=1, prompts_per_step=2, group_size=4, max_tokens=8,
                     device="cpu", lora=True, lora_rank=8, rollout=rollout,
                     adapter_leg=adapter_leg, colocate=colocate)
    v = state(lora_fleet[0]).highest.get(ADAPTER, 0)  # (another test may have used the name)
    summary = run(cfg, tmp_path, "lora", tmp_path / "model", Console(file=io.StringIO()),
                  actors=lora_fleet[:1])
    log = json.loads((tmp_path / "lora.json").read_text())
    steps = log["steps"]
    # v+1 the untrained adapter, then one version per step
    assert summary["all_syncs_verified"] and summary["versions"] == [v + 2, v + 3]
    assert [s["sampled_version"] for s in steps] == [v + 1, v + 2]  # each on the last sync
    assert summary["every_sample_on_its_version"] and summary["final_version"] == v + 3
    assert all(s["logprob_gap"] < 1e-4 for s in steps), [s["logprob_gap"] for s in steps]
    # only the adapter moved: rank 8 on 7 linear layers x 2 layers, fp32
    assert summary["sync_bytes_median"] == 4 * 8 * 2 * (
        (128 + 128) + (128 + 64) * 2 + (128 + 128) + (128 + 256) * 2 + (256 + 128))
    assert summary["sync_bytes_median"] < summary["model_bytes"] / 5
    served = state(lora_fleet[0]).served
    assert served[ADAPTER] == f"{ADAPTER}@v{v + 3}"
    assert log["config"]["adapter_leg"] == adapter_leg
    if adapter_leg == "broadcast":  # the job's coordinator opened a group with the engine
        assert state(lora_fleet[0]).group_id is not None
    if colocate:  # each step slept the engine; the adapter sync woke it serving
        assert all(s["sleep_seconds"] is not None for s in steps), steps
        status = ray.get(lora_fleet[0].status.remote(), timeout=TIMEOUT)
        assert status.state.value == "serving" and status.owner is None


@pytest.mark.parametrize("phase", ["adapter:commit", "adapter:settle"])
def test_a_trainer_killed_mid_flip_changes_no_engine(lora_fleet, ray_session, tiny_model, phase):
    """A trainer process SIGKILLed mid-flip, ``adapter:commit``: once every engine staged its
    adapter's next version, before any commit; ``adapter:settle``: once every engine
    committed it, before it could settle them. Either way, within the settle deadline (the
    dead trainer's lease) ``<name>`` answers as before on both engines: the staged version
    is not servable, the committed one undid itself (each engine asked the other, neither
    was settled) and was unloaded. The next trainer's sync flips both to a version never
    used before."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    from weightsync.coordinator import SyncCoordinator
    from weightsync.testing.dying_trainer import LEASE_S

    coord = SyncCoordinator(lora_fleet)
    try:
        v = coord.sync_adapter(peft_lora(tiny_model, seed=71), name="dying").version
        before = {x: generate(x, lora="dying") for x in lora_fleet}
        held = {x: set(state(x).held_ids) for x in lora_fleet}
        proc = subprocess.run(
            [sys.executable, "-m", "weightsync.testing.dying_trainer",
             ray_session.get_runtime_context().gcs_address, "weightsync-tests",
             str(tiny_model), "adapter", phase, "0", "72", "engine-lora-a", "engine-lora-b"],
            cwd=Path(__file__).parents[2], capture_output=True, text=True, timeout=300)
        killed = time.monotonic()
        assert proc.returncode == -9 and f"dying at {phase}" in proc.stdout, \
            proc.stdout + proc.stderr
        if phase == "adapter:settle":  # every engine committed v+1 and awaits its settle
            while any(state(x).served["dying"] != f"dying@v{v}" for x in lora_fleet):
                assert time.monotonic() - killed < LEASE_S + 10, [state(x) for x in lora_fleet]
                time.sleep(0.2)
            print(f"\nunsettled commits undone {time.monotonic() - killed:.1f}s after the kill")
        for x in lora_fleet:
            st = state(x)
            assert st.served["dying"] == f"dying@v{v}", st
            assert st.staged == ((f"dying@v{v + 1}",) if phase == "adapter:commit" else ()), st
            if phase == "adapter:settle":  # undone and unloaded: vLLM holds no new id
                assert set(st.held_ids) <= held[x] and st.highest["dying"] == v + 1, st
            assert generate(x, lora="dying") == before[x]
            with pytest.raises(Exception, match=f"no adapter 'dying@v{v + 1}'"):
                generate(x, lora=f"dying@v{v + 1}")
        orphan_ids = {x: set(state(x).held_ids) for x in lora_fleet}
        again = coord.sync_adapter(peft_lora(tiny_model, seed=72), name="dying")
        assert (again.ok, again.version, again.committed) == (
            True, v + 2, ("engine-lora-a", "engine-lora-b"))
        answers = [generate(x, lora="dying") for x in lora_fleet]
        assert answers[0] == answers[1] and answers[0][1] == {f"dying@v{v + 2}"}
        assert answers[0][0] != before[lora_fleet[0]][0]
        for x in lora_fleet:  # an orphan's vLLM id is gone: unloaded before the new stage
            st = state(x)
            assert st.staged == () and len(set(st.held_ids) - orphan_ids[x]) == 1
            assert len(st.held_ids) == len(orphan_ids[x]) + (phase == "adapter:settle")
    finally:
        coord.close()


def test_a_trainer_killed_part_way_through_the_settle_round_leaves_every_engine_on_vn(
        lora_fleet, ray_session, tiny_model):
    """The trainer settles engine A's commit, then is SIGKILLed before it settles B's. When
    B's settle deadline passes, B asks A what became of it, A answers settled, and B keeps
    the version too: both serve vN, alike, rather than A vN and B v(N-1)."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    from weightsync.coordinator import SyncCoordinator
    from weightsync.testing.dying_trainer import LEASE_S

    coord = SyncCoordinator(lora_fleet)
    try:
        v = coord.sync_adapter(peft_lora(tiny_model, seed=73), name="dying").version
        before = generate(lora_fleet[0], lora="dying")
    finally:
        coord.close()
    proc = subprocess.run(
        [sys.executable, "-m", "weightsync.testing.dying_trainer",
         ray_session.get_runtime_context().gcs_address, "weightsync-tests", str(tiny_model),
         "adapter", "adapter:settle-one", "0", "74", "engine-lora-a", "engine-lora-b"],
        cwd=Path(__file__).parents[2], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9 and f"settled dying@v{v + 1} on the first" in proc.stdout, \
        proc.stdout + proc.stderr
    time.sleep(LEASE_S + 3)  # B's deadline passed: it asked A
    for x in lora_fleet:
        st = state(x)
        assert st.served["dying"] == f"dying@v{v + 1}" and st.staged == (), st
    answers = [generate(x, lora="dying") for x in lora_fleet]
    assert answers[0] == answers[1] and answers[0][1] == {f"dying@v{v + 1}"}
    assert answers[0][0] != before[0]


def test_adapters_are_served_by_name_through_the_fleets_openai_router(lora_fleet, tiny_model):
    """The real ``openai`` client against the control plane's router over both LoRA engines
    (each serving vLLM's own OpenAI app): ``model="<name>"`` runs the latest committed
    version, ``"<name>@v<N>"`` a kept one, each answer names the version (``model`` and
    ``X-Adapter-Version``) and equals ``generate(lora=...)`` token for token; ``/v1/models``
    lists the kept versions; the next fleet sync moves ``<name>`` on every engine."""
    import openai

    from tests.integration.api_server import free_port
    from weightsync.api import create_app
    from weightsync.api.server import ServerThread
    from weightsync.config import Settings
    from weightsync.coordinator import SyncCoordinator

    coord = SyncCoordinator(lora_fleet)
    settings = Settings(host="127.0.0.1", port=free_port(), token="router-lora-token",
                        namespace="weightsync-tests")
    server = ServerThread(create_app(settings, engines=lora_fleet), settings.port).start()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=settings.token, max_retries=0,
                           timeout=TIMEOUT)

    def complete(model: str, prompt: str = PROMPTS[0]):
        raw = client.completions.with_raw_response.create(
            model=model, prompt=prompt, max_tokens=12, temperature=0.0, logprobs=1,
            extra_body={"ignore_eos": True, "return_token_ids": True})
        c = raw.parse()
        choice = c.choices[0]
        return (tuple(choice.model_extra["token_ids"]), c.model,
                raw.headers.get("x-adapter-version"), raw.headers["x-engine"])

    try:
        for seed in (81, 82):
            v = coord.sync_adapter(peft_lora(tiny_model, seed=seed), name="chat").version
        listed = {m.id for m in client.models.list().data}  # each kept version ("chat" is
        assert {f"chat@v{v}", f"chat@v{v - 1}"} <= listed, listed  # an alias of the latest)
        base = complete(ray.get(lora_fleet[0].status.remote()).model)[0]
        engines = set()
        for name, served in (("chat", v), (f"chat@v{v}", v), (f"chat@v{v - 1}", v - 1)):
            want = [t for t, _ in generate(lora_fleet[0], [PROMPTS[0]],
                                           lora=f"chat@v{served}")[0]][0]
            for _ in range(2):  # least-loaded: both engines answer in turn
                tokens, model, header, engine = complete(name)
                assert (model, header) == (f"chat@v{served}", f"chat@v{served}")
                assert tokens == want and tokens != base, name
                engines.add(engine)
        assert engines == {"engine-lora-a", "engine-lora-b"}
        nxt = coord.sync_adapter(peft_lora(tiny_model, seed=83), name="chat").version
        for _ in range(2):
            tokens, model, header, _ = complete("chat")
            assert (model, header) == (f"chat@v{nxt}", f"chat@v{nxt}")
        with pytest.raises(openai.NotFoundError):
            complete(f"chat@v{v - 1}")  # no longer kept: not served by any name
    finally:
        client.close()
        server.stop()
        coord.close()


def test_an_adapter_directory_loads_through_the_control_plane_inside_its_load_roots(
        lora_fleet, tiny_model, tmp_path):
    """``POST /adapters/{name}/reload`` (``WeightSyncClient.reload_adapter``) of peft's
    ``save_pretrained`` directory under a load root: both engines serve it as the name's next
    version, exactly as the same adapter synced from memory; a directory outside the roots and
    an adapter for another base are refused (422) with no engine changed."""
    from weightsync.api import create_app
    from weightsync.api.server import ServerThread
    from weightsync.client import WeightSyncClient
    from weightsync.config import Settings
    from weightsync.coordinator import SyncCoordinator
    from weightsync.errors import ConfigError
    from weightsync.testing.models import build_text_model

    root, outside = tmp_path / "root", tmp_path / "outside"
    model = peft_lora(tiny_model, seed=91)
    model.save_pretrained(root / "a91")
    model.save_pretrained(outside / "a91")
    other_base = build_text_model(tmp_path / "bigger", hidden=256, heads=4)
    peft_lora(other_base, seed=92).save_pretrained(root / "other-base")
    settings = Settings(host="127.0.0.1", port=0, token="adapter-reload-token",
                        namespace="weightsync-tests", load_roots=(str(root),), rollouts=False)
    server = ServerThread(create_app(settings, engines=lora_fleet), 0).start()
    coord = SyncCoordinator(lora_fleet)
    try:
        with WeightSyncClient(server.url, token=settings.token) as c:
            r = c.reload_adapter("disk", str(root / "a91"))
            assert r.ok and r.committed == ("engine-lora-a", "engine-lora-b")
            states = c.adapters()
            assert {s.served["disk"] for s in states.values()} == {f"disk@v{r.version}"}
            coord.sync_adapter(AdapterPayload.from_peft("mem", model))
            for x in lora_fleet:  # the same tensors, read from disk or sent from memory
                assert generate(x, lora="disk")[0] == generate(x, lora="mem")[0]
            before = {x: generate(x, lora="disk") for x in lora_fleet}
            states = c.adapters()
            with pytest.raises(ConfigError, match="outside the allowed load roots"):
                c.reload_adapter("disk", str(outside / "a91"))
            with pytest.raises(ConfigError, match="does not fit the model"):
                c.reload_adapter("disk", str(root / "other-base"))
            assert c.adapters() == states  # nothing changed, staged nowhere
            for x in lora_fleet:
                assert generate(x, lora="disk") == before[x]
    finally:
        coord.close()
        server.stop()
