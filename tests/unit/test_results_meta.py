"""Results files say where they came from, and the docs cite only results that exist.

Every ``benchmarks/results/*.json`` opens with the ``meta`` block ``benchmarks.meta.run_meta``
writes (the docs' benchmarks page is generated from it), and every ``benchmarks/results/...``
path that README.md or a page under docs/ names is a file in the tree.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
CITED = re.compile(r"benchmarks/results/([A-Za-z0-9_.{},*-]+)")


def _expand(name: str) -> list[str]:
    """``sync-gpu-0.5b.{json,png}`` -> both names; anything else as written."""
    brace = re.search(r"\{([^}]*)\}", name)
    if not brace:
        return [name]
    head, tail = name[:brace.start()], name[brace.end():]
    return [n for part in brace.group(1).split(",") for n in _expand(head + part + tail)]


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.json")), ids=lambda p: p.name)
def test_every_results_file_has_meta(path: Path) -> None:
    doc = json.loads(path.read_text())
    meta = doc.get("meta") if isinstance(doc, dict) else None
    assert isinstance(meta, dict), f"{path.name}: no top-level meta block"
    for key in ("commit", "device", "date"):
        assert meta.get(key), f"{path.name}: meta.{key} is missing"


def test_pages_cite_results_that_exist() -> None:
    missing = []
    for page in PAGES:
        for match in CITED.finditer(page.read_text()):
            cited = match.group(1).rstrip(".,")
            for name in _expand(cited):
                if name.endswith("*") or "*" in name:
                    found = list(RESULTS.glob(name))
                else:
                    found = [RESULTS / name] if (RESULTS / name).exists() else []
                if not found:
                    missing.append(f"{page.relative_to(ROOT)}: benchmarks/results/{name}")
    assert not missing, "cited results that do not exist:\n" + "\n".join(missing)


def test_the_citation_check_sees_a_missing_file() -> None:
    text = "see `benchmarks/results/no-such-run.json` and benchmarks/results/sync-cpu-small.*"
    names = [n for m in CITED.finditer(text) for n in _expand(m.group(1).rstrip(".,"))]
    assert names == ["no-such-run.json", "sync-cpu-small.*"]
    assert not (RESULTS / "no-such-run.json").exists()
