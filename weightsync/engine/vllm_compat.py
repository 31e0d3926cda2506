"""The only module that imports vLLM internals or sets vLLM's environment, but for four pieces:
vLLM's LoRA machinery and its FP8 quantization (``weightsync.engine.vllm_lora`` and
``weightsync.engine.vllm_fp8``, compat modules of their own), and two that sit below the
engine: vLLM's stateless process groups, which the transport uses
(``weightsync.transport.vllm_groups``), and its engine arguments, which the configuration
checks (``weightsync.engine_args``).

vLLM renames internal APIs between releases; everything version-dependent lives here so the
rest of weightsync targets one stable surface. Tested against vLLM 0.24 (GPU) and 0.32 (CPU).
"""

from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    return device


def prepare_process_env(device: str, workers: int = 1, cpu_bind: str | None = None,
                        batch_invariant: bool = False) -> None:
    """Set vLLM's environment for the engine process (before vLLM is imported there).

    Must run in the process that builds the engine; its workers inherit it. ``workers``: the
    engine's worker count (tensor x pipeline parallel); ``cpu_bind``: the engine's own
    ``VLLM_CPU_OMP_THREADS_BIND`` (``EngineSpec.cpu_threads_bind``), if it names one;
    ``batch_invariant``: ``EngineSpec.batch_invariant`` (``VLLM_BATCH_INVARIANT``, CUDA).
    """
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")  # fork hangs with CUDA/Ray
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    if device == "cuda":
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "1")
        os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
        if batch_invariant:  # (otherwise the process's own setting, if any, stands)
            os.environ["VLLM_BATCH_INVARIANT"] = "1"
    elif cpu_bind is not None:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind
    elif workers == 1:
        # Several engines share few cores in tests and small hosts: do not pin threads.
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    else:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_threads_bind(
            workers, os.environ.get("VLLM_CPU_OMP_THREADS_BIND"))


def cpu_threads_bind(workers: int, current: str | None = None) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for a CPU engine of ``workers`` workers (> 1).

    vLLM's CPU backend wants one core list per worker ("0-3|4-7"), or "nobind" (no pinning);
    its default, "auto", wants a NUMA node per worker and refuses to start a TP engine on a
    one-node host ("Not enough allowed NUMA nodes"). A value already set that fits ("nobind",
    or ``workers`` lists) is kept; otherwise the cores this process may use are split into
    ``workers`` contiguous lists, round-robin when there are fewer cores than workers ("0|1"
    for two workers on two cores). So engines on one host each pin their own workers this
    way and share cores: measured on 2 cores with two TP=2 engines and a TP=1 engine busy at
    once, 157-163 tok/s pinned against 111-132 with "nobind" (``benchmarks/tp_cpu.py``).
    """
    if current == "nobind" or (current and current != "auto"
                               and len(current.split("|")) == workers):
        return current
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < workers:
        return "|".join(str(cores[i % len(cores)]) for i in range(workers))
    per = len(cores) // workers
    return "|".join(",".join(str(c) for c in cores[i * per:(i + 1) * per])
                    for i in range(workers))


def make_async_engine(*, model: str, dtype: str, max_model_len: int | None, seed: int,
                      enforce_eager: bool | None, tensor_parallel_size: int,
                      gpu_memory_utilization: float, enable_sleep_mode: bool,
                      worker_extension_cls: str,
                      limit_mm_per_prompt: dict[str, int] | None,
                      kv_cache_bytes: int | None = None,
                      engine_args: dict[str, Any] | None = None) -> Any:
    """``AsyncLLM`` with our defaults. ``kv_cache_bytes``: an explicit KV-cache size (CPU
    engines; vLLM's ``VLLM_CPU_KVCACHE_SPACE``, where set, still overrides it in whole GiB).
    ``engine_args``: any other argument of vLLM's engine (``EngineSpec.engine_args``, checked
    by ``weightsync.engine_args`` when the spec was made); they override our defaults."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    kwargs: dict[str, Any] = dict(
        model=model,
        dtype=dtype,
        seed=seed,
        tensor_parallel_size=tensor_parallel_size,
        gpu_memory_utilization=gpu_memory_utilization,
        enable_sleep_mode=enable_sleep_mode,
        worker_extension_cls=worker_extension_cls,
        enable_prefix_caching=True,
    )
    # unset: vLLM's own defaults (the model's context length; CUDA graphs on a GPU)
    if max_model_len is not None:
        kwargs["max_model_len"] = max_model_len
    if enforce_eager is not None:
        kwargs["enforce_eager"] = enforce_eager
    if limit_mm_per_prompt:
        kwargs["limit_mm_per_prompt"] = limit_mm_per_prompt
    if kv_cache_bytes is not None:
        kwargs["kv_cache_memory_bytes"] = kv_cache_bytes
    kwargs.update(engine_args or {})
    return AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))


