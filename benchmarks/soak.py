"""Chaos soak (not in CI): randomized rounds of a trainer dying mid-sync against real vLLM CPU
engines, each followed by a new trainer's sync checked against HF. Writes JSON + PNG.

    python -m benchmarks.soak --rounds 20

Each round picks a fault: the trainer process (``weightsync.testing.dying_trainer``) SIGKILLs
itself at a random bucket of the broadcast (staged or streaming apply), right before the
engines apply, or after they applied; or it stops (SIGSTOP) holding a random bucket past the
deadline and resumes (SIGCONT) once the engines recovered, when its sync must fail and change
nothing; or an ENGINE is killed mid-transfer (``ray.kill`` or SIGKILL of its actor's process at
a random bucket of an in-process trainer's broadcast): that sync must fail within the deadline,
the survivor settle as below, and the killed engine be restarted from its spec and swapped in
(``SyncCoordinator.replace_engine``: fenced until the resync); or no fault (a clean sync). After
a kill, every (surviving) engine must answer ``status`` throughout and, within twice the
deadline, either serve its old version with unchanged output or be fenced with a reason (or,
streaming apply with an engine killed, serve the failed sync's version if it verified it: that
mode is not all-or-nothing, and its output must then match those weights). Then a
new trainer syncs new weights and both engines must match HF: the logprob of every token an
engine generates greedily, as HF scores it, within 1e-3 of the engine's own.

An engine restart takes 20-45 s on two CPU cores, so the engine kill is drawn less often
(``WEIGHTS``); ``--fault`` forces one fault in every round (a smoke run).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import typer

from benchmarks.meta import commit, run_meta

app = typer.Typer(add_completion=False)
PROMPTS = ["hello world", "the quick brown fox"]
NAMES = ("soak-a", "soak-b")
ENGINE_KILL = "engine killed mid-transfer"
FAULTS = ["staged mid-broadcast", "streaming mid-broadcast", "before apply", "after apply",
          "held bucket", ENGINE_KILL, "none"]
WEIGHTS = [1, 1, 1, 1, 1, 1.25, 1]  # the engine kill in ~1 round of 5 (its restart is slow)


def _tokens(engines) -> list:
    import ray

    outs = ray.get([a.generate.remote(PROMPTS, max_tokens=8, logprobs=True) for a in engines],
                   timeout=120)
    return [[(o.token_ids, o.logprobs) for o in per] for per in outs]


def _gap_to_hf(engines, model, tokenizer) -> float:
    """The largest |engine logprob - HF logprob| over every engine's own greedy tokens (HF
    scores the engine's continuation: a near-tie cannot make equal weights look different)."""
    from weightsync.testing.reference import scored

    gap = 0.0
    for per in _tokens(engines):
        for prompt, (ids, lps) in zip(PROMPTS, per, strict=True):
            ref = scored(model, tokenizer, prompt, list(ids))
            gap = max(gap, *(abs(a - b) for a, b in zip(lps, ref, strict=True)))
    return gap


def _settle(engines, since: float, limit_s: float) -> tuple[list, float]:
    """Poll ``status`` (it must answer throughout) until every engine serves or is fenced with
    no sync owning it, or ``limit_s`` passed; (the statuses, seconds since ``since``)."""
    import ray

    from weightsync.types import EngineState

    settled = {EngineState.SERVING, EngineState.FENCED}
    while True:
        statuses = ray.get([a.status.remote() for a in engines], timeout=5)
        if all(s.state in settled and s.owner is None for s in statuses):
            break
        if time.monotonic() - since > limit_s:
            break
        time.sleep(0.1)
    return statuses, time.monotonic() - since


