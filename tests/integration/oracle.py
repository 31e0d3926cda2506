"""The oracle for weights: a cold engine of the same spec, started from ``save_pretrained`` of
the same weights, compared bit for bit (greedy tokens and logprobs of one fixed batch)."""

from __future__ import annotations

from pathlib import Path

import ray

from weightsync.config import EngineSpec
from weightsync.engine.actor import start_engines, stop_engines
from weightsync.engine.kernel_reads import differing
from weightsync.messages import TensorDigests

PROMPTS = ["hello world", "the quick brown fox", "one two three", "yes no maybe"]
N_TOK = 8

Served = list[tuple[tuple[int, ...], tuple[float, ...]]]


def served(actor) -> Served:
    """The engine's greedy tokens and their logprobs for the fixed batch, as one request
    batch (the same requests in the same batch on every engine compared)."""
    outs = ray.get(actor.generate.remote(PROMPTS, max_tokens=N_TOK, logprobs=True,
                                         ignore_eos=True), timeout=120)
    return [(o.token_ids, o.logprobs) for o in outs]


def save_weights(model, out: Path, tokenizer_dir: Path) -> Path:
    """``model.save_pretrained(out)`` with the tokenizer files of ``tokenizer_dir``."""
    model.save_pretrained(out)
    for f in Path(tokenizer_dir).glob("tok*"):
        (out / f.name).write_bytes(f.read_bytes())
    return out


def cold(spec: EngineSpec, model_dir) -> Served:
    """What a cold engine of ``spec`` started from ``model_dir`` serves (then stopped)."""
    return cold_with_tensors(spec, model_dir)[0]


def served_alone(actor) -> Served:
    """``served``, one prompt at a time: each request alone in the engine, so every step's
    batch is the same on every engine compared (for kernels whose results depend on the
    batch, see ``tests/integration/test_mla_cpu.py``)."""
    outs = [ray.get(actor.generate.remote([p], max_tokens=N_TOK, logprobs=True,
                                          ignore_eos=True), timeout=120)[0] for p in PROMPTS]
    return [(o.token_ids, o.logprobs) for o in outs]


def cold_with_tensors(spec: EngineSpec, model_dir, serve=served) -> tuple[Served, TensorDigests]:
    """``cold`` (as ``serve`` asks it), and every tensor the cold engine's kernels read
    (``engine.kernel_reads``)."""
    cold_spec = spec.model_copy(update={"name": f"{spec.name}-cold", "model": str(model_dir)})
    [actor] = start_engines([cold_spec])
    try:
        return serve(actor), ray.get(actor.tensor_digests.remote(), timeout=120)
    finally:
        stop_engines([actor], timeout_s=30)


def assert_same_tensors(warm, oracle: TensorDigests, what: str) -> None:
    """Every tensor the ``warm`` engine's kernels read equals the cold engine's, by name."""
    found = differing(ray.get(warm.tensor_digests.remote(), timeout=120), oracle)
    assert found == {"differ": [], "only_first": [], "only_second": []}, f"{what}: {found}"


def assert_same(warm: Served, oracle: Served, what: str) -> None:
    diffs = [max((abs(a - b) for a, b in zip(w[1], o[1], strict=False)), default=0.0)
             for w, o in zip(warm, oracle, strict=True)]
    assert warm == oracle, f"{what}: warm != cold (max |logprob diff| per prompt {diffs}; " \
                           f"tokens equal: {[w[0] == o[0] for w, o in zip(warm, oracle)]})"