async def pause_generation(engine: Any, mode: str, *, clear_cache: bool = True) -> None:
    """``AsyncLLM.pause_generation`` without its closing fixed 20 ms sleep.

    vLLM 0.24 and 0.32 pause in two steps (clear the multimodal cache, pause the scheduler:
    abort, drain or freeze what is in flight, and clear the prefix cache unless
    ``clear_cache=False``) and then sleep 20 ms so that in-flight requests' final outputs
    reach their callers first — "not required for correctness", says vLLM. ``EngineHost``
    waits for exactly those outputs instead, so an idle pause costs what its two steps cost.
    Anything without those steps (other releases, stand-ins) gets ``pause_generation`` as is.
    """
    core, renderer = getattr(engine, "engine_core", None), getattr(engine, "renderer", None)
    if not hasattr(core, "pause_scheduler_async") or not hasattr(
            renderer, "clear_mm_cache_async"):
        if clear_cache or "clear_cache" not in inspect.signature(
                engine.pause_generation).parameters:
            return await engine.pause_generation(mode=mode)
        return await engine.pause_generation(mode=mode, clear_cache=False)
    if clear_cache:
        await renderer.clear_mm_cache_async()
    await core.pause_scheduler_async(mode=mode, clear_cache=clear_cache)


async def prompt_logprobs(engine: Any, token_ids: list[int], request_id: str) -> list[float]:
    """The engine's logprob of each of ``token_ids[1:]`` given the tokens before it (vLLM's
    ``prompt_logprobs``, teacher-forced; one token generated and dropped)."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    final = None
    async for out in engine.generate({"prompt_token_ids": list(token_ids)}, params,
                                     request_id=request_id):
        final = out
    rows = final.prompt_logprobs  # [None, {token: Logprob}, ...]
    return [float(row[t].logprob) for t, row in zip(token_ids[1:], rows[1:], strict=True)]


def sampling_params(**kw: Any) -> Any:
    """vLLM's ``SamplingParams(**kw)``: an unknown field is a TypeError, a value vLLM's own
    checks refuse a ValueError (vLLM 0.24 raises ValueError; 0.32 its ``VLLMValidationError``,
    which is not one)."""
    from vllm import SamplingParams

    try:
        from vllm.exceptions import VLLMValidationError as refused  # 0.32 (not in 0.24)
    except ImportError:
        refused = ValueError
    try:
        return SamplingParams(**kw)
    except refused as e:
        raise ValueError(str(e)) from e


def tokenizer(engine: Any) -> Any:
    """The engine's tokenizer (``AsyncLLM.get_tokenizer``; vLLM 0.24 and 0.32)."""
    return engine.get_tokenizer()


def sleep_mode_available() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_sleep_mode_available())


def model_runner_class(worker: Any) -> str:
    r = worker.model_runner
    return f"{type(r).__module__}.{type(r).__qualname__}"


def reload_weights(worker: Any, weights_iterator: Any, is_checkpoint_format: bool = True) -> None:
    """``model_runner.reload_weights`` (same signature in 0.24 and 0.32).

    vLLM's in-place reload (``model_loader.reload``) first moves every layer's parameters to
    the meta device and wraps their loaders, then restores and finalizes each layer. If the
    weights iterator breaks part-way (a sender died mid-stream, a bucket failed its checksum),
    that finalization never runs: layers stay on meta, half-buffered, and marked as loading,
    and the next reload starts from that state. So a broken load is finalized here before the
    error goes on: loaded layers are processed, untouched ones get their previous tensors
    back, and the next reload starts clean. The engine is fenced either way (its weights are
    a mix) until a resync verifies.
    """
    moe = _cpu_moe_versions(worker)
    try:
        worker.model_runner.reload_weights(
            weights_iterator=weights_iterator, is_checkpoint_format=is_checkpoint_format
        )
    except BaseException:
        if is_checkpoint_format:
            _finish_broken_reload(worker)
        raise
    finally:
        _repack_cpu_moe(moe)