def _kill_round(engines, gcs: str, model_dir: Path, fault: str, buckets: int, seed: int,
                rng: random.Random) -> dict:
    import ray

    from weightsync.testing.dying_trainer import DEADLINE_S
    from weightsync.types import EngineState

    apply = "streaming" if fault.startswith("streaming") else "staged"
    phase = {"before apply": "reload", "after apply": "verify"}.get(
        fault, f"bucket:{rng.randrange(buckets)}")
    held = fault == "held bucket"
    before = _tokens(engines)
    v0 = {s.name: s.version for s in ray.get([a.status.remote() for a in engines])}
    proc = subprocess.Popen([sys.executable, "-m", "weightsync.testing.dying_trainer", gcs,
                             "weightsync-soak", str(model_dir), apply, phase,
                             "stop" if held else "0", str(seed), *NAMES],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if held:
        proc.stdout.readline()  # "stalling at bucket:i": stopped from here on
    else:
        proc.wait(timeout=300)
    killed = time.monotonic()
    row = {"fault": fault, "apply": apply, "phase": phase}
    statuses, row["recovery_s"] = _settle(engines, killed, 4 * DEADLINE_S)
    if held:  # back from its stall: its sync fails, and touches nothing
        os.kill(proc.pid, signal.SIGCONT)
        proc.wait(timeout=120)
        statuses = ray.get([a.status.remote() for a in engines], timeout=5)
    row["trainer_rc"] = proc.returncode
    proc.stdout.close()
    proc.stderr.close()
    row["limit_s"] = 2 * DEADLINE_S
    row["states"] = {s.name: s.state.value for s in statuses}
    row["reasons"] = {s.name: s.fenced_reason for s in statuses if s.fenced_reason}
    serving = [a for a, s in zip(engines, statuses, strict=True) if s.state == EngineState.SERVING]
    row["consistent"] = all(
        (s.state == EngineState.SERVING and s.version == v0[s.name]) or
        (s.state == EngineState.FENCED and bool(s.fenced_reason)) for s in statuses)
    after = _tokens(engines) if len(serving) == len(engines) else None
    row["output_unchanged"] = None if after is None else \
        [[ids for ids, _ in per] for per in after] == [[ids for ids, _ in per] for per in before]
    return row


def _engine_tree(actor) -> list:
    """The engine actor's process and its descendants (vLLM's engine core)."""
    import psutil
    import ray

    pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=30)
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _reap(procs: list, timeout: float = 30.0) -> list[int]:
    """Wait for a killed engine's processes to end; SIGKILL those still alive after
    ``timeout`` (orphans: a finding) and return their pids."""
    import psutil

    def alive(p) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    end = time.monotonic() + timeout
    while any(alive(p) for p in procs) and time.monotonic() < end:
        time.sleep(0.1)
    orphans = [p for p in procs if alive(p)]
    for p in orphans:
        p.kill()
    return [p.pid for p in orphans]


def _respawn(spec, dead, wait_s: float = 10.0) -> tuple:
    """A new actor for ``spec``; (it, what freed the dead one's name). Ray frees the name once
    the GCS has seen the actor die; if it has not within ``wait_s``, the dead handle is
    ``ray.kill``-ed (what a supervisor would do) and that is recorded."""
    import ray

    from weightsync.engine.actor import spawn_engine

    freed_by, end = "gcs", time.monotonic() + wait_s
    while True:
        try:
            return spawn_engine(spec), freed_by
        except ValueError:  # ActorAlreadyExistsError: the name is still taken
            if time.monotonic() > end:
                if freed_by == "ray.kill":
                    raise
                ray.kill(dead, no_restart=True)
                freed_by, end = "ray.kill", time.monotonic() + 30.0
            time.sleep(0.5)


