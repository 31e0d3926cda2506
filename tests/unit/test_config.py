import pydantic
import pytest

from weightsync.config import EngineSpec, TransferConfig


def test_tensor_parallel_engines_are_refused_until_supported():
    with pytest.raises(pydantic.ValidationError,
                       match="tensor-parallel engines are not supported"):
        EngineSpec(name="e", model="/m", tensor_parallel_size=2)
    assert EngineSpec(name="e", model="/m").tensor_parallel_size == 1


def test_chain_broadcast_is_for_gloo():
    with pytest.raises(pydantic.ValidationError, match="chain"):
        TransferConfig(backend="nccl", broadcast="chain")
