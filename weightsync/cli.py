"""``weightsync`` command line: run the control plane, or drive one.

    weightsync serve --model /models/policy --engines 2
    weightsync status
    weightsync reload /ckpts/step-1200
    weightsync sleep --level 1   |   weightsync wake

Settings come from ``WEIGHTSYNC_*`` environment variables (read once, here); options override
them. Client commands talk to ``--url`` (default: the configured host and port) with
``--token`` (default ``WEIGHTSYNC_TOKEN``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, TypeVar

import httpx
import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from weightsync.config import Settings
from weightsync.errors import WeightSyncError
from weightsync.types import SyncResult

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Move trained weights into vLLM engine fleets, verified.")
console = Console()
err_console = Console(stderr=True)
T = TypeVar("T")

Url = Annotated[str | None, typer.Option(help="Control plane URL [default: from settings]")]
Token = Annotated[str | None, typer.Option(help="Bearer token [default: WEIGHTSYNC_TOKEN]")]
Engines = Annotated[list[str] | None, typer.Option("--engine", "-e",
                                                   help="Engine to act on (repeat); all if none")]


@functools.lru_cache(maxsize=1)
def load_settings() -> Settings:
    """The process's settings, read from the environment once."""
    return Settings()


@contextmanager
def _client(url: str | None, token: str | None) -> Iterator:
    from weightsync.client import WeightSyncClient

    s = load_settings()
    host = "127.0.0.1" if s.host in ("0.0.0.0", "::") else s.host
    with WeightSyncClient(url or f"http://{host}:{s.port}", token=token or s.token) as c:
        yield c


def _run(what: str, call: Callable[[], T]) -> T:
    """Run a call with a spinner; typed errors become a one-line message and exit code 1."""
    try:
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                      console=err_console, transient=True) as progress:
            progress.add_task(what, total=None)
            return call()
    except WeightSyncError as e:
        err_console.print(f"[red]error[/red] {type(e).__name__}: {e}")
        raise typer.Exit(1) from None
    except httpx.HTTPError as e:  # connection refused, timeouts
        err_console.print(f"[red]error[/red] cannot reach the control plane: {e}")
        raise typer.Exit(1) from None


def _print_states(engines) -> None:
    table = Table("engine", "state", "version", "device", "note")
    for e in engines:
        table.add_row(e.name, e.state.value, str(e.version), e.device, e.fenced_reason or "")
    console.print(table)


def _print_result(result: SyncResult) -> None:
    table = Table("engine", "ok", "version", "reload ms", "total ms", "fingerprint", "error")
    for r in result.engines:
        table.add_row(r.engine, "yes" if r.ok else "NO", str(r.version),
                      f"{r.seconds.get('reload', 0) * 1e3:.1f}",
                      f"{r.seconds.get('total', 0) * 1e3:.1f}", r.fingerprint or "-",
                      r.error or "")
    console.print(table)
    console.print(f"version {result.version} ({result.mode}) "
                  f"{'published' if result.ok else 'FAILED'}")


@app.command()
def serve(host: Annotated[str | None, typer.Option(help="Bind address")] = None,
          port: Annotated[int | None, typer.Option(help="Port")] = None,
          model: Annotated[str | None, typer.Option(help="Model for engines to start")] = None,
          engines: Annotated[int | None, typer.Option(min=1, help="Engine count")] = None,
          namespace: Annotated[str | None, typer.Option(help="Ray namespace")] = None,
          engine_args: Annotated[str | None, typer.Option(
              help="vLLM engine arguments for the engines it starts, as JSON "
                   "(WEIGHTSYNC_ENGINE_ARGS)")] = None) -> None:
    """Run the control plane (starting any missing engines as detached Ray actors)."""
    import json

    from weightsync import ray_compat

    overrides = {k: v for k, v in dict(host=host, port=port, model=model, engines=engines,
                                        namespace=namespace).items() if v is not None}
    if engine_args is not None:
        try:
            overrides["engine_args"] = json.loads(engine_args)
        except json.JSONDecodeError as e:
            err_console.print(f"[red]--engine-args is not JSON[/red]: {e}")
            raise typer.Exit(2) from None
    settings = load_settings().model_copy(update=overrides)
    mode = ray_compat.prepare(settings.ray_address, settings.ray_auth_mode)  # before Ray's import
    from weightsync.api.server import serve as run_server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        run_server(settings, mode)
    except WeightSyncError as e:
        err_console.print(f"[red]refusing to start[/red] {type(e).__name__}: {e}")
        raise typer.Exit(2) from None


@app.command()
def status(url: Url = None, token: Token = None) -> None:
    """Engines, states and versions."""
    with _client(url, token) as c:
        st = _run("status", c.status)
    _print_states(st.engines)
    console.print(f"fleet version {st.version}{' (sync running)' if st.busy else ''}")


@app.command()
def sleep(level: Annotated[int, typer.Option(min=1, max=2)] = 1, engine: Engines = None,
          url: Url = None, token: Token = None) -> None:
    """Release engines' device memory for a colocated trainer; the next sync wakes them."""
    with _client(url, token) as c:
        out = _run(f"sleep level {level}", lambda: c.sleep(level, engine))
    table = Table("engine", "level", "freed GiB", "sleep ms", "note")
    for e in out.engines:
        table.add_row(e.engine, str(e.level),
                      "-" if e.freed_bytes is None else f"{e.freed_bytes / (1 << 30):.2f}",
                      f"{e.seconds.get('sleep', 0) * 1e3:.1f}", "; ".join(e.skipped))
    console.print(table)


@app.command()
def wake(tag: Annotated[list[str] | None, typer.Option(help="weights | kv_cache (repeat)")] = None,
         engine: Engines = None, url: Url = None, token: Token = None) -> None:
    """Wake sleeping engines."""
    with _client(url, token) as c:
        out = _run("wake", lambda: c.wake(tag, engine))
    _print_states(out.engines)


@app.command()
def reload(path: Annotated[str | None,
                           typer.Argument(help="Checkpoint dir; none: original")] = None,
           partial: Annotated[bool, typer.Option(
               help="Allow a checkpoint holding only some of the model's tensors")] = False,
           engine: Engines = None, url: Url = None, token: Token = None) -> None:
    """Reload weights from a safetensors checkpoint directory and publish a new version."""
    with _client(url, token) as c:
        result = _run(f"reloading {path or 'the original model'}",
                      lambda: c.reload(path, engines=engine, partial=partial))
    _print_result(result)