def _engine_kill_round(engines: list, specs: list, coord, trainer, tokenizer, buckets: int,
                       seed: int, rng: random.Random) -> dict:
    """A trainer (in this process, deadlines as ``dying_trainer``'s) syncs; at a random bucket
    one engine's process is killed. Its sync must fail within the deadline, the survivor
    settle, and the killed engine come back: restarted from its spec, swapped into ``coord``
    (fenced until the round's resync) and into ``engines``."""
    import copy

    import ray

    from weightsync.config import Deadlines, TransferConfig
    from weightsync.coordinator import SyncCoordinator
    from weightsync.errors import SyncFailedError
    from weightsync.testing.dying_trainer import DEADLINE_S, LEASE_S
    from weightsync.testing.reference import perturb_
    from weightsync.types import EngineState

    victim = rng.randrange(len(engines))
    how = rng.choice(["ray.kill", "SIGKILL"])
    apply = rng.choice(["staged", "streaming"])
    phase = f"bucket:{rng.randrange(buckets)}"
    name = specs[victim].name
    survivors = [a for i, a in enumerate(engines) if i != victim]
    row = {"fault": ENGINE_KILL, "apply": apply, "phase": phase, "killed": name, "how": how}
    before = _tokens(survivors)
    v0 = {s.name: s.version for s in ray.get([a.status.remote() for a in survivors])}
    procs = _engine_tree(engines[victim])
    policy = copy.deepcopy(trainer)
    perturb_(policy, scale=0.3, seed=seed)

    killed = threading.Event()
    t_kill = [0.0]

    def kill_at(p: str, engine) -> None:
        if p != phase or killed.is_set():
            return
        t_kill[0] = time.monotonic()
        if how == "ray.kill":
            ray.kill(engines[victim], no_restart=True)
        else:  # what an out-of-memory kill looks like
            os.kill(procs[0].pid, signal.SIGKILL)
        killed.set()

    d = DEADLINE_S
    dying = SyncCoordinator(engines, TransferConfig(
        bucket_bytes=256 << 10, apply=apply, deadlines=Deadlines(
            rendezvous=d, transfer=d, verify=d, resume=d, reload=d, lease=LEASE_S)),
        on_phase=kill_at)
    box: dict = {}

    def run() -> None:
        try:
            box["result"] = dying.sync(policy)
        except SyncFailedError as e:
            box["failed"] = e
        except Exception as e:  # noqa: BLE001 - any other way out is a finding: record it
            box["error"] = repr(e)
        box["t"] = time.monotonic()

    start = time.monotonic()
    sync = threading.Thread(target=run, name="soak-dying-sync", daemon=True)
    sync.start()
    if not killed.wait(4 * DEADLINE_S):
        row["kill_missed"] = True  # the sync never reached the bucket (or hung before it)
        t_kill[0] = time.monotonic()
    statuses, row["recovery_s"] = _settle(survivors, t_kill[0], 4 * DEADLINE_S)
    sync.join(max(0.0, t_kill[0] + 4 * DEADLINE_S - time.monotonic()))
    row["trainer_outcome"] = ("hung" if sync.is_alive() else "failed" if "failed" in box
                              else "finished" if "result" in box else f"error: {box['error']}")
    if "t" in box:
        row["time_to_failure_s"] = box["t"] - t_kill[0]
        row["trainer_sync_s"] = box["t"] - start
    if "failed" in box:
        row["trainer_errors"] = {x.engine: x.error for x in box["failed"].result.engines
                                 if x.error}
    dying.close()
    row["limit_s"] = 2 * DEADLINE_S
    row["states"] = {name: "killed", **{s.name: s.state.value for s in statuses}}
    row["reasons"] = {s.name: s.fenced_reason for s in statuses if s.fenced_reason}
    row["versions"] = {s.name: {"before": v0[s.name], "after": s.version} for s in statuses}
    # Streaming apply is not all-or-nothing (TransferConfig): a survivor that received every
    # bucket before the kill may verify and commit the failed sync's version. That counts as
    # consistent only if the trainer's report says it took it and its output matches the
    # trainer's weights as HF scores them; old-version survivors must answer as before.
    took = {x.engine: x.version for x in box["failed"].result.engines if x.ok} \
        if "failed" in box else {}
    row["survivors_took_new_version"] = sorted(took)
    old = [s for s in statuses if s.state == EngineState.SERVING and s.version == v0[s.name]]
    new = [s for s in statuses if s.state == EngineState.SERVING and s.name in took
           and s.version == took[s.name]]
    if new:
        row["new_version_gap_to_hf"] = _gap_to_hf(
            [a for a, s in zip(survivors, statuses, strict=True) if s in new], policy, tokenizer)
    row["consistent"] = all(
        s in old or (s in new and row["new_version_gap_to_hf"] < 1e-3) or
        (s.state == EngineState.FENCED and bool(s.fenced_reason)) for s in statuses)
    kept = [i for i, s in enumerate(statuses) if s in old]
    after = _tokens([survivors[i] for i in kept]) if kept else None
    row["output_unchanged"] = None if after is None else \
        [[ids for ids, _ in per] for per in after] == \
        [[ids for ids, _ in before[i]] for i in kept]
    row["orphans_killed"] = _reap(procs)

    t = time.monotonic()
    restarted, row["name_freed_by"] = _respawn(specs[victim], engines[victim])
    ray.get(restarted.start.remote(), timeout=600)
    row["restart_s"] = time.monotonic() - t
    coord.replace_engine(name, restarted)
    engines[victim] = restarted
    st = ray.get(restarted.status.remote(), timeout=30)
    row["restarted"] = {"state": st.state.value, "reason": st.fenced_reason}
    return row


