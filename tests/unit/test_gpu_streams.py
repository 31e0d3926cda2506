"""The GPU suite's stream planner and results merge (tests/gpu/streams.py): pure logic, so
it is checked here, where CI runs; the streams themselves run on the lent GPU."""

from __future__ import annotations

from tests.gpu.streams import merge, plan

WC = "tests/gpu/test_warm_cold_gpu.py::test_warm_engine_equals_cold_engine"
NODES = [f"{WC}[a]", f"{WC}[b]", f"{WC}[c]",
         "tests/gpu/test_moe_gpu.py::test_one", "tests/gpu/test_moe_gpu.py::test_two"]


def test_plan_splits_per_test_files_keeps_module_engines_together_and_balances():
    seconds = {f"{WC}[a]": 200.0, f"{WC}[b]": 150.0, f"{WC}[c]": 50.0,
               "tests/gpu/test_moe_gpu.py::test_one": 5.0}
    streams = plan(NODES, 2, seconds)
    assert sorted(n for s in streams for n in s) == sorted(NODES)  # each test once
    moe = [s for s in streams if "tests/gpu/test_moe_gpu.py::test_one" in s]
    assert len(moe) == 1 and "tests/gpu/test_moe_gpu.py::test_two" in moe[0]
    # longest first, each to the lighter stream: a (200) | b (150) + the moe file (5, 10 for
    # the unknown test, 60 of setup) = 225 | then c (50) to a's: 250
    assert [f"{WC}[a]", f"{WC}[c]"] in streams
    assert all(s == sorted(s, key=NODES.index) for s in streams)  # the given order kept
    assert len(plan(NODES, 8, seconds)) == 4  # no empty stream


def test_merge_keeps_every_outcome_and_merges_data_key_by_key():
    a = {"meta": {"commit": "x"}, "tests": {"t1": {"outcome": "passed"}},
         "data": {"warm_cold": {"a": {"ok": 1}}, "fp8": [1]}}
    b = {"meta": {"commit": "y", "date": "d"}, "tests": {"t2": {"outcome": "failed"}},
         "data": {"warm_cold": {"b": {"ok": 2}}}}
    out = merge([a, b])
    assert out["tests"].keys() == {"t1", "t2"}
    assert out["data"]["warm_cold"] == {"a": {"ok": 1}, "b": {"ok": 2}}
    assert out["meta"] == {"commit": "x", "result_parts": 2, "parts": [
        {"commit": "x", "date": None, "tests": ["t1"]},
        {"commit": "y", "date": "d", "tests": ["t2"]}]}  # which test ran at which commit
    assert out["summary"]["tests"] == {"passed": 1, "skipped": 0, "failed": 1}
    # a later run of the same test replaces its outcome
    again = merge([a, b, {"meta": {"commit": "z"}, "tests": {"t2": {"outcome": "passed"}}}])
    assert again["summary"]["tests"] == {"passed": 2, "skipped": 0, "failed": 0}
