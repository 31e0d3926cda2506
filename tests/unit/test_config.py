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


# ---- EngineSpec.engine_args: vLLM's own engine arguments, checked by vLLM's AsyncEngineArgs ----
def test_engine_args_pass_what_vllm_accepts():
    from weightsync.config import EngineSpec

    spec = EngineSpec(name="e", model="/m", engine_args={
        "max_num_seqs": 8, "enable_prefix_caching": False, "kv_cache_dtype": "auto",
        "compilation_config": {"cudagraph_mode": "NONE"}})
    assert spec.engine_args["max_num_seqs"] == 8


@pytest.mark.parametrize("args,says", [
    ({"max_num_seq": 8}, "did you mean max_num_seqs"),
    ({"max_num_seqs": "8"}, "valid integer"),
    ({"enable_prefix_caching": "yes"}, "valid boolean"),
    ({"kv_cache_dtype": "fp7"}, "kv_cache_dtype"),
    ({"worker_extension_cls": "x.Y"}, "weightsync sets this itself"),
    ({"enable_sleep_mode": False}, "weightsync sets this itself"),
    ({"distributed_executor_backend": "ray"}, "weightsync sets this itself"),
    ({"kv_cache_memory_bytes": 1 << 30}, "or gpu_kvcache_gib (GPU engines)"),
])
def test_engine_args_vllm_refuses_are_refused_with_the_reason(args, says):
    from pydantic import ValidationError

    from weightsync.config import EngineSpec

    with pytest.raises(ValidationError) as e:
        EngineSpec(name="e", model="/m", engine_args=args)
    assert says in str(e.value)


def test_the_kv_cache_size_goes_to_vllm_for_the_engines_device():
    """CPU engines always get ``cpu_kvcache_gib``; GPU engines ``gpu_kvcache_gib`` when set
    (vLLM then skips profiling the device), else nothing: vLLM sizes it from
    ``gpu_memory_utilization``."""
    from pydantic import ValidationError

    from weightsync.config import EngineSpec
    from weightsync.engine.options import engine_args

    spec = EngineSpec(name="e", model="/m", cpu_kvcache_gib=0.25, gpu_kvcache_gib=1.5)
    assert engine_args(spec, "cpu", False)["kv_cache_bytes"] == 1 << 28
    assert engine_args(spec, "cuda", True)["kv_cache_bytes"] == 3 << 29
    assert engine_args(EngineSpec(name="e", model="/m"), "cuda", True)["kv_cache_bytes"] is None
    with pytest.raises(ValidationError, match="greater than 0"):
        EngineSpec(name="e", model="/m", gpu_kvcache_gib=0)


def test_engine_args_with_a_field_of_their_own_become_that_field():
    """As ``WEIGHTSYNC_ENGINE_ARGS`` and the CLI give them (they have no typed fields)."""
    from pydantic import ValidationError

    from weightsync.config import EngineSpec

    spec = EngineSpec(name="e", model="/m", engine_args={
        "max_model_len": 512, "enforce_eager": True, "max_num_seqs": 8})
    assert (spec.max_model_len, spec.enforce_eager) == (512, True)
    assert spec.engine_args == {"max_num_seqs": 8}
    assert EngineSpec(name="e", model="/m", max_model_len=512,
                      engine_args={"max_model_len": 512}).max_model_len == 512
    with pytest.raises(ValidationError, match="max_model_len given twice"):
        EngineSpec(name="e", model="/m", max_model_len=256, engine_args={"max_model_len": 512})


def test_settings_take_engine_args_as_json(monkeypatch):
    from weightsync.config import Settings

    monkeypatch.setenv("WEIGHTSYNC_ENGINE_ARGS", '{"max_num_seqs": 4}')
    assert Settings().engine_args == {"max_num_seqs": 4}


# ---- the Ray a weightsync entrypoint starts itself (weightsync.local_ray, ray_compat) -------
def test_own_ray_gets_token_auth_unless_the_user_chose_a_mode():
    from weightsync.local_ray import own_auth_mode, ray_env, starts_own_ray, unauthenticated

    env = ray_env(None, None)
    assert env["RAY_AUTH_MODE"] == "token" and len(env["RAY_AUTH_TOKEN"]) == 64
    assert ray_env(None, None)["RAY_AUTH_TOKEN"] != env["RAY_AUTH_TOKEN"]  # fresh each time
    assert ray_env(None, "disabled") == {} and ray_env("h:6379", None) == {}
    assert ray_env("local", None)["RAY_AUTH_MODE"] == "token"
    assert not unauthenticated("token") and unauthenticated("disabled") and unauthenticated(None)
    assert starts_own_ray(None) and starts_own_ray("local") and not starts_own_ray("h:6379")
    assert own_auth_mode(None, None) == "token" and own_auth_mode(None, "disabled") == "disabled"
    assert own_auth_mode("h:6379", None) is None


def test_settings_read_rays_auth_mode_as_the_user_set_it(monkeypatch):
    from weightsync.config import Settings

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    assert Settings().ray_auth_mode is None
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert Settings().ray_auth_mode == "disabled"


