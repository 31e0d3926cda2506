"""Shared steps of the GPU tests: generate on an engine, compare with HF transformers."""

from __future__ import annotations

import torch

PROMPTS = ["hello world", "the quick brown fox", "one two three"]
N_TOK = 8
LOGPROB_TOL = 1e-2  # |engine - HF| per generated token, same weights


# The KV cache of an engine in a test that shares the GPU (``scripts/gpu_run.sh`` runs such
# tests in streams side by side): a fixed size, so vLLM skips its memory profiling, which
# measures the whole device and fails when another process frees memory meanwhile
# (gpu_worker.determine_available_memory). 1 GiB holds 40k tokens of the fp32 0.5B shape.
SHARED_KV_GIB = 1.0


def start_colocated(name: str, model, dtype: str, make_engine=None, **spec_kw):
    """One engine sharing the GPU with the trainer (this process), v2 runner
    (``make_engine``: ``start_engines``'s, for a test engine), its KV cache
    ``SHARED_KV_GIB`` unless ``gpu_kvcache_gib`` says otherwise (None: from vLLM's profiling
    of ``gpu_memory_utilization``, for ``gpu_exclusive`` tests, which measure the device)."""
    from weightsync.config import EngineSpec
    from weightsync.engine.actor import start_engines

    spec_kw.setdefault("gpu_memory_utilization", 0.4)
    spec_kw.setdefault("enforce_eager", True)  # as the suite was measured; graphs: say so
    spec_kw.setdefault("max_model_len", 512)
    # CUDA graphs captured for batches up to 16 (the tests send 3 prompts), not vLLM's 35
    # sizes up to 256: each graphs engine starts sooner, so the suite fits a device session
    spec_kw["engine_args"] = {"max_num_seqs": 16, **spec_kw.get("engine_args", {})}
    spec_kw.setdefault("gpu_kvcache_gib", SHARED_KV_GIB)
    spec = EngineSpec(name=name, model=str(model), dtype=dtype, num_gpus=0.5, **spec_kw)
    kw = {} if make_engine is None else {"make_engine": make_engine}
    (actor,) = start_engines([spec], timeout_s=240, **kw)
    return actor


def stop_engine(actor) -> None:
    from weightsync.engine.actor import stop_engines

    stop_engines([actor])


def against_cold(warm, warm_out, start_cold) -> dict:
    """The cold-engine oracle: start it (``start_cold()``), generate ``PROMPTS`` on it and
    again on the warm engine, compare every tensor the two engines' kernels read
    (``tensors``: ``engine.kernel_reads.differing``, and the warm engine's tensors that no
    parameter or buffer holds), stop both. The figures of the comparison with ``warm_out``
    (``plain`` outputs of the warm engine): the largest logprob difference, whether each
    prompt's tokens are equal, whether each engine repeats itself (the same prompts again),
    and the cold outputs."""
    import ray

    from weightsync.errors import WeightSyncError

    cold = start_cold()
    try:
        cold_out = plain(engine_generate(cold, PROMPTS))
        again = plain(engine_generate(warm, PROMPTS))
        cold_again = plain(engine_generate(cold, PROMPTS))
        try:
            tensors = tensor_diff(warm, cold)
        except (ray.exceptions.RayError, WeightSyncError) as e:  # the outputs stand without it
            tensors = {"error": repr(e)[:400]}
    finally:
        stop_engine(cold)
        stop_engine(warm)
    return {"max_logprob_diff": max_diff(warm_out, cold_out),
            "tokens_equal": [w[0] == c[0] for w, c in zip(warm_out, cold_out, strict=True)],
            "warm_repeatable": again == warm_out, "cold_repeatable": cold_again == cold_out,
            "tensors": tensors, "cold_out": cold_out}


def same_tensors(found: dict) -> bool:
    """Whether ``against_cold`` found every tensor the two engines' kernels read equal."""
    counts = found["tensors"].get("counts")
    return counts is not None and not any(counts.values())


def tensor_diff(warm, cold) -> dict:
    """Which tensors the two engines' kernels read differ (names, at most 40 of each kind),
    and what the warm engine holds outside its parameters and buffers."""
    import ray

    from weightsync.engine.kernel_reads import differing

    a, b = (ray.get(e.tensor_digests.remote(), timeout=300) for e in (warm, cold))
    found = differing(a, b)
    return {"compared": len(a.digests.keys() & b.digests.keys()),
            **{k: v[:40] for k, v in found.items()},
            "counts": {k: len(v) for k, v in found.items()},
            "unregistered_warm": list(a.unregistered[:40]),
            "unregistered_cold": list(b.unregistered[:40]),
            "opaque_warm": list(a.opaque[:40]), "opaque_cold": list(b.opaque[:40])}


def plain(outs):
    """Each output as (token ids, logprobs), comparable with ==."""
    return [(list(o.token_ids), list(o.logprobs)) for o in outs]


def max_diff(a, b) -> float:
    """The largest logprob difference between two ``plain`` outputs, position by position."""
    return max((abs(x - y) for (_, la), (_, lb) in zip(a, b, strict=True)
                for x, y in zip(la, lb, strict=False)), default=0.0)


def engine_generate(actor, prompts, max_tokens: int = N_TOK):
    import ray

    return ray.get(actor.generate.remote(prompts, max_tokens=max_tokens, logprobs=True,
                                         ignore_eos=True), timeout=300)


def compare_with_hf(logprobs_of, outs) -> list[dict]:
    """Greedy parity, teacher-forced: at every generated position HF's argmax must be the
    engine's token (so HF's greedy continuation is the same sequence) and its logprob must
    be within LOGPROB_TOL of the engine's. ``logprobs_of(i, tokens)`` returns HF's
    log-softmax rows (one per generated token) for output ``i`` continued with ``tokens``."""
    rows = []
    for i, o in enumerate(outs):
        lp = logprobs_of(i, list(o.token_ids))
        toks = list(o.token_ids)
        hf_argmax = lp.argmax(-1).tolist()
        hf_lp = lp.gather(-1, torch.tensor(toks, device=lp.device)[:, None])[:, 0].tolist()
        diffs = [abs(a - b) for a, b in zip(o.logprobs, hf_lp, strict=True)]
        rows.append({"tokens": toks, "hf_argmax": hf_argmax,
                     "tokens_equal": hf_argmax == toks, "max_logprob_diff": max(diffs)})
    return rows


def parity_ok(rows: list[dict]) -> bool:
    return all(r["tokens_equal"] and r["max_logprob_diff"] <= LOGPROB_TOL for r in rows)


def summary(rows: list[dict]) -> dict:
    return {"tokens_equal": all(r["tokens_equal"] for r in rows),
            "max_logprob_diff": max(r["max_logprob_diff"] for r in rows)}


def changed(before, after) -> bool:
    """Different tokens, or (same tokens) logprobs that moved: the weights reached the output."""
    for b, a in zip(before, after, strict=True):
        if b.token_ids != a.token_ids:
            return True
        if max(abs(x - y) for x, y in zip(b.logprobs, a.logprobs, strict=True)) > 1e-3:
            return True
    return False