@app.command()
def main(rounds: int = typer.Option(20, min=1), seed: int = typer.Option(0),
         fault: str | None = typer.Option(None, help=f"force one fault every round: {FAULTS}"),
         out: Path = typer.Option(Path("benchmarks/results/soak-cpu.json")),
         workdir: Path = typer.Option(Path("runs/soak"))) -> None:
    import ray
    from transformers import AutoTokenizer

    from weightsync.config import EngineSpec
    from weightsync.coordinator import SyncCoordinator
    from weightsync.engine.actor import start_engines
    from weightsync.errors import SyncFailedError
    from weightsync.testing.models import build_text_model
    from weightsync.testing.reference import load_trainer_model, perturb_

    if fault is not None and fault not in FAULTS:
        raise typer.BadParameter(f"{fault!r} is not one of {FAULTS}")
    rng = random.Random(seed)
    model_dir = build_text_model(workdir.resolve() / "tiny-qwen2")
    ray.init(num_cpus=4, namespace="weightsync-soak", include_dashboard=False,
             log_to_driver=False)
    specs = [EngineSpec(name=n, model=str(model_dir), dtype="float32", max_model_len=512,
                        enforce_eager=True) for n in NAMES]
    engines = start_engines(specs)
    gcs = ray.get_runtime_context().gcs_address
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    trainer = load_trainer_model(model_dir)
    coord = SyncCoordinator(engines)
    from weightsync.transport.packing import named_tensors, plan_buckets, spec_of

    buckets = len(plan_buckets([spec_of(n, t) for n, t in named_tensors(trainer)],
                               256 << 10, 1).buckets)
    result = {"meta": run_meta("soak", device="cpu", seed=seed),
              "date": dt.date.today().isoformat(), "commit": commit(), "seed": seed,
              "forced_fault": fault, "rounds": []}
    started = time.monotonic()
    try:
        for r in range(rounds):
            kind = fault or rng.choices(FAULTS, weights=WEIGHTS)[0]
            row = {"round": r, "fault": kind}
            if kind == ENGINE_KILL:
                row = {"round": r, **_engine_kill_round(engines, specs, coord, trainer,
                                                        tokenizer, buckets, 1000 + r, rng)}
            elif kind != "none":
                row = {"round": r, **_kill_round(engines, gcs, model_dir, kind, buckets,
                                                 1000 + r, rng)}
            perturb_(trainer, scale=0.05, seed=2000 + r)
            t = time.monotonic()
            try:
                res = coord.sync(trainer)
            except SyncFailedError as e:  # a finding: record who failed and why, go on
                res = e.result
                row["resync_errors"] = {x.engine: x.error for x in res.engines if x.error}
                coord.sync(trainer)  # the next sync must heal it
            row.update(resync_ok=res.ok, resync_version=res.version,
                       resync_s=time.monotonic() - t,
                       resync_gap_to_hf=_gap_to_hf(engines, trainer, tokenizer))
            result["rounds"].append(row)
            print(json.dumps(row), flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2))  # a later failure keeps what ran
    finally:
        for a in engines:
            ray.kill(a)
    result["wall_s"] = time.monotonic() - started
    kills = [x for x in result["rounds"] if x["fault"] != "none"]
    engine_kills = [x for x in kills if x["fault"] == ENGINE_KILL]
    result["summary"] = {
        "rounds": len(result["rounds"]),
        "faults": {f: sum(x["fault"] == f for x in result["rounds"]) for f in FAULTS},
        "worst_recovery_s": max((x["recovery_s"] for x in kills), default=None),
        "limit_s": kills[0]["limit_s"] if kills else None,
        "all_within_limit": all(x["recovery_s"] <= x["limit_s"] for x in kills),
        "all_consistent": all(x["consistent"] and x["output_unchanged"] is not False
                              for x in kills),
        "held_trainers_failed_cleanly": all(x["trainer_rc"] == 3 for x in kills
                                            if x["fault"] == "held bucket"),
        "engine_kills": {
            "rounds": len(engine_kills),
            "trainer_syncs_failed": all(x["trainer_outcome"] == "failed" for x in engine_kills),
            "worst_time_to_failure_s": max((x.get("time_to_failure_s", float("inf"))
                                            for x in engine_kills), default=None),
            "worst_restart_s": max((x["restart_s"] for x in engine_kills), default=None),
            "restarted_fenced_until_resync": all(x["restarted"]["state"] == "fenced"
                                                 for x in engine_kills),
            "orphan_processes": sum(len(x["orphans_killed"]) for x in engine_kills),
            "survivor_took_new_version": sum(bool(x["survivors_took_new_version"])
                                             for x in engine_kills),
        },
        "resync_failures": sum(not x["resync_ok"] for x in result["rounds"]),
        "worst_resync_gap_to_hf": max(x["resync_gap_to_hf"] for x in result["rounds"]),
        "all_resyncs_match_hf": all(x["resync_ok"] and x["resync_gap_to_hf"] < 1e-3
                                    for x in result["rounds"]),
    }
    out.write_text(json.dumps(result, indent=2))
    _plot(result, out.with_suffix(".png"))
    print(json.dumps(result["summary"]))


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for i, fault in enumerate(f for f in FAULTS if f != "none"):
        rows = [x for x in result["rounds"] if x["fault"] == fault]
        ax.scatter([x["round"] for x in rows], [x["recovery_s"] for x in rows], label=fault,
                   color=f"C{i}")
    if result["summary"]["limit_s"]:
        ax.axhline(result["summary"]["limit_s"], color="red", ls="--",
                   label="2 x deadline (the bound)")
    ax.set_xlabel("round")
    ax.set_ylabel("kill -> every (surviving) engine settled (s)")
    ax.set_title(f"trainer or engine killed mid-sync: {result['summary']['rounds']} rounds, "
                 f"worst {result['summary']['worst_recovery_s'] or 0:.1f} s")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    app()
