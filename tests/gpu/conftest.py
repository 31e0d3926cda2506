"""GPU suite fixtures: one Ray cluster with one GPU, models built here at test time, and a
results file written after every test (so a run cut short still reports what it did).

The trainer is this (pytest) process; every engine is a Ray actor — a different process, as
CUDA IPC requires. Run on the lent H100 with ``scripts/gpu_run.sh``.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata as md
import json
import os
import platform
from pathlib import Path

import pytest

RESULTS: dict = {"meta": {}, "tests": {}, "data": {}}


def _version(pkg: str) -> str | None:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


def _flush() -> None:
    path = os.environ.get("WS_GPU_RESULTS")  # set by scripts/gpu_run.sh
    if path:
        Path(path).write_text(json.dumps(RESULTS, indent=1, sort_keys=True, default=str))


def pytest_sessionstart(session):
    import torch

    RESULTS["meta"] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": os.environ.get("WS_GPU_COMMIT"),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "vllm": _version("vllm"), "ray": _version("ray"),
        "transformers": _version("transformers"), "python": platform.python_version(),
        "env": {k: os.environ.get(k) for k in (
            "VLLM_USE_V2_MODEL_RUNNER", "VLLM_WORKER_MULTIPROC_METHOD",
            "VLLM_USE_FLASHINFER_SAMPLER", "TRITON_F32_DEFAULT")},
    }
    _flush()


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":
        entry = RESULTS["tests"].setdefault(report.nodeid, {})
        if report.when == "call" or entry.get("outcome") in (None, "passed"):
            entry.update(outcome=report.outcome, phase=report.when,
                         seconds=round(report.duration, 3))
            if report.outcome == "failed":
                entry["error"] = str(report.longrepr)[-2000:]
        _flush()


def pytest_sessionfinish(session, exitstatus):
    from tests.gpu.report import summarize

    RESULTS["summary"] = summarize(RESULTS)
    _flush()


@pytest.fixture(scope="session")
def gpu_results() -> dict:
    """Tests put their figures here (timings, memory, parity); written with the outcomes."""
    return RESULTS["data"]


@pytest.fixture(scope="session", autouse=True)
def _exact_fp32():
    """HF reference in true fp32: no TF32 in matmuls or convolutions."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


@pytest.fixture(scope="session")
def gpu_ray():
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(num_cpus=8, num_gpus=1, include_dashboard=False, log_to_driver=True,
             namespace="weightsync-gpu")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def model_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


QWEN05 = dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864,
              vocab_size=151936, tie_word_embeddings=True, dtype="float32")


@pytest.fixture(scope="session")
def text_model(model_root) -> Path:
    """Qwen2.5-0.5B-shaped random model (494M parameters, tied embeddings), saved in fp32."""
    from weightsync.testing.models import build_text_model

    return build_text_model(model_root / "qwen2.5-0.5b-shaped", **QWEN05)


@pytest.fixture(scope="session")
def tokenizer(text_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(text_model)
