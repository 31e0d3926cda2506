"""Run the GPU suite's tests in streams side by side on one GPU, and merge what they report.

An engine start on the lent GPU is mostly CPU work (Ray, imports, torch.compile, CUDA graph
capture), so ``scripts/gpu_run.sh`` with ``WS_GPU_STREAMS=N`` runs the tests that do not
measure the device (not ``gpu_exclusive``) in N pytest processes at once, each with its own
Ray and its own compile caches; the ``gpu_exclusive`` ones run first, alone.

    python -m tests.gpu.streams plan N OUTDIR < node_ids    # OUTDIR/stream-<i>.txt
    python -m tests.gpu.streams merge OUT.json PART.json ...

``plan`` keeps a file's tests together (they share module-scoped engines) except in the files
whose every test starts its own engines (``PER_TEST``), and balances the streams by the
seconds each test took when it last ran (``benchmarks/results/gpu-*.json``).
"""

from __future__ import annotations

import glob
import json
import sys
from pathlib import Path

PER_TEST = ("test_warm_cold_gpu.py", "test_fp8_gpu.py", "test_lora_gpu.py")
SETUP_S = 60.0     # a file's module-scoped engines, which no result records
UNKNOWN_S = 120.0  # a test no results file has seen: about one engine pair


def last_seconds(results_glob: str = "benchmarks/results/gpu-*.json") -> dict[str, float]:
    """Each GPU test's seconds in the results files (the longest where several have it)."""
    seen: dict[str, float] = {}
    for path in glob.glob(results_glob):
        tests = json.loads(Path(path).read_text()).get("tests", {})
        for node, entry in tests.items():
            if isinstance(entry, dict) and "seconds" in entry:
                seen[node] = max(seen.get(node, 0.0), float(entry["seconds"]))
    return seen


def units(node_ids: list[str], seconds: dict[str, float]) -> list[tuple[float, list[str]]]:
    """The tests grouped into what one stream must run together, each with its weight."""
    groups: dict[str, list[str]] = {}
    for node in node_ids:
        path = node.split("::", 1)[0]
        key = node if path.endswith(PER_TEST) else path
        groups.setdefault(key, []).append(node)
    out = []
    for key, nodes in groups.items():
        per_test = "::" in key
        weight = sum(seconds.get(n, UNKNOWN_S if per_test else 10.0) for n in nodes)
        out.append((weight + (0.0 if per_test else SETUP_S), nodes))
    return out


def plan(node_ids: list[str], n: int, seconds: dict[str, float]) -> list[list[str]]:
    """The tests split into ``n`` streams of about equal seconds (longest first, each to the
    stream with the least so far), each stream in the order the tests were given."""
    order = {node: i for i, node in enumerate(node_ids)}
    streams: list[tuple[float, list[str]]] = [(0.0, []) for _ in range(n)]
    for weight, nodes in sorted(units(node_ids, seconds), key=lambda u: -u[0]):
        i = min(range(n), key=lambda k: streams[k][0])
        streams[i] = (streams[i][0] + weight, streams[i][1] + nodes)
    return [sorted(nodes, key=order.__getitem__) for _, nodes in streams if nodes]


def merge(parts: list[dict]) -> dict:
    """One results file from the streams' (``tests/gpu/conftest.py``'s layout): the first
    part's meta, every test's outcome, the data merged key by key."""
    from tests.gpu.report import summarize

    out: dict = {"meta": dict(parts[0].get("meta", {})) if parts else {}, "tests": {}, "data": {}}
    for part in parts:
        out["tests"].update(part.get("tests", {}))
        _merge_into(out["data"], part.get("data", {}))
    out["meta"]["result_parts"] = len(parts)  # the streams', and the exclusive tests' run
    # where parts come from runs at different commits, which test ran where (a later part's
    # outcome replaces an earlier one's for the same test)
    out["meta"]["parts"] = [{"commit": p.get("meta", {}).get("commit"),
                             "date": p.get("meta", {}).get("date"),
                             "tests": sorted(p.get("tests", {}))} for p in parts]
    out["summary"] = summarize(out)
    return out


def _merge_into(into: dict, new: dict) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge_into(into[key], value)
        else:
            into[key] = value


def main(argv: list[str]) -> int:
    if argv[:1] == ["plan"] and len(argv) == 3:
        node_ids = [line.strip() for line in sys.stdin if "::" in line]
        outdir = Path(argv[2])
        outdir.mkdir(parents=True, exist_ok=True)
        streams = plan(node_ids, int(argv[1]), last_seconds())
        for i, nodes in enumerate(streams):
            (outdir / f"stream-{i}.txt").write_text("".join(f"{n}\n" for n in nodes))
            print(f"stream {i}: {len(nodes)} tests")
        return 0
    if argv[:1] == ["merge"] and len(argv) >= 2:
        parts = [json.loads(Path(p).read_text()) for p in argv[2:] if Path(p).exists()]
        Path(argv[1]).write_text(json.dumps(merge(parts), indent=1, sort_keys=True, default=str))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
