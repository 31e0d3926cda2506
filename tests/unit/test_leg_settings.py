"""Per-leg settings on TransferConfig: the nested form, the old flat keywords as a shorthand,
conflicts between the two, each leg model's own validators, and the JSON round trip the config
makes to the engines."""

import pydantic
import pytest

from weightsync.config import FLAT_SHORTHAND, BroadcastSettings, IpcSettings, TransferConfig


def test_defaults_sit_in_the_leg_models():
    cfg = TransferConfig()
    assert cfg.broadcast == BroadcastSettings()
    assert (cfg.broadcast.backend, cfg.broadcast.mode, cfg.broadcast.port) == ("gloo",
                                                                               "collective", 0)
    assert cfg.ipc == IpcSettings() and not cfg.ipc.reuse_buffers and not cfg.ipc.direct


def test_nested_form():
    cfg = TransferConfig(broadcast=BroadcastSettings(backend="nccl", host="10.0.0.5", port=29500),
                         ipc=IpcSettings(reuse_buffers=True, direct=True), bucket_bytes=1 << 20)
    assert cfg.broadcast.backend == "nccl" and cfg.broadcast.host == "10.0.0.5"
    assert cfg.broadcast.port == 29500 and cfg.ipc.reuse_buffers and cfg.ipc.direct
    assert cfg.bucket_bytes == 1 << 20
    # dicts are the nested form too (as JSON gives them)
    assert TransferConfig(broadcast={"mode": "chain"}, ipc={"direct": True}) == \
        TransferConfig(broadcast=BroadcastSettings(mode="chain"), ipc=IpcSettings(direct=True))


def test_flat_keywords_are_a_shorthand_for_the_nested_form():
    flat = TransferConfig(backend="gloo", host="0.0.0.0", port=1234, broadcast="chain",
                          chain_chunk_bytes=1 << 20, ipc_reuse_buffers=True, ipc_direct=True)
    nested = TransferConfig(
        broadcast=BroadcastSettings(backend="gloo", host="0.0.0.0", port=1234, mode="chain",
                                    chain_chunk_bytes=1 << 20),
        ipc=IpcSettings(reuse_buffers=True, direct=True))
    assert flat == nested
    assert TransferConfig(backend="nccl").broadcast.backend == "nccl"
    assert TransferConfig(ipc_reuse_buffers=True).ipc == IpcSettings(reuse_buffers=True)
    assert TransferConfig.model_validate({"ipc_direct": True}).ipc.direct  # dict input too


def test_flat_and_nested_combine_when_they_agree_or_touch_different_settings():
    cfg = TransferConfig(backend="nccl", broadcast=BroadcastSettings(host="10.0.0.5"))
    assert (cfg.broadcast.backend, cfg.broadcast.host) == ("nccl", "10.0.0.5")
    cfg = TransferConfig(ipc_direct=True, ipc={"reuse_buffers": True})
    assert cfg.ipc == IpcSettings(reuse_buffers=True, direct=True)
    same = TransferConfig(ipc_direct=True, ipc=IpcSettings(direct=True))
    assert same.ipc.direct


@pytest.mark.parametrize("kwargs", [
    {"backend": "nccl", "broadcast": BroadcastSettings(backend="gloo")},
    {"port": 1, "broadcast": {"port": 2}},
    {"chain_chunk_bytes": 1 << 20, "broadcast": {"chain_chunk_bytes": 2 << 20}},
    {"ipc_reuse_buffers": True, "ipc": IpcSettings(reuse_buffers=False)},
    {"ipc_direct": False, "ipc": {"direct": True}},
])
def test_a_flat_keyword_contradicting_its_nested_setting_is_refused(kwargs):
    flat = next(k for k in kwargs if k in FLAT_SHORTHAND)
    with pytest.raises(pydantic.ValidationError, match=f"{flat}=.* contradicts"):
        TransferConfig(**kwargs)


def test_chain_is_validated_on_the_broadcast_model():
    with pytest.raises(pydantic.ValidationError, match="chain"):
        BroadcastSettings(backend="nccl", mode="chain")
    with pytest.raises(pydantic.ValidationError, match="chain"):
        TransferConfig(broadcast={"backend": "nccl", "mode": "chain"})
    with pytest.raises(pydantic.ValidationError, match="chain"):
        TransferConfig(backend="nccl", broadcast="chain")  # the shorthand reaches it too
    assert BroadcastSettings(backend="gloo", mode="chain").mode == "chain"


def test_leg_models_validate_their_fields_and_are_frozen():
    with pytest.raises(pydantic.ValidationError):
        BroadcastSettings(port=70000)
    with pytest.raises(pydantic.ValidationError):
        BroadcastSettings(chain_chunk_bytes=1)
    with pytest.raises(pydantic.ValidationError):
        BroadcastSettings(backend="mpi")
    with pytest.raises(pydantic.ValidationError):
        IpcSettings(reuse=True)  # extra keys are refused
    with pytest.raises(pydantic.ValidationError):
        TransferConfig(ipc_reuse=True)  # so are unknown flat ones
    with pytest.raises(pydantic.ValidationError):
        TransferConfig().ipc.direct = True  # type: ignore[misc]


@pytest.mark.parametrize("cfg", [
    TransferConfig(),
    TransferConfig(backend="gloo", broadcast="chain", chain_chunk_bytes=1 << 20, port=4321,
                   ipc_reuse_buffers=True, ipc_direct=True, apply="streaming",
                   layout="checkpoint", check_finite=False),
    TransferConfig(broadcast=BroadcastSettings(backend="nccl", host="10.1.2.3")),
])
def test_json_round_trip_is_equal(cfg):
    text = cfg.model_dump_json()
    assert TransferConfig.model_validate_json(text) == cfg
    dumped = cfg.model_dump()
    assert set(dumped["broadcast"]) == {"backend", "host", "port", "mode", "chain_chunk_bytes"}
    assert set(dumped["ipc"]) == {"reuse_buffers", "direct"}
    assert not set(dumped) & set(FLAT_SHORTHAND)  # always dumped in the nested form


def test_the_old_flat_json_still_parses():
    """A config serialized before the leg models (flat keys, broadcast a string) still reads."""
    old = ('{"backend": "gloo", "layout": "auto", "bucket_bytes": 1048576, "apply": "staged", '
           '"host": "127.0.0.1", "port": 0, "ipc_reuse_buffers": true, "ipc_direct": false, '
           '"broadcast": "chain", "chain_chunk_bytes": 4194304, "check_finite": true}')
    cfg = TransferConfig.model_validate_json(old)
    assert cfg.broadcast.mode == "chain" and cfg.ipc.reuse_buffers
    assert cfg.bucket_bytes == 1 << 20


def test_session_info_carries_the_nested_config_and_reads_both_forms():
    from weightsync.api.schemas import SessionInfo
    from weightsync.types import TransferPlan

    plan = TransferPlan(version=1, buckets=[])
    cfg = TransferConfig(backend="nccl")
    info = SessionInfo(session="ab12", backend=cfg.broadcast.backend, host="h", port=1,
                       world_size=2, version=1, plan=plan, transfer=cfg, engines=["e"])
    again = SessionInfo.model_validate_json(info.model_dump_json())
    assert again.transfer == cfg
    flat = info.model_dump(mode="json")
    flat["transfer"] = {"backend": "nccl"}
    assert SessionInfo.model_validate(flat).transfer == cfg