def _cpu_moe_versions(worker: Any) -> list[tuple[Any, list[int]]]:
    """The model's MoE layers whose CPU experts repack their weights after loading, with a
    digest of their expert weights (a reload that loads a layer changes them; one that skips it
    puts the same tensors back).

    vLLM 0.32's unquantized MoE method (``_setup_kernel``) runs the experts'
    ``process_weights_after_loading`` only on the first load: on a weight update it copies the
    new weights into place and skips it, and the CPU experts' is where they are prepacked into
    the grouped-GEMM layout (``cpu_prepack_moe_weight``). So after any in-place reload a CPU
    MoE engine computed with unpacked weights read as packed (read in 0.32; GPU experts' hook
    is a no-op by default). The digest costs a read of the expert weights per reload, on CPU
    engines only."""
    m = model(worker)
    cached = getattr(worker, "_ws_cpu_moe_layers", None)
    if cached is None or cached[0] is not m:  # found once per model, not on every reload
        layers = []
        for layer in m.modules():
            kernel = getattr(getattr(layer, "quant_method", None), "moe_kernel", None)
            experts = getattr(kernel, "fused_experts", None)
            if experts is not None and type(experts).__module__.endswith("experts.cpu_moe") \
                    and hasattr(layer, "w13_weight"):
                layers.append(layer)
        cached = worker._ws_cpu_moe_layers = (m, layers)
    return [(layer, _expert_digest(layer)) for layer in cached[1]]


def _expert_digest(layer: Any) -> list[int]:
    from weightsync.transport.packing import digest_tensors

    return digest_tensors([layer.w13_weight, layer.w2_weight])


def _repack_cpu_moe(layers: list[tuple[Any, list[int]]]) -> None:
    """Prepack the CPU MoE layers the reload loaded, as the first load did."""
    for layer, digest in layers:
        if _expert_digest(layer) != digest:
            layer.quant_method.moe_kernel.fused_experts.process_weights_after_loading(layer)


def _finish_broken_reload(worker: Any) -> None:
    import sys

    # only if vLLM's layer-wise reload ran here (a release without it, or a stand-in runner,
    # left nothing half-done)
    layerwise = sys.modules.get("vllm.model_executor.model_loader.reload.layerwise")
    if layerwise is None:
        return
    try:
        layerwise.finalize_layerwise_reload(model(worker), model_config(worker))
    except Exception:
        logger.warning("finalizing a broken reload failed", exc_info=True)


# ---- the engine (AsyncLLM) ---------------------------------------------------------------------
def collective_rpc(engine: Any, method: str, args: tuple = ()) -> Any:
    """``AsyncLLM.collective_rpc`` (a coroutine): one reply per worker."""
    return engine.collective_rpc(method, args=args)


def resume_generation(engine: Any) -> Any:
    return engine.resume_generation()


def sleep(engine: Any, level: int, mode: str | None = None) -> Any:
    """``AsyncLLM.sleep`` (a coroutine); ``mode`` is how requests in flight are paused."""
    return engine.sleep(level=level) if mode is None else engine.sleep(level=level, mode=mode)


def wake_up(engine: Any, tags: list[str] | None) -> Any:
    return engine.wake_up(tags=tags)


# vLLM 0.24 and 0.32 (``EngineCore.wake_up``): a wake that leaves nothing asleep resumes the
# scheduler ("only once all executor memory is resident again"); ``resume_generation`` after
# it would be a round trip that changes nothing
WAKE_RESUMES = True


async def reset_caches(engine: Any) -> bool:
    """Reset the prefix, multimodal and encoder caches. Requests frozen by pause mode "keep"
    hold KV blocks computed with the old weights: they are preempted to recompute. Returns
    whether the prefix cache reset succeeded."""
    ok = await engine.reset_prefix_cache(reset_running_requests=True)
    await engine.reset_mm_cache()
    await engine.reset_encoder_cache()
    return bool(ok)


def generate(engine: Any, prompt: Any, params: Any, request_id: str, **kwargs: Any) -> Any:
    """``AsyncLLM.generate``: an async generator of ``RequestOutput``. ``kwargs``: what vLLM's
    own OpenAI app passes besides (``lora_request``, ``trace_headers``, ``priority``, ...;
    keyword-only in 0.24 and 0.32)."""
    return engine.generate(prompt, params, request_id=request_id, **kwargs)