def test_prepare_applies_ray_env_to_this_process_only_for_its_own_ray():
    import os
    from unittest import mock

    from weightsync.ray_compat import prepare

    # the whole environment restored after (monkeypatch would restore only what it set itself,
    # leaving prepare's RAY_AUTH_MODE=token to a Ray started later in this process: its driver,
    # imported before, has no token and is refused by its own GCS)
    before = dict(os.environ)
    with mock.patch.dict(os.environ):
        os.environ.pop("RAY_AUTH_MODE", None)
        os.environ.pop("RAY_AUTH_TOKEN", None)
        assert prepare("h:6379", None) is None  # a cluster the user provides: nothing set
        assert "RAY_AUTH_MODE" not in os.environ
        assert prepare(None, None) == "token" and os.environ["RAY_AUTH_MODE"] == "token"
        token = os.environ["RAY_AUTH_TOKEN"]
        assert prepare(None, "token") == "token"  # the user's (or an earlier call's) choice
        assert os.environ["RAY_AUTH_TOKEN"] == token
    assert dict(os.environ) == before


def test_serve_refuses_http_beyond_loopback_next_to_an_unauthenticated_own_ray():
    from weightsync.api.server import serve
    from weightsync.config import Settings
    from weightsync.errors import ConfigError

    with pytest.raises(ConfigError, match="without authentication"):
        serve(Settings(host="0.0.0.0", token="t0ken", model="/m"), "disabled")


def test_unset_engine_fields_leave_vllms_defaults():
    """No opinion where the user gave none: vLLM's own defaults hold (CUDA graphs on a GPU,
    the model's context length)."""
    from weightsync.config import EngineSpec

    spec = EngineSpec(name="e", model="/m")
    assert spec.enforce_eager is None and spec.max_model_len is None


# ---- FP8 needs a GPU (#32): refused before anything starts, with the reason ---------------
@pytest.mark.parametrize("method", ["fp8", "fbgemm_fp8", "fp8_per_block", "fp8_per_channel"])
def test_fp8_on_a_cpu_engine_is_refused_when_the_spec_is_made(method):
    from pydantic import ValidationError

    from weightsync.config import EngineSpec

    with pytest.raises(ValidationError, match="needs a CUDA GPU"):
        EngineSpec(name="e", model="/m", device="cpu", engine_args={"quantization": method})
    EngineSpec(name="e", model="/m", device="cuda", engine_args={"quantization": method})


def test_fp8_on_an_auto_engine_that_lands_on_cpu_is_refused_before_vllm_starts():
    import asyncio

    import torch

    from weightsync.config import EngineSpec
    from weightsync.engine.host import EngineHost
    from weightsync.errors import ConfigError

    if torch.cuda.is_available():
        pytest.skip("this host has a GPU: an auto engine lands there")
    host = EngineHost(EngineSpec(name="e", model="/m", engine_args={"quantization": "fp8"}))
    with pytest.raises(ConfigError, match=r"\[e\] quantization 'fp8' needs a CUDA GPU"):
        asyncio.run(host.start())
    assert host.engine is None  # nothing was started


# ---- batch-invariant kernels: CUDA only, refused before anything starts ---------------------
def test_batch_invariant_on_a_cpu_engine_is_refused_when_made_or_started():
    import asyncio

    import torch
    from pydantic import ValidationError

    from weightsync.config import EngineSpec
    from weightsync.engine.host import EngineHost
    from weightsync.errors import ConfigError

    with pytest.raises(ValidationError, match="batch_invariant needs a CUDA GPU"):
        EngineSpec(name="e", model="/m", device="cpu", batch_invariant=True)
    assert EngineSpec(name="e", model="/m", device="cuda", batch_invariant=True).batch_invariant
    if torch.cuda.is_available():
        return  # an auto engine lands on the GPU here
    host = EngineHost(EngineSpec(name="e", model="/m", batch_invariant=True))
    with pytest.raises(ConfigError, match=r"\[e\] batch_invariant needs a CUDA GPU"):
        asyncio.run(host.start())
    assert host.engine is None  # nothing was started


@pytest.mark.parametrize("asked", [True, False])
def test_batch_invariant_sets_vllms_variable_for_a_cuda_engine_only_when_asked(monkeypatch,
                                                                                asked):
    import os

    from weightsync.engine import vllm_compat

    monkeypatch.delenv("VLLM_BATCH_INVARIANT", raising=False)
    for name in ("VLLM_WORKER_MULTIPROC_METHOD", "VLLM_ENABLE_V1_MULTIPROCESSING",
                 "VLLM_USE_V2_MODEL_RUNNER", "VLLM_USE_FLASHINFER_SAMPLER"):
        monkeypatch.setenv(name, "kept")  # (restored after the test)
    vllm_compat.prepare_process_env("cuda", batch_invariant=asked)
    assert os.environ.get("VLLM_BATCH_INVARIANT") == ("1" if asked else None)
