"""Rollouts on the Ray path with vLLM's full sampling parameters and chat conversations
(``EngineHost.generate``, ``weightsync.engine.requests``), on the session's real engines."""

from __future__ import annotations

import pytest
import ray
from transformers import AutoTokenizer

from weightsync.errors import ConfigError
from weightsync.remote import unwrap

pytestmark = pytest.mark.integration
PROMPTS = ["hello world", "the quick brown fox"]


def _gen(actor, prompts=None, **kw):
    try:
        return ray.get(actor.generate.remote(prompts, **kw), timeout=120)
    except Exception as e:  # the host's typed error, through Ray
        raise unwrap(e) from e


def test_stop_strings_end_the_text_where_vllm_says(fleet):
    [full] = _gen(fleet[0], PROMPTS[:1], max_tokens=16, ignore_eos=True)
    stop = full.text[len(full.text) // 2:][:3]
    assert stop.strip(), full.text
    [cut] = _gen(fleet[0], PROMPTS[:1], max_tokens=16, ignore_eos=True,
                 sampling={"stop": [stop]})
    assert cut.finish_reason == "stop" and stop not in cut.text, (full.text, cut.text)
    assert full.text.startswith(cut.text) and len(cut.text) < len(full.text)


def test_seeded_top_p_top_k_samples_repeat_and_n_samples_are_seeded_apart(fleet):
    kw = dict(max_tokens=12, temperature=1.0, seed=11, n=2, ignore_eos=True,
              sampling={"top_p": 0.9, "top_k": 20, "repetition_penalty": 1.1})
    a, b = _gen(fleet[0], PROMPTS, **kw), _gen(fleet[0], PROMPTS, **kw)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]  # seeded: reproducible
    assert len(a) == 4 and a[0].prompt == a[1].prompt == PROMPTS[0]
    assert a[0].token_ids != a[1].token_ids  # copy i is seeded seed + i
    assert all(r.version is not None for r in a)


def test_chat_messages_use_the_models_chat_template(fleet, tiny_model):
    messages = [[{"role": "user", "content": "hello world"}],
                [{"role": "system", "content": "one two"}, {"role": "user", "content": "yes"}]]
    rendered = [AutoTokenizer.from_pretrained(tiny_model).apply_chat_template(
        m, tokenize=False, add_generation_prompt=True) for m in messages]
    chat = _gen(fleet[0], messages=messages, max_tokens=8, logprobs=True, ignore_eos=True)
    plain = _gen(fleet[0], rendered, max_tokens=8, logprobs=True, ignore_eos=True)
    assert [(c.token_ids, c.logprobs) for c in chat] == [(p.token_ids, p.logprobs) for p in plain]


@pytest.mark.parametrize("kw, match", [
    (dict(sampling={"top_q": 0.5}), "vLLM refused the sampling parameters"),
    (dict(sampling={"top_p": 1.5}), "vLLM refused the sampling parameters"),
    (dict(sampling={"n": 4}), "pass n to generate"),
    (dict(sampling={"seed": 4}), "pass seed as generate's own argument"),
    (dict(n=0), "n must be at least 1"),
    (dict(messages=[[{"content": "no role"}]]), "messages\\[0\\]"),
])
def test_bad_sampling_or_messages_are_a_config_error_before_anything_runs(fleet, kw, match):
    prompts = None if "messages" in kw else PROMPTS
    with pytest.raises(ConfigError, match=match):
        _gen(fleet[0], prompts, **kw)


def test_prompts_and_messages_together_are_refused(fleet):
    with pytest.raises(ConfigError, match="prompts or messages"):
        _gen(fleet[0], PROMPTS, messages=[[{"role": "user", "content": "x"}]])
