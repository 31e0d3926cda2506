"""How the GRPO job samples its groups: through Ray (``EngineHost.generate``) or through the
fleet's OpenAI-compatible router with the real ``openai`` client (``--rollout openai``).

Both return, per prompt, ``group_size`` samples, each with the prompt's token ids as the
engine saw them, the sampled token ids and their logprobs, and the weight version that produced
them; both refuse (``VerificationError``) a sample from any other version than the one just
synced. The OpenAI path asks the router for that version (``min_weight_version``), so a
request never runs on older weights, and reads the version back from every response.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from weightsync.adapters import version_of
from weightsync.errors import VerificationError


@dataclass(frozen=True)
class Sample:
    prompt_ids: list[int]
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    version: int | None  # None: the request lived across a sync (keep mode)
    engine: str | None = None


def _check(groups: list[list[Sample]], expect_version: int) -> list[list[Sample]]:
    for group in groups:
        for s in group:
            if s.version != expect_version:
                raise VerificationError(f"a sample came from weight version {s.version}, "
                                        f"expected {expect_version}")
    return groups


class RayRollouts:
    """``group_size`` completions per prompt through the engines' ``generate`` (Ray), prompts
    spread round-robin over the engines. With ``lora`` (an adapter's name) every request names
    the adapter, and a sample's version is the adapter version that served it
    (``<name>@v<N>``), not the base weights'."""

    name = "ray"

    def __init__(self, actors: list[Any], prompt_ids: Callable[[str], list[int]],
                 lora: str | None = None) -> None:
        self.actors, self.prompt_ids, self.lora = actors, prompt_ids, lora

    def _version(self, result: Any) -> int | None:
        if self.lora is None:
            return result.version
        return version_of(result.adapter, self.lora)

    def sample(self, prompts: Sequence[str], group_size: int, max_tokens: int,
               expect_version: int, timeout_s: float = 600.0) -> list[list[Sample]]:
        import ray

        n = len(self.actors)
        shards = [list(range(len(prompts)))[i::n] for i in range(n)]
        refs = {i: self.actors[i].generate.remote([prompts[j] for j in shard],
                                                  max_tokens=max_tokens, temperature=1.0,
                                                  n=group_size, logprobs=True, ignore_eos=True,
                                                  lora=self.lora)
                for i, shard in enumerate(shards) if shard}
        groups: list[list[Sample]] = [[] for _ in prompts]
        for i, ref in refs.items():
            out = ray.get(ref, timeout=timeout_s)
            for k, j in enumerate(shards[i]):
                ids = self.prompt_ids(prompts[j])
                groups[j] = [Sample(ids, r.token_ids, r.logprobs, self._version(r))
                             for r in out[k * group_size:(k + 1) * group_size]]
        return _check(groups, expect_version)

    def close(self) -> None:
        pass


class OpenAIRollouts:
    """The control plane (with its rollout router) served in this process over the job's own
    engines, and the real ``openai`` client against its ``/v1``: one chat completion per prompt
    with ``n=group_size``, logprobs, the token ids vLLM saw and sampled (``return_token_ids``),
    and the version bound."""

    name = "openai"

    def __init__(self, actors: list[Any], *, namespace: str, host: str = "127.0.0.1",
                 port: int = 0, token: str | None = None, wait_s: float = 120.0,
                 lora: str | None = None) -> None:
        """``host``/``port``: where the router listens (loopback and a free port by default;
        another address needs ``token``, the job's bearer token for rollout clients outside
        it, as the control plane's rules say: ``api.app.check_bind``). ``lora``: an adapter's
        name: requests ask for it as their model, and a sample's version is the adapter
        version that ran it (``X-Adapter-Version``), not the base weights'."""
        import openai

        from weightsync.api import create_app
        from weightsync.api.server import ServerThread
        from weightsync.config import Settings

        token = token or secrets.token_urlsafe(24)
        settings = Settings(host=host, port=port, token=token, namespace=namespace)
        self.server = ServerThread(create_app(settings, engines=actors), port,
                                   host=host).start()
        self.base_url = f"{self.server.url}/v1"
        self.client = openai.OpenAI(base_url=self.base_url, api_key=token, max_retries=0,
                                    timeout=wait_s + 600.0)
        self.wait_s = wait_s
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="rollout")
        self.lora = lora
        self.model = lora or self.client.models.list().data[0].id

    def _one(self, prompt: str, group_size: int, max_tokens: int, version: int) -> list[Sample]:
        raw = self.client.chat.completions.with_raw_response.create(
            model=self.model, messages=[{"role": "user", "content": prompt}], n=group_size,
            max_tokens=max_tokens, temperature=1.0, logprobs=True,
            extra_headers={"X-Wait-S": str(self.wait_s)},
            extra_body={"ignore_eos": True, "return_token_ids": True,
                        # (an adapter's version is not the fleet's: no bound on the base)
                        **({} if self.lora else {"min_weight_version": version})})
        resp = raw.parse()
        extra = resp.model_extra or {}
        prompt_ids = list(extra["prompt_token_ids"])
        engine = raw.headers.get("x-engine")
        served = extra.get("weight_version")
        if self.lora is not None:
            served = version_of(raw.headers.get("x-adapter-version"), self.lora)
        out = []
        for choice in resp.choices:
            ids = tuple((choice.model_extra or {})["token_ids"])
            lps = tuple(t.logprob for t in (choice.logprobs.content or [])) \
                if choice.logprobs is not None else ()
            if len(lps) != len(ids):
                raise VerificationError(f"{len(ids)} tokens but {len(lps)} logprobs came back")
            out.append(Sample(prompt_ids, ids, lps, served, engine))
        return out

    def sample(self, prompts: Sequence[str], group_size: int, max_tokens: int,
               expect_version: int) -> list[list[Sample]]:
        futures = [self._pool.submit(self._one, p, group_size, max_tokens, expect_version)
                   for p in prompts]
        return _check([f.result() for f in futures], expect_version)

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self.client.close()
        self.server.stop()
