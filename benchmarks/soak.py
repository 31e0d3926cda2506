"""Chaos soak (not in CI): randomized rounds of a trainer dying mid-sync against real vLLM CPU
engines, each followed by a new trainer's sync checked against HF. Writes JSON + PNG.

    python -m benchmarks.soak --rounds 20

Each round picks a fault: the trainer process (``weightsync.testing.dying_trainer``) SIGKILLs
itself at a random bucket of the broadcast (staged or streaming apply), right before the
engines apply, or after they applied; or it stops (SIGSTOP) holding a random bucket past the
deadline and resumes (SIGCONT) once the engines recovered, when its sync must fail and change
nothing; or no fault (a clean sync). After a kill, every engine
must answer ``status`` throughout and, within twice the deadline, either serve its old version
with unchanged output or be fenced with a reason. Then a new trainer syncs new weights and
both engines must match HF: the logprob of every token an engine generates greedily, as HF
scores it, within 1e-3 of the engine's own.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import typer

from benchmarks.baselines import commit

app = typer.Typer(add_completion=False)
PROMPTS = ["hello world", "the quick brown fox"]
NAMES = ("soak-a", "soak-b")
FAULTS = ["staged mid-broadcast", "streaming mid-broadcast", "before apply", "after apply",
          "held bucket", "none"]


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
    settled = {EngineState.SERVING, EngineState.FENCED}
    while True:  # status must answer throughout
        statuses = ray.get([a.status.remote() for a in engines], timeout=5)
        if all(s.state in settled and s.owner is None for s in statuses):
            break
        if time.monotonic() - killed > 4 * DEADLINE_S:
            break
        time.sleep(0.1)
    row["recovery_s"] = time.monotonic() - killed
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


@app.command()
def main(rounds: int = typer.Option(20, min=1), seed: int = typer.Option(0),
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

    rng = random.Random(seed)
    model_dir = build_text_model(workdir.resolve() / "tiny-qwen2")
    ray.init(num_cpus=4, namespace="weightsync-soak", include_dashboard=False,
             log_to_driver=False)
    engines = start_engines([EngineSpec(name=n, model=str(model_dir), dtype="float32")
                             for n in NAMES])
    gcs = ray.get_runtime_context().gcs_address
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    trainer = load_trainer_model(model_dir)
    coord = SyncCoordinator(engines)
    from weightsync.transport.packing import named_tensors, plan_buckets, spec_of

    buckets = len(plan_buckets([spec_of(n, t) for n, t in named_tensors(trainer)],
                               256 << 10, 1).buckets)
    result = {"date": dt.date.today().isoformat(), "commit": commit(), "rounds": []}
    try:
        for r in range(rounds):
            fault = rng.choice(FAULTS)
            row = {"round": r, "fault": fault}
            if fault != "none":
                row = {"round": r, **_kill_round(engines, gcs, model_dir, fault, buckets,
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
    kills = [x for x in result["rounds"] if x["fault"] != "none"]
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
    ax.set_ylabel("kill -> every engine settled (s)")
    ax.set_title(f"trainer SIGKILLed mid-sync: {result['summary']['rounds']} rounds, "
                 f"worst {result['summary']['worst_recovery_s'] or 0:.1f} s")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    app()
