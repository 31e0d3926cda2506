"""scripts/wheel_imports.py, the check of a wheel's imports before a GPU call: on a wheel built
here, it finds a third-party import made inside a function of a ``--deep`` module (as vLLM
0.24's ``build_app`` imports ``prometheus_fastapi_instrumentator``), follows relative imports,
and leaves out optional (``try``) and ``TYPE_CHECKING`` imports."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

FILES = {
    "pkg/__init__.py": "",
    "pkg/app.py": (
        "import os\nimport uvloop\nfrom . import engine, routers\n"
        "def build_app():\n    from .serve import register\n    register()\n"),
    "pkg/routers.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import mcp\n",
    "pkg/serve/__init__.py": (
        "def register():\n    from .metrics import attach\n    attach()\n"),
    "pkg/serve/metrics.py": (
        "def attach():\n    from prometheus_fastapi_instrumentator import Instrumentator\n"
        "try:\n    import xxhash\nexcept ImportError:\n    xxhash = None\n"),
    "pkg/engine.py": "def later():\n    import lazy_dep\n",
}


def _scan(tmp_path: Path, *args: str) -> dict[str, str]:
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, text in FILES.items():
            z.writestr(name, text)
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "wheel_imports.py"), str(wheel),
                          "pkg.app", *args], capture_output=True, text=True, check=True).stdout
    return dict(line.split() for line in out.splitlines())


def test_function_level_imports_are_followed_only_under_deep_prefixes(tmp_path):
    assert _scan(tmp_path) == {"uvloop": "pkg.app"}
    assert _scan(tmp_path, "--deep", "pkg") == {
        "uvloop": "pkg.app", "prometheus_fastapi_instrumentator": "pkg.serve.metrics",
        "lazy_dep": "pkg.engine"}
    # build_app's and register's imports followed, not pkg.engine's function-level one
    assert _scan(tmp_path, "--deep", "pkg.app", "--deep", "pkg.serve") == {
        "uvloop": "pkg.app", "prometheus_fastapi_instrumentator": "pkg.serve.metrics"}


def test_have_and_skip_leave_names_and_modules_out(tmp_path):
    assert _scan(tmp_path, "--deep", "pkg", "--have", "uvloop", "lazy_dep") == {
        "prometheus_fastapi_instrumentator": "pkg.serve.metrics"}
    assert _scan(tmp_path, "--deep", "pkg", "--skip", "pkg.serve") == {
        "uvloop": "pkg.app", "lazy_dep": "pkg.engine"}