# ---- vLLM's OpenAI app (weightsync.engine.openai_server) -------------------------------------
# vLLM 0.32 moved the app factory to entrypoints/launchers/ (0.24: openai/api_server.py); in
# 0.32 the token-in/token-out route is registered only with --enable-scale-out (0.24: always)
_DEV_ONLY = ("VLLM_SERVER_DEV_MODE", "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "VLLM_API_KEY")


async def openai_app(engine_client: Any, *, model: str, served_model_name: str,
                     extra_args: tuple[str, ...] = ()) -> Any:
    """vLLM's own OpenAI FastAPI app around ``engine_client``, its state initialised, as
    ``vllm serve`` builds it: arguments from vLLM's serve parser (``--model``,
    ``--served-model-name``, ``extra_args``) checked by vLLM's own validation, then
    ``build_app`` and ``init_app_state``. Nothing is served: the caller serves it and gives it
    its server (``attach_http_server``). Refused (ValueError) while vLLM's dev mode, runtime
    LoRA updating or its own API key is set: they add control routes or a second key check."""
    engine_client.vllm_config  # noqa: B018 - a stand-in engine fails here, before vLLM loads
    import vllm.envs as envs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    on = [name for name in _DEV_ONLY if getattr(envs, name, None)]
    if on:
        raise ValueError(f"unset {', '.join(on)} in the engine's environment: the OpenAI "
                         "server must not expose vLLM's dev routes or check a second key")
    checks: list[Any] = []
    try:  # vLLM 0.32
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.app import build_app
        from vllm.entrypoints.launchers.cli_args import (
            make_arg_parser,
            validate_parsed_serve_args,
        )
    except ImportError:  # vLLM 0.24
        from vllm.entrypoints.openai.api_server import (
            build_app,
            init_app_state,
            validate_api_server_args,
        )
        from vllm.entrypoints.openai.cli_args import (
            make_arg_parser,
            validate_parsed_serve_args,
        )
        checks.append(validate_api_server_args)
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(
        ["--model", model, "--served-model-name", served_model_name, "--disable-fastapi-docs",
         *extra_args])
    if hasattr(args, "enable_scale_out"):  # 0.32: registers /inference/v1/generate
        args.enable_scale_out = True
    for check in (validate_parsed_serve_args, *checks):
        check(args)
    tasks = await engine_client.get_supported_tasks()
    app = build_app(args, tasks, engine_client.model_config)
    await init_app_state(engine_client, app.state, args, tasks)
    return app


def attach_http_server(app: Any, server: Any) -> None:
    """The uvicorn server that serves ``app``: vLLM's engine-error handler reads it
    (``app.state.server``) to stop serving once the engine died."""
    app.state.server = server


@dataclass(frozen=True)
class Completion:
    """What a finished request produced (its first completion)."""

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    finish_reason: str | None


def completion(output: Any) -> Completion:
    """The first completion of a ``RequestOutput``, with the logprob of each sampled token."""
    c = output.outputs[0]
    lps = tuple(float(step[t].logprob) for step, t in zip(c.logprobs, c.token_ids, strict=True)) \
        if c.logprobs else ()
    return Completion(text=c.text, token_ids=tuple(c.token_ids), logprobs=lps,
                      finish_reason=c.finish_reason)


def shutdown(engine: Any) -> None:
    """Stop the engine: vLLM ends its engine-core and worker processes."""
    engine.shutdown()


# ---- inside a worker ---------------------------------------------------------------------------
def model_config(worker: Any) -> Any:
    return worker.model_runner.model_config


def hf_text_config(worker: Any) -> Any:
    mc = worker.model_runner.model_config
    return mc.hf_text_config if hasattr(mc, "hf_text_config") else mc.hf_config


@dataclass(frozen=True)
class WorkerParallel:
    """Where a worker sits in its engine: its rank among the engine's workers and how many
    there are (vLLM's ``parallel_config``: tensor x pipeline (x prefill-context) parallel)."""

    rank: int
    workers: int
    tensor_parallel: int
    pipeline_parallel: int


def worker_parallel(worker: Any) -> WorkerParallel:
    """``parallel_config.rank`` / ``world_size`` as vLLM set them for this worker (0.24 and
    0.32 both set ``parallel_config.rank = rank`` in ``WorkerBase.__init__``)."""
    pc = worker.parallel_config
    return WorkerParallel(rank=int(pc.rank), workers=int(pc.world_size),
                          tensor_parallel=int(pc.tensor_parallel_size),
                          pipeline_parallel=int(pc.pipeline_parallel_size))


def model(worker: Any) -> Any:
    """The worker's ``nn.Module`` as vLLM built it (its parameters in kernel layout)."""
    return worker.model_runner.get_model()


def post_load(module: Any) -> Any:
    """The module's post-load hook (``quant_method.process_weights_after_loading``, bound to
    nothing: call it with the module), or None. vLLM runs it once per module after loading:
    it is where CPU engines pack linear weights for their GEMM (``cpu_linear``), where
    quantized engines quantize and make scales, where MoE experts are repacked."""
    method = getattr(module, "quant_method", None)
    hook = getattr(method, "process_weights_after_loading", None)
    return None if hook is None else (lambda m, _hook=hook: _hook(m))


def cuda_graphs(worker: Any) -> bool:
    """Whether the worker replays captured CUDA graphs (a CUDA engine not in eager mode)."""
    return worker.device.type == "cuda" and \
        not bool(worker.model_runner.model_config.enforce_eager)


def kv_cache_tensors(worker: Any) -> list[Any]:
    """The worker's KV-cache tensors (the model runner's ``kv_caches``, else the attention
    layers' ``kv_cache`` in the forward context): what ``scrub_kv_cache`` zeroes."""
    import torch

    found: list[Any] = []

    def add(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            found.append(x)
        elif isinstance(x, (list, tuple)):
            for y in x:
                add(y)

    add(getattr(worker.model_runner, "kv_caches", None))
    if not found:
        ctx = worker.model_runner.vllm_config.compilation_config.static_forward_context
        for layer in ctx.values():
            add(getattr(layer, "kv_cache", None))
    seen: set[int] = set()
    return [t for t in found if t.numel() and not (t.data_ptr() in seen or seen.add(t.data_ptr()))]


def scrub_kv_cache(worker: Any) -> None:
    """Zero every KV-cache tensor of the worker (``kv_cache_tensors``)."""
    import torch

    with torch.no_grad():
        for t in kv_cache_tensors(worker):
            t.zero_()


def packed_modules(worker: Any) -> dict[str, list[str]]:
    """The model's ``packed_modules_mapping`` (fused module -> checkpoint modules)."""
    return dict(getattr(model(worker), "packed_modules_mapping", {}) or {})


def reload_refusal(worker: Any) -> str | None:
    """Why this vLLM cannot be trusted to load new weights into this model in place, or None.
    A sync (or a checkpoint reload) into such an engine is refused before anything changes.

    - LoRA enabled on a vLLM whose in-place reload does not see through its LoRA layers
      (0.24: a model's ``load_weights`` looks ``qkv_proj.weight`` up where LoRA registered
      ``qkv_proj.base_layer.weight``; 0.32 resolves it, ``reload.inplace``). Adapter syncs
      are not affected.

    MoE experts quantized to FP8 were refused here from f04f8de to e13edc2, on a measurement
    that was misread: a Qwen3-MoE-shaped online-FP8 engine answered apart from a cold one
    after syncs. Compared tensor by tensor (``engine.kernel_reads``, H100, vLLM 0.24, eager
    and CUDA graphs), every tensor its kernels read equalled the cold engine's after 3 syncs;
    and an FP8 MoE engine that was never synced did not repeat its own answers to the same
    prompts either (``benchmarks/results/gpu-suite.json``): vLLM's FP8 MoE forward is not
    reproducible run to run, whatever the weights' history."""
    from weightsync.engine_args import vllm_version

    if getattr(worker.model_runner, "lora_manager", None) is not None:
        import importlib.util

        if importlib.util.find_spec("vllm.model_executor.model_loader.reload.inplace") is None:
            return (f"the engine has LoRA enabled and vLLM {vllm_version()}'s in-place reload "
                    "cannot load base weights into its LoRA-wrapped layers (vLLM 0.32 can): "
                    "sync adapters into it (sync_adapter), or the base into an engine "
                    "started without LoRA")
    return None


def expert_mapping(worker: Any) -> list[tuple[str, str, int, str]]:
    """The model's MoE expert mapping, as its ``load_weights`` uses it: ``(fused parameter
    prefix, checkpoint prefix, expert id, shard)`` — e.g. ``("experts.routed_experts.w13_",
    "experts.0.gate_proj.", 0, "w1")`` in vLLM 0.24 — or none for a dense model. (vLLM 0.32
    declares it per experts layer instead; its CPU engines repack their weights, so no kernel
    layout applies there anyway.)"""
    get = getattr(model(worker), "get_expert_mapping", None)
    if get is None:
        return []
    try:
        return [tuple(e) for e in get()]
    except Exception:
        logger.warning("the model's expert mapping is unavailable", exc_info=True)
        return []


# ---- LoRA adapters from memory (weightsync.engine.adapters) ------------------------------------
# vLLM 0.32 loads adapters only from a path (``WorkerLoRAManager._load_adapter``). These build
# the same ``LoRAModel`` from tensors, checked as ``_load_adapter`` checks, and add and pin it
# in the worker's adapter manager: a request naming its ``lora_int_id`` finds it loaded and
# never reads its path (``LRUCacheWorkerLoRAManager.add_adapter``).
