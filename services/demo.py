"""CPU demo: local Ray, a tiny model, real vLLM engines, N verified syncs with timings.

    python -m services.demo --engines 2 --syncs 3
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from weightsync.config import Settings
from weightsync.local_ray import init_kwargs
from weightsync.ray_compat import prepare

app = typer.Typer(add_completion=False)


@app.command()
def main(engines: int = typer.Option(1, min=1), syncs: int = typer.Option(3, min=1),
         workdir: Path = typer.Option(Path("runs/demo")),
         bucket_mib: int = typer.Option(4, min=1)) -> None:
    prepare(None, Settings().ray_auth_mode)  # token authentication, before Ray's import
    import ray
    import torch
    from transformers import AutoTokenizer

    from weightsync.config import EngineSpec, TransferConfig
    from weightsync.coordinator import SyncCoordinator
    from weightsync.engine.actor import start_engines
    from weightsync.testing.models import build_text_model
    from weightsync.testing.reference import greedy, load_trainer_model, perturb_

    logging.basicConfig(level=logging.WARNING)
    console = Console()
    model_dir = build_text_model(workdir / "tiny-qwen2")
    ray.init(num_cpus=2, log_to_driver=False, **init_kwargs())
    t = time.perf_counter()
    specs = [EngineSpec(name=f"engine-{i}", model=str(model_dir), dtype="float32",
                        max_model_len=512, enforce_eager=True) for i in range(engines)]
    actors = start_engines(specs)
    console.print(f"{engines} vLLM engine(s) up in {time.perf_counter() - t:.1f}s")
    coord = SyncCoordinator(actors, TransferConfig(bucket_bytes=bucket_mib << 20))
    tok = AutoTokenizer.from_pretrained(model_dir)
    policy = load_trainer_model(model_dir)
    prompts = ["hello world", "the quick brown fox"]
    table = Table("sync", "version", "MB", "transfer ms", "reload ms", "verify ms", "total ms", "parity")
    ok = True
    for step in range(1, syncs + 1):
        perturb_(policy, seed=step)
        res = coord.sync(policy, pause_mode="abort", sleep_level=1)
        ref = greedy(policy, tok, prompts, 8)
        outs = ray.get(actors[0].generate.remote(prompts, max_tokens=8, logprobs=True))
        parity = all(list(o.token_ids) == r[0] for o, r in zip(outs, ref))
        ok &= parity and all(o.version == res.version for o in outs)
        s = res.engines[0].seconds
        table.add_row(str(step), str(res.version), f"{res.nbytes / 1e6:.2f}",
                      f"{s.get('transfer', 0) * 1e3:.1f}", f"{s.get('reload', 0) * 1e3:.1f}",
                      f"{s.get('fingerprint', 0) * 1e3:.1f}", f"{res.seconds['total'] * 1e3:.1f}",
                      "yes" if parity else "NO")
    console.print(table)
    console.print(f"skipped: {res.engines[0].skipped}")
    ray.shutdown()
    del torch
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    app()
