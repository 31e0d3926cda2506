"""Rollout requests on the Ray path (``EngineHost.generate``): prompts or chat conversations,
with vLLM's full sampling parameters, validated by vLLM's own ``SamplingParams``.

``generate``'s own arguments (``max_tokens``, ``temperature``, ``logprobs``, ``seed``,
``ignore_eos``, ``n``) keep their meaning; ``sampling`` carries any other ``SamplingParams``
field (``top_p``, ``top_k``, ``min_p``, ``stop``, ``repetition_penalty``, ...). A field vLLM
does not know, or a value it refuses, is a ``ConfigError`` naming it, before any request
starts. Fields weightsync owns are refused with the reason: ``n`` (each of the ``n`` samples
is its own request, stamped with the version that produced it and seeded ``seed + i``) and
``output_kind`` (the host reads each request's final output).

Conversations (``messages``: one list of ``{"role", "content"}`` messages per request) become
prompts through the model's own chat template (the tokenizer's ``apply_chat_template``, with
the generation prompt), as vLLM's chat endpoint renders text conversations.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from weightsync.engine import vllm_compat
from weightsync.engine.gated_engine import Served, wait_routable
from weightsync.errors import ConfigError
from weightsync.types import GenerationResult

OWN_ARGS = ("max_tokens", "temperature", "logprobs", "seed", "ignore_eos")
OWNED = {"n": "pass n to generate: each sample is its own request, stamped with its version",
         "output_kind": "the host reads each request's final output"}


def sampling(base: Mapping[str, Any], extra: Mapping[str, Any] | None, engine: str) -> Any:
    """vLLM's ``SamplingParams`` of ``base`` (generate's own arguments) and ``extra``."""
    extra = dict(extra or {})
    for key in extra:
        if key in OWNED:
            raise ConfigError(f"sampling[{key!r}] is not allowed: {OWNED[key]}", engine=engine)
        if key in OWN_ARGS:
            raise ConfigError(f"sampling[{key!r}]: pass {key} as generate's own argument",
                              engine=engine)
    try:
        return vllm_compat.sampling_params(**base, **extra)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"vLLM refused the sampling parameters: {e}", engine=engine) from e


def chat_prompts(engine: Any, conversations: Sequence[Sequence[Mapping[str, Any]]],
                 name: str) -> list[str]:
    """Each conversation rendered by the model's chat template, ready to generate from."""
    tokenizer = vllm_compat.tokenizer(engine)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError("the model has no chat template: send prompts, not messages",
                          engine=name)
    prompts = []
    for i, messages in enumerate(conversations):
        if not messages or not all(isinstance(m, Mapping) and isinstance(m.get("role"), str)
                                   for m in messages):
            raise ConfigError(f"messages[{i}]: a non-empty list of {{'role', 'content'}} "
                              "messages", engine=name)
        try:
            prompts.append(tokenizer.apply_chat_template(
                [dict(m) for m in messages], tokenize=False, add_generation_prompt=True))
        except Exception as e:
            raise ConfigError(f"messages[{i}]: the chat template refused them: {e}",
                              engine=name) from e
    return prompts


async def generate(host: Served, prompts: Sequence[Any] | None,
                   messages: Sequence[Sequence[Mapping[str, Any]]] | None,
                   base: Mapping[str, Any], extra: Mapping[str, Any] | None, *,
                   seed: int | None, n: int, wait_s: float,
                   adapter: tuple[str, Any] | None = None) -> list[GenerationResult]:
    """``EngineHost.generate``: every request checked before any runs, then admitted through
    the host's serving gate as the HTTP path admits (``gated_engine.wait_routable``: waits
    while a sync or pause holds the gate, refuses a fenced, stopped or unheld sleeping
    engine), ``n`` requests per prompt (copy ``i`` seeded ``seed + i``), each stamped.
    ``adapter``: the LoRA adapter version every request runs with (``engine.adapters``)."""
    name = host.status().name
    if (prompts is None) == (messages is None):
        raise ConfigError("give prompts or messages, not both or neither", engine=name)
    if n < 1:
        raise ConfigError(f"n must be at least 1, not {n}", engine=name)
    params = [sampling({**base, "seed": None if seed is None else seed + i}, extra, name)
              for i in range(n)]
    items = list(prompts) if messages is None else chat_prompts(host.engine, messages, name)
    await wait_routable(host, wait_s)
    host.gate.admit(len(items) * n)  # no await since the gate: begin_sync waits for them
    return list(await asyncio.gather(*(host.gate.run(host.engine, p, params[i],
                                                     lambda: host.version, adapter)
                                       for p in items for i in range(n))))

