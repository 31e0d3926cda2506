"""The GRPO main job with a 2-rank FSDP2 trainer (``python -m services.grpo --trainer-ranks 2``),
run as users run it (its own process, rank 1 spawned by it) on the session's Ray cluster with
one real vLLM CPU engine of its own: every step's sync is one ``ShardedSync`` across both
ranks, and the engine then samples with exactly the trainer's weights (the per-step logprob
gap is the engine's logprobs of its own samples against the sharded trainer's)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]


def test_grpo_main_job_trains_on_two_fsdp2_ranks_and_every_sync_lands(ray_session, tmp_path):
    gcs = ray_session.get_runtime_context().gcs_address
    proc = subprocess.run(
        [sys.executable, "-m", "services.grpo", "--trainer-ranks", "2", "--steps", "2",
         "--engines", "1", "--prompts-per-step", "2", "--group-size", "4",
         "--ray-address", gcs, "--run-dir", str(tmp_path), "--name", "ranks",
         "--model-dir", str(tmp_path / "model")],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=480)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    log = json.loads((tmp_path / "ranks.json").read_text())
    assert log["config"]["trainer_ranks"] == 2
    summary = log["summary"]
    assert summary["all_syncs_verified"] and summary["versions"] == [1, 2]
    steps = log["steps"]
    assert [s["sampled_version"] for s in steps] == [0, 1]  # step 2 sampled what sync 1 sent
    # fp32 on both sides: the engine's logprobs are the sharded trainer's to ~1e-6
    assert all(s["logprob_gap"] < 1e-4 for s in steps), [s["logprob_gap"] for s in steps]
    assert (tmp_path / "ranks.png").stat().st_size > 0
