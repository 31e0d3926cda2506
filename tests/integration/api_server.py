"""Helpers for the control-plane tests: a real uvicorn server in a thread, checkpoints."""

from __future__ import annotations

import copy
import socket
from pathlib import Path

from weightsync.api.server import ServerThread  # noqa: F401 - the tests' server
from weightsync.testing.reference import perturb_


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_checkpoint(policy, tokenizer, out: Path, seed: int, scale: float = 0.3):
    """A perturbed copy of ``policy`` saved as a safetensors checkpoint; returns the copy."""
    model = copy.deepcopy(policy)
    perturb_(model, scale=scale, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return model


TOKEN = "test-token-3f9a"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PROMPTS = ["hello world", "the quick brown fox"]
N_TOK = 8


def outputs(actor):
    import ray

    return ray.get(actor.generate.remote(PROMPTS, max_tokens=N_TOK, logprobs=True,
                                         ignore_eos=True), timeout=120)


def assert_matches_hf(outs, ref) -> None:
    """Engine results equal HF's greedy ``ref`` (``greedy``): tokens, and logprobs to 1e-3."""
    for o, (toks, lps) in zip(outs, ref, strict=True):
        assert list(o.token_ids) == toks, (o.token_ids, toks)
        diff = max(abs(a - b) for a, b in zip(o.logprobs, lps, strict=True))
        assert diff < 1e-3, f"max |logprob diff| {diff:.3g} against HF (tokens equal)"


def assert_parity(fleet, model, tokenizer, version: int) -> None:
    """Every engine's greedy tokens and logprobs equal HF's with ``model``, at ``version``."""
    from weightsync.testing.reference import greedy

    ref = greedy(model, tokenizer, PROMPTS, N_TOK)
    for actor in fleet:
        outs = outputs(actor)
        assert [list(o.token_ids) for o in outs] == [t for t, _ in ref]
        for o, (_, lps) in zip(outs, ref, strict=True):
            assert max(abs(a - b) for a, b in zip(o.logprobs, lps, strict=True)) < 1e-3
        assert {o.version for o in outs} == {version}


def restore(c) -> None:
    """Every test starts and ends with a serving fleet."""
    from weightsync.types import EngineState

    st = c.status()
    paused = [e.name for e in st.engines if e.state == EngineState.PAUSED]
    if paused:
        c.resume(paused)
    asleep = [e.name for e in st.engines
              if e.state in (EngineState.ASLEEP, EngineState.WEIGHTS_AWAKE)]
    if asleep:
        c.wake(engines=asleep)
    if any(e.state == EngineState.FENCED for e in c.status().engines):
        c.reload(None)
    assert all(e.state == EngineState.SERVING for e in c.status().engines)


def serve_again(fleet, coord, policy) -> None:
    """Both engines serving again after a test: resumed if paused, resynced if fenced."""
    import ray

    from weightsync.types import EngineState

    states = [ray.get(a.status.remote()).state for a in fleet]
    for actor, state in zip(fleet, states, strict=True):
        if state == EngineState.PAUSED:
            ray.get(actor.resume.remote())
    if EngineState.FENCED in states:
        assert coord.sync(policy).ok
