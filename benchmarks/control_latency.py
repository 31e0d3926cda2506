"""Control-plane latency: ``GET /healthz`` and ``GET /status`` while reloads and syncs run.

    python -m benchmarks.control_latency                      # ~3 min on two CPU cores
    python -m benchmarks.control_latency --waves 5 --spaced-waves 2 --syncs 10  # shorter
    python -m benchmarks.control_latency --shape small        # longer reloads and syncs

The real control plane (``weightsync.api.create_app`` behind uvicorn on a loopback port, with a
token and a load root, logging at INFO as ``services.serve`` does) over two real vLLM CPU
engines. Every load runs in a process of its own, as an outside client's would, so the numbers
are the service's and not the load generator's:

- a **probe** process (httpx, asyncio) asks ``/healthz`` and ``/status`` at ``--rate`` Hz
  each, open loop (each request leaves on schedule whether or not the last one came back: a
  stalled server cannot hide its stall by slowing the prober down), and records each latency;
- phase ``idle``: nothing else runs;
- phase ``reload-race``: a **racer** process fires ``--waves`` waves of ``--racers``
  concurrent ``POST /reload`` (the model's own directory, inside the load root); each wave
  waits for every answer (one 200, the rest 409), then half a second;
- phase ``reload-race-spaced``: ``--spaced-waves`` such waves 11 s apart, so that each one
  finds the server's worker threads gone (a thread pool drops a thread idle for 10 s) and
  whatever needs threads must start them again;
- phase ``sync``: a **trainer** process pushes ``--syncs`` perturbed copies of the model
  through the service's external sync session (``WeightSyncClient.push_weights``:
  ``POST /sessions``, a gloo broadcast from the trainer to both engines, ``POST
  /sessions/{id}/commit``), back to back.

Inside the server process a task on uvicorn's event loop sleeps 5 ms at a time and records how
late it wakes (``loop_lag``): a late wake-up is the loop blocked, or starved of the GIL or a
core, whatever any one request saw; the process's garbage collections are timed too (one
holds the GIL). Writes ``benchmarks/results/control-latency.json``
(``meta``: commit, device, date, versions, method) and ``control-latency.png``; the server's
log goes to ``<workdir>/server.log``.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import math
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import typer

from benchmarks.meta import run_meta, versions

app = typer.Typer(add_completion=False)
TOKEN = "control-latency-bench"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ENDPOINTS = ("/healthz", "/status")
PHASES = ("idle", "reload-race", "reload-race-spaced", "sync")
SPACED_GAP_S = 11.0  # longer than anyio's and asyncio's idle worker threads live (10 s)
TARGET_P99_MS = 10.0
LAG_TICK_S = 0.005
STALL_S = 0.005  # --stalls: a loop this late (beyond its tick) is sampled


# ---- the load processes ----------------------------------------------------------------------
# Each runs in a process of its own and writes one JSON document to stdout. Times are
# ``time.monotonic()`` (CLOCK_MONOTONIC: one clock for every process on the machine).
async def _probe(url: str, rate: float, stop: asyncio.Event) -> dict[str, list]:
    """``/healthz`` and ``/status`` at ``rate`` Hz each until ``stop``: per endpoint, a list of
    [monotonic time at send, latency in seconds, HTTP status (0: transport error)]."""
    import httpx

    out: dict[str, list] = {e: [] for e in ENDPOINTS}
    period = 1.0 / rate

    async def one(client: httpx.AsyncClient, path: str) -> None:
        sent = time.monotonic()
        try:
            code = (await client.get(path, headers=AUTH)).status_code
        except httpx.HTTPError:
            code = 0
        out[path].append([round(sent, 6), round(time.monotonic() - sent, 6), code])

    async def ticker(path: str, offset: float) -> None:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=16)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
            await client.get(path, headers=AUTH)  # connect before the clock starts
            pending: set[asyncio.Task] = set()
            due = time.monotonic() + offset
            while not stop.is_set():
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                task = asyncio.create_task(one(client, path))
                pending.add(task)
                task.add_done_callback(pending.discard)
                due += period
            await asyncio.gather(*pending)

    await asyncio.gather(*(ticker(p, i * period / len(ENDPOINTS))
                           for i, p in enumerate(ENDPOINTS)))
    return out


async def _probe_until_told(args: dict[str, Any]) -> dict[str, list]:
    stop = asyncio.Event()
    probe = asyncio.create_task(_probe(args["url"], args["rate"], stop))
    await asyncio.to_thread(sys.stdin.readline)  # the orchestrator says when to stop
    stop.set()
    return await probe


def probe_cli(argv: list[str]) -> None:
    """The probe process: samples until a line arrives on stdin."""
    print(json.dumps(asyncio.run(_probe_until_told(json.loads(argv[0])))), flush=True)


async def _reload_waves(args: dict[str, Any]) -> list[dict[str, Any]]:
    """``waves`` waves of ``racers`` concurrent ``POST /reload``; per wave its answers."""
    import httpx

    racers = args["racers"]
    out = []
    limits = httpx.Limits(max_connections=racers, max_keepalive_connections=racers)
    async with httpx.AsyncClient(base_url=args["url"], timeout=600, limits=limits) as client:

        async def post() -> tuple[int, float]:
            t = time.monotonic()
            r = await client.post("/reload", json={"path": args["path"]}, headers=AUTH)
            return r.status_code, time.monotonic() - t

        for _ in range(args["waves"]):
            start = time.monotonic()
            answers = await asyncio.gather(*(post() for _ in range(racers)))
            codes = [c for c, _ in answers]
            out.append({"start": start, "end": time.monotonic(),
                        "codes": {str(c): codes.count(c) for c in sorted(set(codes))},
                        "accepted_s": max((s for c, s in answers if c == 200), default=None)})
            await asyncio.sleep(args["gap_s"])
    return out


def racer_cli(argv: list[str]) -> None:
    """The racer process: the reload waves."""
    print(json.dumps(asyncio.run(_reload_waves(json.loads(argv[0])))), flush=True)


def trainer_cli(argv: list[str]) -> None:
    """The trainer process: loads the model, says ``ready``, waits for a line on stdin, then
    runs ``syncs`` external sync sessions back to back."""
    from weightsync.client import WeightSyncClient
    from weightsync.testing.reference import load_trainer_model, perturb_

    args = json.loads(argv[0])
    model = load_trainer_model(args["model"])
    print("ready", flush=True)
    sys.stdin.readline()
    runs = []
    with WeightSyncClient(args["url"], token=TOKEN, timeout=120) as client:
        for i in range(args["syncs"]):
            perturb_(model, scale=0.01, seed=100 + i)
            t = time.monotonic()
            result = client.push_weights(model)
            runs.append({"start": t, "end": time.monotonic(), "version": result.version,
                         "ok": result.ok})
    print(json.dumps(runs), flush=True)


def _spawn(entry: str, args: dict[str, Any], *, stdin: bool = False) -> subprocess.Popen:
    code = f"import sys, benchmarks.control_latency as m; m.{entry}(sys.argv[1:])"
    return subprocess.Popen([sys.executable, "-c", code, json.dumps(args)], text=True,
                            stdout=subprocess.PIPE,
                            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL)


def _tell(proc: subprocess.Popen, line: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(line + "\n")
    proc.stdin.flush()


def _finish(proc: subprocess.Popen, what: str, timeout: float = 900) -> Any:
    out, _ = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} process exited with {proc.returncode}")
    return json.loads(out.strip().splitlines()[-1])


# ---- the server process: event-loop lag --------------------------------------------------------
_WAITS = frozenset({"wait", "_wait", "select", "sleep", "acquire", "_worker", "get",
                    "poll", "recv", "recv_into", "accept", "readline", "_recv_bytes", "join"})


def _stack(frame: Any, depth: int = 6) -> str:
    where = []
    while frame is not None and len(where) < depth:
        code = frame.f_code
        where.append(f"{Path(code.co_filename).name}:{frame.f_lineno} {code.co_name}")
        frame = frame.f_back
    return " < ".join(where)


class LoopLag:
    """ASGI wrapper that starts, on uvicorn's loop at lifespan startup, a task that sleeps
    ``LAG_TICK_S`` at a time and records how late each wake-up is: (monotonic, lateness).

    It also times the process's garbage collections (``gc.callbacks``): a collection holds the
    GIL, so whichever thread runs it stops the loop for as long as it takes.

    With ``stalls``, a watchdog thread also looks at the loop thread's stack every 2 ms while
    the loop is over ``STALL_S`` late, and counts where it was (a diagnostic: the watchdog
    takes the GIL 500 times a second, so it is off for the measured runs)."""

    def __init__(self, app: Any, *, stalls: bool = False) -> None:
        self.app = app
        self.samples: list[tuple[float, float]] = []
        self.stall_samples: list[tuple[float, str]] = []
        self._stalls = stalls
        self._task: asyncio.Task | None = None
        self._beat = time.monotonic()
        self._loop_thread: int | None = None
        self.collections: list[tuple[float, int, float]] = []  # (end, generation, seconds)
        self._gc_start = 0.0
        gc.callbacks.append(self._gc)

    def _gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_start = time.monotonic()
        else:
            now = time.monotonic()
            self.collections.append((now, info["generation"], now - self._gc_start))

    def collections_between(self, start: float, end: float) -> dict[str, dict[str, float]]:
        """Per generation: how many collections ran, their total and longest milliseconds."""
        out: dict[str, dict[str, float]] = {}
        for t, gen, took in self.collections:
            if start <= t <= end:
                row = out.setdefault(f"gen{gen}", {"count": 0, "total_ms": 0.0, "max_ms": 0.0})
                row["count"] += 1
                row["total_ms"] += took * 1e3
                row["max_ms"] = max(row["max_ms"], took * 1e3)
        return out

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan" and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch())
            self._loop_thread = threading.get_ident()
            if self._stalls:
                threading.Thread(target=self._watchdog, daemon=True, name="lag-watch").start()
        await self.app(scope, receive, send)

    async def _watch(self) -> None:
        while True:
            t = self._beat = time.monotonic()
            await asyncio.sleep(LAG_TICK_S)
            now = self._beat = time.monotonic()
            self.samples.append((now, now - t - LAG_TICK_S))

    def _watchdog(self) -> None:
        names = {}
        while True:
            time.sleep(0.002)
            now = time.monotonic()
            if now - self._beat < LAG_TICK_S + STALL_S:
                continue
            frames = sys._current_frames()
            self.stall_samples.append((now, "loop: " + _stack(frames.get(self._loop_thread))))
            if len(names) != threading.active_count():
                names = {t.ident: t.name for t in threading.enumerate()}
            for ident, frame in frames.items():  # other threads that run Python code
                if ident in (self._loop_thread, threading.get_ident()):
                    continue
                top = frame.f_code.co_name
                if top not in _WAITS:
                    self.stall_samples.append(
                        (now, f"{names.get(ident, ident)}: " + _stack(frame, 4)))

    def between(self, start: float, end: float) -> list[float]:
        return [lag for t, lag in self.samples if start <= t <= end]

    def stalls_between(self, start: float, end: float, top: int = 16) -> list[list]:
        """While the loop was stalled, its thread's most frequent stacks and the other threads
        found running Python: [samples, "thread: stack"]."""
        counts: dict[str, int] = {}
        for t, where in self.stall_samples:
            if start <= t <= end:
                counts[where] = counts.get(where, 0) + 1
        return [[n, w] for w, n in sorted(counts.items(), key=lambda kv: -kv[1])[:top]]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- statistics, results, plot -----------------------------------------------------------------
def _stats_ms(seconds: list[float]) -> dict[str, Any]:
    """Milliseconds: count, mean, p1/p25/p50/p75/p95/p99, max, and every sample over p99 (the
    plot's box, whiskers p1-p99, and its dots)."""
    if not seconds:
        return {"n": 0}
    xs = sorted(s * 1e3 for s in seconds)

    def q(p: float) -> float:  # nearest rank
        return xs[min(len(xs), max(1, math.ceil(p * len(xs)))) - 1]

    out: dict[str, Any] = {"n": len(xs), "mean": sum(xs) / len(xs)}
    out.update({f"p{round(p * 100)}": q(p) for p in (0.01, 0.25, 0.5, 0.75, 0.95, 0.99)})
    out["max"] = xs[-1]
    out["over_p99"] = [round(x, 2) for x in xs if x > out["p99"]]
    return out


def _sched_group() -> str | None:
    """This process's CPU scheduling group (Linux autogroup: a session's processes share the
    CPU with other sessions' by the group's niceness, not their own), if the kernel says."""
    try:
        return Path("/proc/self/autogroup").read_text().strip()
    except OSError:
        return None


def _versions() -> dict[str, str]:
    import fastapi
    import httpx
    import ray
    import uvicorn
    import vllm

    return {"python": platform.python_version(), "vllm": vllm.__version__,
            "ray": ray.__version__, "fastapi": fastapi.__version__,
            "uvicorn": uvicorn.__version__, "httpx": httpx.__version__}


METHOD = " ".join("""
The real control plane (weightsync.api.create_app, uvicorn on 127.0.0.1, a bearer token and
a load root, logging at INFO) over two real vLLM CPU engines ({shape} Qwen2, float32, eager,
512 tokens) in one Ray. A probe process of its own (httpx.AsyncClient) sends GET /healthz and
GET /status (with the token) at {rate:g} Hz each, open loop; latency is send to full response
at the client. Phases: idle ({idle_s:g} s); reload-race: {waves} waves of {racers} concurrent
POST /reload of the model's own directory (one accepted, the rest 409), from a racer process,
0.5 s apart; reload-race-spaced: {spaced} such waves 11 s apart (idle worker threads expire
after 10 s); sync: a trainer process pushing {syncs} perturbed copies of the model through
the service's external sync session (WeightSyncClient.push_weights: POST /sessions, gloo
broadcast, commit), back to back. loop_lag: a task on the server's event loop sleeps 5 ms at
a time and records how late it wakes; loadavg: the machine's 1-minute load average at each
phase's start and end (other work on the machine shows there; Ray runs the engines at
niceness 15, the server at 0); gc: the server process's garbage collections per generation
(gc.callbacks). Machine: {cpus} CPU core(s), shared with the engines, Ray and the load
processes, and with any other session's work: meta.sched_group is the Linux autogroup the
run's processes shared, whose niceness sets their share against other sessions'.
""".split())


def _box(stats: dict[str, Any]) -> dict[str, Any]:
    """matplotlib's ``bxp`` box from ``_stats_ms``: p25-p75, median, whiskers p1-p99, dots
    beyond (a log axis has no zero: values floor at 0.01 ms)."""
    def f(x: float) -> float:
        return max(x, 0.01)

    return {"med": f(stats["p50"]), "q1": f(stats["p25"]), "q3": f(stats["p75"]),
            "whislo": f(stats["p1"]), "whishi": f(stats["p99"]),
            "fliers": [f(x) for x in stats["over_p99"]]}


def plot(result: dict[str, Any], path: Path, baseline: dict[str, Any] | None = None) -> None:
    """Per panel (``/healthz``, ``/status``, loop lag), each phase's distribution as a box
    (whiskers p1-p99, dots beyond); with ``baseline``, its box (grey) beside this run's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(r, c) for r, c in ((baseline, "#8c959f"), (result, "#0969da")) if r is not None]
    phases = [p for p in PHASES if p in result["phases"]]
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.2))
    width = 0.8 / len(runs)
    for ax, key in zip(axes, (*ENDPOINTS, "loop_lag"), strict=True):
        for i, (run, color) in enumerate(runs):
            have = [p for p in phases if p in run["phases"]]
            pos = [phases.index(p) + 1 + (i - (len(runs) - 1) / 2) * width for p in have]
            box = ax.bxp([_box(run["phases"][p][key]) for p in have], positions=pos,
                         widths=width * 0.9, patch_artist=True,
                         flierprops={"markersize": 2, "markeredgecolor": color},
                         medianprops={"color": "black"}, manage_ticks=False)
            for patch in box["boxes"]:
                patch.set_facecolor(color)
            ax.plot([], [], color=color, linewidth=8, label=run["meta"].get("label") or "run")
        labels = []
        for p in phases:
            p99 = " / ".join(f"{r['phases'][p][key]['p99']:.1f}"
                             for r, _ in runs if p in r["phases"])
            labels.append(f"{p}\np99 {p99} ms")
        ax.set_xticks(range(1, len(phases) + 1), labels, fontsize=8)
        ax.set_yscale("log")
        ax.axhline(TARGET_P99_MS, color="#cf222e", linestyle="--", linewidth=1,
                   label=f"{TARGET_P99_MS:g} ms (the p99 target)")
        ax.set_title(f"GET {key}" if key != "loop_lag" else "server event-loop lag (5 ms ticks)")
        ax.set_ylabel("ms (log); box p25-p75, whiskers p1-p99")
        ax.legend(loc="best", fontsize=8)
    meta = result["meta"]
    fig.suptitle(f"control-plane latency under load: 2 vLLM CPU engines ({meta['shape']} "
                 f"Qwen2), {meta['cpus']} CPU cores, commit {meta.get('commit')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- the orchestrator --------------------------------------------------------------------------
@app.command()
def main(rate: float = typer.Option(20.0, min=1.0, help="probes per second, per endpoint"),
         idle_s: float = typer.Option(10.0, min=1.0),
         waves: int = typer.Option(20, min=1), racers: int = typer.Option(50, min=2),
         spaced_waves: int = typer.Option(5, min=1),
         syncs: int = typer.Option(40, min=1),
         out: Path = typer.Option(Path("benchmarks/results/control-latency.json")),
         label: str = typer.Option("", help="a note for meta (e.g. 'before the fix')"),
         phases: str = typer.Option(",".join(PHASES), help="which phases, in order"),
         baseline: Path | None = typer.Option(None, help="an earlier result (e.g. before a "
                                                         "change) to plot beside this one"),
         stalls: bool = typer.Option(False, help="diagnostic: sample the loop thread's stack "
                                                 "while it is late (perturbs the timings)"),
         shape: str = typer.Option("tiny", help="model shape (benchmarks.run.SHAPES)"),
         workdir: Path = typer.Option(Path("runs/control-latency"))) -> None:
    from weightsync.config import Settings
    from weightsync.local_ray import init_kwargs
    from weightsync.ray_compat import prepare

    prepare(None, Settings().ray_auth_mode)  # token authentication, set before Ray's import
    import ray

    from benchmarks.run import SHAPES
    from weightsync.api import create_app
    from weightsync.config import EngineSpec, Settings
    from weightsync.engine.actor import start_engines, stop_engines
    from weightsync.testing.models import build_text_model

    if shape not in SHAPES:
        raise typer.BadParameter(f"{shape!r} is not one of {list(SHAPES)}")
    root = workdir.resolve()
    root.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, filename=root / "server.log", filemode="w",
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    model_dir = build_text_model(root / f"{shape}-qwen2", **SHAPES[shape])
    ray.init(num_cpus=4, namespace="weightsync-control-latency", log_to_driver=False,
             **init_kwargs())
    specs = [EngineSpec(name=f"latency-{c}", model=str(model_dir), dtype="float32",
                        max_model_len=512, enforce_eager=True) for c in "ab"]
    engines = start_engines(specs)
    settings = Settings(host="127.0.0.1", port=_free_port(), token=TOKEN,
                        load_roots=(str(root),), namespace="weightsync-control-latency")
    lag = LoopLag(create_app(settings, engines=engines), stalls=stalls)
    from weightsync.api.server import ServerThread

    server = ServerThread(lag, settings.port, log_level="info", own_logging=False)
    url = server.url
    result: dict[str, Any] = {"meta": run_meta(
        "control-latency", device="cpu", versions={**versions(), **_versions()}, label=label,
        shape=shape, sched_group=_sched_group(),
        method=METHOD.format(rate=rate, idle_s=idle_s, waves=waves, racers=racers,
                                spaced=spaced_waves,
                                syncs=syncs, cpus=os.cpu_count(), shape=shape),
        target_p99_ms=TARGET_P99_MS), "phases": {}}
    base = {"url": url, "rate": rate}
    try:
        server.start()
        for phase in [p for p in PHASES if p in phases.split(",")]:
            extra: dict[str, Any] = {}
            trainer = None
            if phase == "sync":  # load the trainer's model before the clock starts
                trainer = _spawn("trainer_cli", {"url": url, "model": str(model_dir),
                                                 "syncs": syncs}, stdin=True)
                assert trainer.stdout is not None
                if trainer.stdout.readline().strip() != "ready":
                    raise RuntimeError("the trainer process did not start")
            probe = _spawn("probe_cli", base, stdin=True)
            time.sleep(1.0)  # a second of probes first (the probe's connections are up)
            start, load_start = time.monotonic(), os.getloadavg()[0]
            if phase == "idle":
                time.sleep(idle_s)
            elif phase.startswith("reload-race"):
                spaced = phase == "reload-race-spaced"
                racer = _spawn("racer_cli", {
                    "url": url, "waves": spaced_waves if spaced else waves, "racers": racers,
                    "path": str(model_dir), "gap_s": SPACED_GAP_S if spaced else 0.5})
                extra["waves"] = _finish(racer, "racer")
            else:
                assert trainer is not None
                _tell(trainer, "go")
                extra["syncs"] = _finish(trainer, "trainer")
            end = time.monotonic()
            _tell(probe, "stop")
            samples = _finish(probe, "probe")
            lags = lag.between(start, end)
            row = {"wall_s": end - start, "loadavg": [load_start, os.getloadavg()[0]], **extra,
                   "loop_lag": _stats_ms(lags),
                   "gc": lag.collections_between(start, end)}
            for e in ENDPOINTS:  # the samples sent while the phase ran
                kept = [s for s in samples[e] if start <= s[0] <= end]
                row[e] = _stats_ms([s[1] for s in kept])
                row[e]["errors"] = sum(1 for s in kept if s[2] != 200)
                # when each slow (or failed) answer was sent, in seconds into the phase
                row[e]["slow"] = [[round(t - start, 3), round(took * 1e3, 2), code]
                                  for t, took, code in kept
                                  if took * 1e3 > TARGET_P99_MS or code != 200]
            for key in ("waves", "syncs"):  # their times, in seconds into the phase too
                for item in row.get(key, ()):
                    item["start"], item["end"] = (round(item["start"] - start, 3),
                                                  round(item["end"] - start, 3))
            if stalls:
                row["stalls"] = lag.stalls_between(start, end)
            result["phases"][phase] = row
            print(f"{phase:12s} " + "  ".join(
                f"{k} p50 {row[k]['p50']:.1f} p95 {row[k]['p95']:.1f} p99 {row[k]['p99']:.1f} "
                f"max {row[k]['max']:.1f} ms" for k in (*ENDPOINTS, "loop_lag"))
                + f"  load {row['loadavg']}  gc {row['gc']}", flush=True)
    finally:
        server.stop()
        stop_engines(engines, timeout_s=30)
        ray.shutdown()
    result["meta"]["within_target"] = all(
        result["phases"][p][e]["p99"] <= TARGET_P99_MS for p in result["phases"]
        for e in ENDPOINTS)
    out.parent.mkdir(parents=True, exist_ok=True)
    before = json.loads(baseline.read_text()) if baseline is not None else None
    if before is not None:  # travels with this result: the comparison is in one file
        result["baseline"] = before
    out.write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"), before)
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    app()
