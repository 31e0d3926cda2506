"""The rollout router: what it costs per request, and what session stickiness buys.

    python -m benchmarks.router                  # ~4 min on two CPU cores
    python -m benchmarks.router --sessions 60 --turns 5

Two real vLLM CPU engines (the tiny test model, eager, prefix caching on), the real control
plane with its router (``weightsync.routing``) served by uvicorn on a loopback port, and a
client in this process (aiohttp, as the router's own client to the engines). Three measurements, written to
``benchmarks/results/router-cpu.json`` (``meta``: commit, device, date, versions, method) and
``router-cpu.png``:

- **overhead**: ``--pairs`` pairs of the same one-token completion, one sent to the router
  (its session key pins it to engine A) and one straight to engine A's own vLLM app (with a
  token granted to the benchmark), in alternating order; the router's overhead is the median
  of the per-pair differences (pairing cancels the drift of a shared two-core box);
- **throughput**: ``--concurrency`` clients send ``--requests`` completions of
  ``--max-tokens`` tokens each, all to engine A, once through the router and once direct,
  three rounds alternating; tokens per second, router / direct;
- **sessions**: ``--sessions`` multi-turn chats of ``--turns`` turns (a short shared task
  prompt, each session its own long first message, the engine's answer and a short user message
  appended each turn), ``--concurrency`` sessions at a time, each session's turns in order,
  across both engines, twice: with the session's key (``X-Session-ID``: sticky) and with a
  fresh key per request (random: round-robin in expectation). The
  prefix-cache hit rate is vLLM's own: the change of ``vllm:prefix_cache_hits_total`` over
  ``vllm:prefix_cache_queries_total`` (tokens), summed over both engines' ``/metrics``, with
  every cache reset in between (a real sync would reset it too).

vLLM's prefix cache holds whole KV blocks: a turn re-reads the previous turn's last partial
block. vLLM's CPU backend makes blocks of 128 tokens unless told (GPU backends: 16), which
costs a multi-turn chat about a block per turn; the engines here use ``--block-size`` 32 (the
CPU backend's preferred multiple), as a rollout fleet serving multi-turn sessions would.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import re
import secrets
import statistics
import time
from pathlib import Path
from typing import Any

import typer

from benchmarks.meta import run_meta

RESULTS = Path(__file__).resolve().parent / "results"
WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
         "november oscar papa quebec romeo sierra tango uniform victor whiskey xray").split()


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


class _Answer:
    """What a benchmark request got back (read whole)."""

    def __init__(self, status: int, headers: Any, body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        return json.loads(self.body)


async def _post(client: Any, url: str, headers: dict, body: dict) -> _Answer:
    async with client.post(url, json=body, headers=headers) as r:
        answer = _Answer(r.status, r.headers, await r.read())
    if answer.status != 200:
        raise RuntimeError(f"{url}: {answer.status} {answer.body[:300]!r}")
    return answer


async def _metric_sum(client: Any, url: str, token: str, name: str) -> float:
    async with client.get(f"{url}/metrics",
                          headers={"Authorization": f"Bearer {token}"}) as r:
        text = await r.text()
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}{{[^}}]*}} (\S+)$", text, re.M))


async def _hit_rate(client: Any, urls: list[str], token: str, before: list[tuple[float, float]]
                    ) -> tuple[float, list[tuple[float, float]]]:
    await asyncio.sleep(0.5)  # vLLM records a step's stats after its output
    now = [(await _metric_sum(client, u, token, "vllm:prefix_cache_hits_total"),
            await _metric_sum(client, u, token, "vllm:prefix_cache_queries_total"))
           for u in urls]
    hits = sum(n[0] - b[0] for n, b in zip(now, before, strict=True))
    queries = sum(n[1] - b[1] for n, b in zip(now, before, strict=True))
    return (hits / queries if queries else 0.0), now


async def _overhead(client: Any, router: str, direct: str, auth: dict, engine_auth: dict,
                    session: str, body: dict, pairs: int) -> dict[str, Any]:
    diffs, via, straight = [], [], []
    for i in range(pairs + 5):
        order = ("router", "direct") if i % 2 else ("direct", "router")
        took = {}
        for which in order:
            t0 = time.perf_counter()
            if which == "router":
                await _post(client, f"{router}/v1/completions",
                            {**auth, "X-Session-ID": session}, body)
            else:
                await _post(client, f"{direct}/v1/completions", engine_auth, body)
            took[which] = time.perf_counter() - t0
        if i >= 5:  # warm-up pairs dropped
            diffs.append(took["router"] - took["direct"])
            via.append(took["router"])
            straight.append(took["direct"])
    ms = 1e3
    return {"pairs": pairs, "overhead_p50_ms": statistics.median(diffs) * ms,
            "overhead_p90_ms": statistics.quantiles(diffs, n=10)[-1] * ms,
            "router_p50_ms": statistics.median(via) * ms,
            "direct_p50_ms": statistics.median(straight) * ms,
            "diffs_ms": [d * ms for d in diffs]}


async def _throughput(client: Any, url: str, headers: dict, body: dict, requests: int,
                      concurrency: int) -> float:
    queue = list(range(requests))
    tokens = 0

    async def worker() -> None:
        nonlocal tokens
        while queue:
            queue.pop()
            r = await _post(client, f"{url}/v1/completions", headers, body)
            tokens += r.json()["usage"]["completion_tokens"]

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return tokens / (time.perf_counter() - t0)


async def _sessions(client: Any, router: str, auth: dict, model: str, sessions: int, turns: int,
                    sticky: bool, seed: int, concurrency: int) -> dict[str, Any]:
    """Every session's turns one after another (each waits for its answer), ``concurrency``
    sessions at a time, as an agent rollout runs them."""
    rng = random.Random(seed)
    task = "You are playing a word game. " + _text(rng, 30)
    chats = [[{"role": "system", "content": task},
              {"role": "user", "content": _text(rng, 120)}] for _ in range(sessions)]
    additions = [[_text(rng, 8) for _ in range(turns)] for _ in range(sessions)]
    engines: list[list[str]] = [[] for _ in range(sessions)]
    limit = asyncio.Semaphore(concurrency)

    async def one(s: int) -> None:
        async with limit:
            messages = chats[s]
            for turn in range(turns):
                # sticky: the session's key; otherwise a fresh key per request, which spreads
                # requests over the engines at random (round-robin in expectation; the router
                # with no key at all picks the least-loaded engine, which for one client at a
                # time is mostly where its last request went)
                key = f"session-{seed}-{s}" if sticky else secrets.token_hex(8)
                headers = {**auth, "X-Session-ID": key}
                r = await _post(client, f"{router}/v1/chat/completions", headers, {
                    "model": model, "messages": messages, "max_tokens": 12, "temperature": 0,
                    "ignore_eos": True})
                engines[s].append(r.headers["x-engine"])
                messages.append({"role": "assistant",
                                 "content": r.json()["choices"][0]["message"]["content"]})
                messages.append({"role": "user", "content": additions[s][turn]})

    await asyncio.gather(*(one(s) for s in range(sessions)))
    moves = sum(a != b for e in engines for a, b in zip(e, e[1:]))
    return {"engines_per_session_mean": statistics.mean(len(set(e)) for e in engines),
            "engine_changes_per_session_mean": moves / sessions}


async def _run(router: str, urls: list[str], token: str, engine_token: str, model: str,
               args: dict[str, Any], reset: Any) -> dict[str, Any]:
    import aiohttp

    auth = {"Authorization": f"Bearer {token}"}
    engine_auth = {"Authorization": f"Bearer {engine_token}"}
    async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=120),
            connector=aiohttp.TCPConnector(limit=64, keepalive_timeout=3)) as client:
        # a session key the router sends to engine A (urls[0])
        session = ""
        for i in range(1000):
            r = await _post(client, f"{router}/tokenize", {**auth, "X-Session-ID": f"pin-{i}"},
                            {"model": model, "prompt": "x"})
            if r.headers["x-engine"] == args["a"]:
                session = f"pin-{i}"
                break
        one = {"model": model, "prompt": "the answer is", "max_tokens": 1, "temperature": 0}
        overhead = await _overhead(client, router, urls[0], auth, engine_auth, session, one,
                                   args["pairs"])
        body = {"model": model, "prompt": "the answer is", "max_tokens": args["max_tokens"],
                "temperature": 1.0, "ignore_eos": True}
        rounds = []
        for _ in range(3):
            direct = await _throughput(client, urls[0], engine_auth, body, args["requests"],
                                       args["concurrency"])
            via = await _throughput(client, router, {**auth, "X-Session-ID": session}, body,
                                    args["requests"], args["concurrency"])
            rounds.append({"direct_tok_s": direct, "router_tok_s": via})
        throughput = {"rounds": rounds,
                      "direct_tok_s": statistics.median(r["direct_tok_s"] for r in rounds),
                      "router_tok_s": statistics.median(r["router_tok_s"] for r in rounds)}
        throughput["ratio"] = throughput["router_tok_s"] / throughput["direct_tok_s"]
        sessions = {}
        for sticky in (True, False):
            await reset()
            before = [(await _metric_sum(client, u, engine_token, "vllm:prefix_cache_hits_total"),
                       await _metric_sum(client, u, engine_token,
                                         "vllm:prefix_cache_queries_total")) for u in urls]
            t0 = time.perf_counter()
            out = await _sessions(client, router, auth, model, args["sessions"], args["turns"],
                                  sticky, seed=11, concurrency=args["concurrency"])
            rate, _ = await _hit_rate(client, urls, engine_token, before)
            out.update(hit_rate=rate, seconds=time.perf_counter() - t0)
            sessions["sticky" if sticky else "random"] = out
    return {"overhead": overhead, "throughput": throughput, "sessions": sessions}


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    o = result["overhead"]
    axes[0].hist(o["diffs_ms"], bins=40)
    axes[0].axvline(o["overhead_p50_ms"], color="k", ls="--",
                    label=f"p50 {o['overhead_p50_ms']:.2f} ms")
    axes[0].set_xlabel("router - direct, same request (ms)")
    axes[0].set_title("router overhead per request")
    axes[0].legend()
    t = result["throughput"]
    axes[1].bar(["direct", "router"], [t["direct_tok_s"], t["router_tok_s"]])
    axes[1].set_ylabel("completion tokens / s")
    axes[1].set_title(f"throughput (router/direct {t['ratio']:.3f})")
    s = result["sessions"]
    axes[2].bar(["sticky", "random"], [100 * s["sticky"]["hit_rate"],
                                       100 * s["random"]["hit_rate"]])
    axes[2].set_ylabel("prefix-cache hit rate (%)")
    axes[2].set_title(f"{result['method']['sessions']} sessions x {result['method']['turns']} "
                      "turns, 2 engines")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(pairs: int = typer.Option(300, min=20), requests: int = typer.Option(96, min=8),
         concurrency: int = typer.Option(8, min=1), max_tokens: int = typer.Option(16, min=1),
         sessions: int = typer.Option(50, min=2), turns: int = typer.Option(16, min=2),
         block_size: int = typer.Option(32, min=16, help="the engines' KV block size (vLLM "
                                        "caches whole blocks: see the module docstring)"),
         workdir: Path = typer.Option(Path("runs/bench-router")),
         out: Path = typer.Option(RESULTS / "router-cpu.json")) -> None:
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import ray

    from weightsync.api import create_app
    from weightsync.api.server import ServerThread
    from weightsync.config import EngineSpec, Settings
    from weightsync.engine.actor import start_engines, stop_engines
    from weightsync.local_ray import init_kwargs
    from weightsync.testing.models import build_text_model

    logging.basicConfig(level=logging.WARNING)
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = build_text_model(workdir / "tiny-qwen2")
    ray.init(num_cpus=4, namespace="weightsync-bench-router", log_to_driver=False,
             **init_kwargs())
    specs = [EngineSpec(name=f"router-{c}", model=str(model_dir), dtype="float32",
                        max_model_len=2048, enforce_eager=True,
                        engine_args={"enable_prefix_caching": True,
                                     "block_size": block_size}) for c in "ab"]
    actors = start_engines(specs)
    token, engine_token = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    settings = Settings(host="127.0.0.1", port=0, token=token,
                        namespace="weightsync-bench-router")
    server = ServerThread(create_app(settings, engines=actors)).start()
    try:
        urls = ray.get([a.serve_openai.remote(engine_token) for a in actors], timeout=300)
        model = ray.get(actors[0].status.remote()).model

        async def reset() -> None:
            await asyncio.gather(*(a.reset_caches.remote() for a in actors))

        args = dict(pairs=pairs, requests=requests, concurrency=concurrency,
                    max_tokens=max_tokens, sessions=sessions, turns=turns,
                    block_size=block_size, a=specs[0].name)
        result = asyncio.run(_run(server.url, urls, token, engine_token, model, args, reset))
    finally:
        server.stop()
        stop_engines(actors)
        ray.shutdown()
    result["method"] = {**{k: v for k, v in args.items() if k != "a"},
                        "engines": 2, "model": "tiny test model (weightsync.testing.models)",
                        "note": __doc__.split("\n\n", 2)[2].strip()}
    result = {"meta": run_meta("router", device="cpu"), **result}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    _plot(result, out.with_suffix(".png"))
    o, t, s = result["overhead"], result["throughput"], result["sessions"]
    print(f"router overhead p50 {o['overhead_p50_ms']:.3f} ms (router {o['router_p50_ms']:.2f} "
          f"vs direct {o['direct_p50_ms']:.2f} ms); throughput router/direct {t['ratio']:.3f}; "
          f"prefix-cache hit rate sticky {s['sticky']['hit_rate']:.1%} vs random "
          f"{s['random']['hit_rate']:.1%}\n{out}")


if __name__ == "__main__":
    typer.run(main)
