"""Shared fixtures. Engines are expensive (~30 s each on CPU): one Ray cluster and one fleet
per session, shared by every integration test."""

from __future__ import annotations

import os

import pytest

import weightsync.testing.legs  # noqa: F401 - registers the test legs (loopback, ...)


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run with -m gpu on the lent H100)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from weightsync.testing.models import build_text_model

    return build_text_model(tmp_path_factory.mktemp("models") / "tiny-qwen2")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             namespace="weightsync-tests")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def fleet(ray_session, tiny_model):
    """Two real vLLM CPU engines on the tiny model."""
    from weightsync.config import EngineSpec
    from weightsync.engine.actor import start_engines, stop_engines

    # eager with a short context: half the start time of vLLM's CPU defaults (compiled, the
    # model's 32k context); other tests' engines take vLLM's defaults
    from weightsync.testing import legs

    # the engines know the test legs (tests sync them by corrupt-one-rank)
    specs = [EngineSpec(name=f"engine-{c}", model=str(tiny_model), dtype="float32",
                        max_model_len=512, enforce_eager=True, leg_modules=legs.MODULES)
             for c in "ab"]
    actors = start_engines(specs)
    yield actors
    stop_engines(actors, timeout_s=30)


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="session")
def policy(tiny_model):
    """The trainer's model. Tests perturb it in place; each sync sends its current state."""
    from weightsync.testing.reference import load_trainer_model

    return load_trainer_model(tiny_model)
