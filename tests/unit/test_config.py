import pydantic
import pytest

from weightsync.config import EngineSpec, TransferConfig


def test_tensor_parallel_size_is_validated_and_accepted():
    with pytest.raises(pydantic.ValidationError):
        EngineSpec(name="e", model="/m", tensor_parallel_size=0)
    assert EngineSpec(name="e", model="/m").tensor_parallel_size == 1
    assert EngineSpec(name="e", model="/m", tensor_parallel_size=2).tensor_parallel_size == 2


def test_chain_broadcast_is_for_gloo():
    with pytest.raises(pydantic.ValidationError, match="chain"):
        TransferConfig(backend="nccl", broadcast="chain")


def test_cpu_threads_bind_names_one_core_list_per_worker():
    assert EngineSpec(name="e", model="/m", tensor_parallel_size=2,
                      cpu_threads_bind="0|1").cpu_threads_bind == "0|1"
    assert EngineSpec(name="e", model="/m", tensor_parallel_size=2,
                      cpu_threads_bind="nobind").cpu_threads_bind == "nobind"
    with pytest.raises(pydantic.ValidationError, match="1 core list"):
        EngineSpec(name="e", model="/m", tensor_parallel_size=2, cpu_threads_bind="0-1")
    with pytest.raises(pydantic.ValidationError):
        EngineSpec(name="e", model="/m", cpu_threads_bind="0; rm -rf /")
